"""The yardstick the benchmarks share: the demo's labeled held-out prompts, and the labeled arm TAO is
measured against (supervised fine-tuning on the gold answers of the same train prompts).

Labels are read here, in the benchmark, never by the pipeline's training: the SFT arm is what a team
would do if it paid for labels, tuned with the same LoRA, steps and learning rate as a TAO round.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from common import DEMO

from tao_pipeline.data.ingest import load_prompts
from tao_pipeline.data.lake import Lake
from tao_pipeline.evaluation import Contender, evaluate
from tao_pipeline.evaluation.labels import label_key, load_labels
from tao_pipeline.evaluation.significance import accuracy_test, format_p, proportion_interval
from tao_pipeline.registry import ModelStore
from tao_pipeline.scoring import build_scorer
from tao_pipeline.settings import load_settings
from tao_pipeline.training.sft import train_sft


def fixed_heldout(overrides: list[str] | None = None) -> pd.DataFrame:
    """Every labeled held-out prompt of the demo logs (or of the logs and labels ``overrides`` name): the same
    yardstick after each round."""
    settings = load_settings(DEMO, overrides or [])
    prompts = load_prompts(settings.data.logs, settings.data).prompts
    labels = load_labels(settings.data.labels)
    heldout = prompts[prompts["split"] == "heldout"]
    return heldout[heldout["prompt"].str.strip().isin(labels)].reset_index(drop=True)


def fixed_set_accuracy(settings, heldout, base_id: str, models: dict, store: ModelStore) -> dict:
    """Greedy accuracy of the base model and each model (name -> (version, weights) or None) on the fixed
    held-out set, each paired with the base model: Wilson interval, Newcombe's difference, McNemar's p."""
    # Greedy answers are all this needs: no base samples, the smallest reference pool for the outcome.
    evaluation = settings.evaluation.model_copy(update={"test_time_k": 0, "pool_samples": 1})
    settings = settings.model_copy(update={"evaluation": evaluation})
    scorer, labels = build_scorer(settings.scoring, settings.cache_dir), load_labels(settings.data.labels)
    base = Contender(base_id, store.get(base_id).path)
    confidence = settings.evaluation.confidence
    row: dict = {}
    for name, model in models.items():
        if model is None:
            continue
        rows = evaluate(heldout, base, Contender(*model), scorer, labels, settings, progress=False)
        test = accuracy_test(rows["champion_correct"], rows["challenger_correct"], confidence)
        if "base" not in row:
            row["base"] = f"{test.champion:.3f} {test.champion_interval}"
        hits = int(rows["challenger_correct"].dropna().astype(bool).sum())
        row[name] = f"{test.challenger:.3f} {proportion_interval(hits, test.n, confidence)}"
        row[f"{name}-base"] = f"{test.difference:+.3f} {test.difference_interval} p={format_p(test.mcnemar_p)}"
    return row


def gold_examples(prompts: pd.DataFrame, labels: dict[str, list[str]]) -> pd.DataFrame:
    """The train prompts that have a label, each with its first accepted answer."""
    train = prompts[prompts["split"] == "train"]
    answers = [
        (labels.get(label_key(row.prompt, getattr(row, "history", None))) or [None])[0] for row in train.itertuples()
    ]
    return train.assign(answer=answers).dropna(subset=["answer"]).reset_index(drop=True)


def train_labeled_arm(settings, round_ids: list[str], out: Path) -> tuple[str, Path, int]:
    """SFT of the base model on the gold answers of the train prompts of ``round_ids`` (each prompt once), with
    the rounds' LoRA, learning rate and seed, and as many steps as they took together (training.max_steps per
    round). Returns (name, weights, examples)."""
    store = ModelStore(settings.models_dir)
    base = store.ancestors(store.champion(settings.model).version_id)[-1]
    lake = Lake(settings.lake_dir)
    prompts = pd.concat([lake.read("raw_prompts", r) for r in round_ids]).drop_duplicates("prompt_id")
    examples = gold_examples(prompts, load_labels(settings.data.labels))
    training = settings.training
    if training.max_steps:
        training = training.model_copy(update={"max_steps": training.max_steps * len(round_ids)})
    name = f"labeled-sft-{len(round_ids)}-rounds"
    weights = out / name
    result = train_sft(base.path, examples, training, weights, progress=True)
    print(f"labeled SFT: {len(examples)} gold answers, {result.steps} steps in {result.seconds:.0f} s")
    return name, weights, len(examples)


def paired_difference(settings, heldout: pd.DataFrame, first: tuple[str, Path], second: tuple[str, Path]) -> str:
    """Labeled accuracy of ``second`` minus ``first`` (name, weights), paired on ``heldout``: the difference with
    Newcombe's interval and McNemar's p."""
    rows = evaluate(
        heldout, Contender(*first), Contender(*second),
        build_scorer(settings.scoring, settings.cache_dir), load_labels(settings.data.labels), settings, progress=False,
    )  # fmt: skip
    test = accuracy_test(rows["champion_correct"], rows["challenger_correct"], settings.evaluation.confidence)
    return f"{test.difference:+.3f} {test.difference_interval} p={format_p(test.mcnemar_p)} (n = {test.n})"


def versus_labeled(settings, heldout: pd.DataFrame, tao: tuple[str, Path], labeled: tuple[str, Path]) -> str:
    """One line: the TAO model's labeled accuracy minus the labeled arm's, paired on ``heldout``."""
    difference = paired_difference(settings, heldout, labeled, tao)
    behind = difference.startswith("-")
    verdict = "TAO behind the labeled arm" if behind else "TAO level with or ahead of the labeled arm"
    return f"TAO {tao[0]} - labeled SFT: {difference} ({verdict})"
