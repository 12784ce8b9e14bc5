"""EmbeddingConsensusScorer with the real bundled all-MiniLM-L6-v2 (a local package, no download)."""

from __future__ import annotations

import importlib

import pytest
import torch

from tao_pipeline.scoring.base import Failed, PromptContext
from tao_pipeline.scoring.catalog import SCORER_CLASSES
from tao_pipeline.scoring.embedding import EmbeddingConsensusScorer, consensus_scores

CONTEXT = PromptContext(prompt="What is the capital of France?", task="open")


@pytest.fixture(scope="module")
def scorer():
    return EmbeddingConsensusScorer(batch_size=2)  # a small batch so that batching is exercised


def test_paraphrases_outscore_an_off_topic_outlier(scorer):
    scores = scorer.score_group(
        CONTEXT,
        [
            "The capital of France is Paris.",
            "Paris is the capital city of France.",
            "France's capital is Paris.",
            "Bananas are rich in potassium and grow in tropical climates.",
        ],
    )
    assert all(0.0 <= score <= 1.0 for score in scores)
    assert min(scores[:3]) > scores[3] + 0.3


def test_identical_candidates_all_score_one(scorer):
    scores = scorer.score_group(CONTEXT, ["Paris is the capital of France."] * 3)
    assert scores == pytest.approx([1.0] * 3, abs=1e-4)


def test_empty_responses_score_zero_and_do_not_count_for_the_others(scorer):
    answer = "Paris is the capital of France."
    scores = scorer.score_group(CONTEXT, ["", answer, "   \n", answer])
    assert scores[0] == scores[2] == 0.0
    assert scores[1] == scores[3] == pytest.approx(1.0, abs=1e-4)
    assert scorer.score_group(CONTEXT, ["", " "]) == [0.0, 0.0]


def test_a_lone_response_scores_one(scorer):
    assert scorer.score_group(CONTEXT, ["Paris."]) == [1.0]
    assert scorer.score_group(CONTEXT, ["Paris.", ""]) == [1.0, 0.0]
    assert scorer.score_group(CONTEXT, []) == []


def test_embeddings_are_unit_length_and_identical_texts_share_one(scorer):
    embeddings = scorer.embed(["Paris.", "Lyon is a city.", "Paris.", "Nice", "Nice"])
    assert embeddings.shape == (5, 384)
    assert torch.linalg.vector_norm(embeddings, dim=1) == pytest.approx([1.0] * 5, abs=1e-5)
    assert torch.equal(embeddings[0], embeddings[2]) and torch.equal(embeddings[3], embeddings[4])
    assert scorer.encoder() is scorer.encoder()


def test_long_texts_are_truncated_not_rejected(scorer):
    long_text = "Paris is the capital of France. " * 400
    scores = scorer.score_group(CONTEXT, [long_text, "Paris is the capital of France."])
    assert all(0.5 < score <= 1.0 for score in scores)


def test_consensus_is_the_mean_similarity_to_the_others_clipped_to_zero():
    similarity = torch.tensor([[1.0, 0.8, -0.6], [0.8, 1.0, 0.2], [-0.6, 0.2, 1.0]])
    assert consensus_scores(similarity) == pytest.approx([0.1, 0.5, 0.0])


def test_a_missing_model_directory_names_the_option(tmp_path):
    with pytest.raises(FileNotFoundError, match="scoring.options.embedding_consensus.model"):
        EmbeddingConsensusScorer(model=str(tmp_path / "no-such-model"))
    (tmp_path / "config.json").write_text("{}")  # a directory without safetensors weights
    with pytest.raises(FileNotFoundError, match="scoring.options.embedding_consensus.model"):
        EmbeddingConsensusScorer(model=tmp_path)


def test_a_model_that_cannot_load_fails_the_group_without_raising(tmp_path, scorer):
    (tmp_path / "config.json").write_text((scorer.model_dir / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    broken = EmbeddingConsensusScorer(model=tmp_path)
    scores = broken.score_group(CONTEXT, ["Paris.", "Paris!", ""])
    assert all(isinstance(score, Failed) and "embedding_consensus" in score.reason for score in scores)


def test_registry_builds_it_with_default_options():
    module_name, class_name = SCORER_CLASSES["embedding_consensus"].split(":")
    scorer = getattr(importlib.import_module(module_name), class_name)()
    assert isinstance(scorer, EmbeddingConsensusScorer) and scorer.name == "embedding_consensus"
    assert (scorer.model_dir / "model.safetensors").is_file()
