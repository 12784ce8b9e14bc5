"""Is there signal for label-free tuning at all? The preflight answers per task before a round is spent.

For up to ``preflight.prompts_per_task`` train prompts per task, candidates are sampled exactly as
the round samples them (``generate_candidates``: the same model, sampling and response cache, so the
round reuses every sample) and scored with the configured scorer (through the score cache, which
the round's scoring reuses too). Per task it measures:

- agreement: the share of a prompt's samples that give its most common extracted answer;
- clear majority: the share of prompts whose top answer holds more than half of the samples;
- pairable: the share of prompts whose scores spread by ``pairs.min_margin`` (each gives a pair);
- with labels: how often one sample, the majority answer (maj@k) and the scorer's pick (best-of-k) are right.

The verdict: a task has signal when enough of its prompts give pairs and, with enough labeled
prompts, the scorer's pick beats one sample, or without them, self-consistency finds clear
majorities to pull towards. Labels only feed this report, never scoring or training.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tao_pipeline.common.threads import use_torch_threads
from tao_pipeline.evaluation.labels import label_key
from tao_pipeline.generation import CacheStats, GenerationStats, generate_candidates
from tao_pipeline.scoring import ScoreCache, TaoScorer, build_scorer, prompt_context, score_responses
from tao_pipeline.settings import PreflightSettings, TaoSettings

SELF_CONSISTENCY_SIGNAL = "self-consistency has signal"
SCORER_SIGNAL = "the scorer has signal"
NO_SIGNAL = "no signal: add a verifier or a judge"
PROMPT_COLUMNS = [
    "prompt_id",
    "task",
    "samples",
    "answered",
    "agreement",
    "clear_majority",
    "score_spread",
    "pairable",
    "new_tokens",
    "labeled",
    "one_sample_correct",
    "majority_correct",
    "best_of_k_correct",
]
TASK_COLUMNS = [
    "task",
    "prompts",
    "answered",
    "agreement_p10",
    "agreement_median",
    "agreement_p90",
    "clear_majority",
    "pairable",
    "mean_score_spread",
    "labeled",
    "one_sample",
    "maj_at_k",
    "best_of_k",
    "gain_margin",
    "signal",
    "verdict",
    "reason",
]


class NoPromptsError(ValueError):
    """There is no train prompt to sample."""


@dataclass
class PreflightReport:
    tasks: pd.DataFrame  # TASK_COLUMNS, one row per task
    prompts: pd.DataFrame  # PROMPT_COLUMNS, one row per sampled prompt
    model_version: str
    samples_per_prompt: int
    seconds: float  # the whole preflight: model load, sampling, scoring
    round_prompts: int  # the train prompts a round on the same pool generates for
    cache: CacheStats  # sampled prompts found in the response cache vs generated now
    generation: GenerationStats  # what was generated now

    @property
    def tasks_with_signal(self) -> int:
        return int(self.tasks["signal"].sum())

    def agreement_histogram(self) -> pd.DataFrame:
        """Per task, the share of prompts by how many of their samples give the majority answer (0 to k)."""
        votes = (self.prompts["agreement"] * self.prompts["samples"]).round().astype(int)
        counts = pd.crosstab(votes, self.prompts["task"], normalize="columns")
        counts = counts.reindex(range(self.samples_per_prompt + 1), fill_value=0.0)
        counts.index = [f"{v}/{self.samples_per_prompt}" for v in counts.index]
        return counts.round(3).rename_axis("agree").rename_axis(None, axis=1).reset_index()

    def table(self) -> pd.DataFrame:
        """The per-task table a person reads: shares, agreement quantiles, labeled accuracies ('-': no labels)."""
        tasks = self.tasks
        agreement = tasks[["agreement_p10", "agreement_median", "agreement_p90"]]
        table = pd.DataFrame(
            {
                "task": tasks["task"],
                "prompts": tasks["prompts"],
                "answered": tasks["answered"],
                "agreement p10/p50/p90": agreement.apply(lambda q: " / ".join(f"{v:.2f}" for v in q), axis=1),
                "clear majority": tasks["clear_majority"],
                "pairable": tasks["pairable"],
                "score spread": tasks["mean_score_spread"],
                "labeled": tasks["labeled"],
                "one sample": tasks["one_sample"],
                "maj@k": tasks["maj_at_k"],
                "best-of-k": tasks["best_of_k"],
            }
        )
        table = table.round(3)
        return table.astype(object).where(table.notna(), "-")

    def verdicts(self) -> list[str]:
        """One line per task: the verdict and why."""
        return [f"{row.task}: {row.verdict} ({row.reason})" for row in self.tasks.itertuples()]

    def generation_note(self) -> str:
        """What sampling cost now, and what a round's generation will cost at that speed."""
        stats, cache = self.generation, self.cache
        done = f"{len(self.prompts)} prompts x {self.samples_per_prompt} samples from {self.model_version}"
        done += (
            f" in {self.seconds / 60:.1f} min ({cache.generated_prompts} generated now, {cache.cached_prompts} cached)"
        )
        minutes = self.round_generation_minutes()
        if minutes is None:
            return done
        share = len(self.prompts) / self.round_prompts
        threads = stats.threads_metadata()
        on = f" on {threads['torch_threads']} torch threads ({threads['torch_threads_why']})" if threads else ""
        return (
            f"{done}; {stats.new_tokens} new tokens at {stats.tokens_per_second:.0f} tokens/s{on}: the round's "
            f"{self.round_prompts} train prompts need ~{minutes:.1f} min of generation, {share:.0%} of it sampled "
            "here (the round reuses these samples)"
        )

    def round_generation_minutes(self) -> float | None:
        """A round's whole candidate generation at the speed measured now; None if nothing was generated now."""
        if not self.generation.tokens_per_second or self.prompts.empty:
            return None
        tokens_per_prompt = float(self.prompts["new_tokens"].mean())
        return self.round_prompts * tokens_per_prompt / self.generation.tokens_per_second / 60


def train_prompts(prompts: pd.DataFrame) -> pd.DataFrame:
    """The prompts a round generates candidates for (its train split, when the table has one)."""
    return prompts[prompts["split"] == "train"] if "split" in prompts.columns else prompts


def choose_prompts(prompts: pd.DataFrame, per_task: int) -> pd.DataFrame:
    """Up to ``per_task`` prompts of each task, in prompt-id (content hash) order: a fixed, unbiased subset."""
    return prompts.sort_values("prompt_id").groupby("task", sort=True).head(per_task).reset_index(drop=True)


def run_preflight(
    prompts: pd.DataFrame,
    model_path: Path | str,
    model_version: str,
    settings: TaoSettings,
    labels: dict[str, list[str]] | None = None,
) -> PreflightReport:
    """Sample the chosen train prompts as the round would (same model, sampling and caches), score them, judge.

    Raises NoPromptsError when ``prompts`` holds no train prompt.
    """
    started = time.perf_counter()
    pool = train_prompts(prompts)
    if pool.empty:
        raise NoPromptsError("no train prompts to sample: ingest usage logs first (data.logs or the inbox)")
    chosen = choose_prompts(pool, settings.preflight.prompts_per_task)
    candidates = generate_candidates(chosen, model_path, model_version, settings)
    use_torch_threads(settings.generation.threads, "generation.threads")  # a scorer's own model runs torch too
    signals, tasks = assess_signal(
        chosen,
        candidates.responses,
        settings,
        labels or {},
        score_cache=ScoreCache(settings.cache_dir, settings.scoring),
        progress=True,
    )
    return PreflightReport(
        tasks=tasks,
        prompts=signals,
        model_version=model_version,
        samples_per_prompt=settings.generation.num_samples,
        seconds=time.perf_counter() - started,
        round_prompts=len(pool),
        cache=candidates.cache,
        generation=candidates.stats,
    )


def assess_signal(
    prompts: pd.DataFrame,
    responses: pd.DataFrame,
    settings: TaoSettings,
    labels: dict[str, list[str]],
    scorer: TaoScorer | None = None,
    score_cache: ScoreCache | None = None,
    progress: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score ``responses`` (RESPONSE_COLUMNS) and measure the signal: (one row per prompt, one row per task)."""
    scorer = scorer or build_scorer(settings.scoring, settings.cache_dir)
    scores = score_responses(responses, prompts, scorer, progress=progress, cache=score_cache)
    signals = prompt_signals(prompts, responses, scores, scorer, labels, settings.pairs.min_margin)
    return signals, task_table(signals, scorer, settings)


def prompt_signals(
    prompts: pd.DataFrame,
    responses: pd.DataFrame,
    scores: pd.DataFrame,
    scorer: TaoScorer,
    labels: dict[str, list[str]],
    min_margin: float,
) -> pd.DataFrame:
    """Per prompt: agreement on the extracted answer, the score spread, and (labeled) which answers are right."""
    table = responses[["response_id", "prompt_id", "sample_index", "completion_tokens"]].merge(
        scores[["response_id", "answer", "score"]], on="response_id"
    )
    groups = dict(iter(table.sort_values("sample_index").groupby("prompt_id", sort=False)))
    rows = [
        _prompt_row(prompt, groups[prompt.prompt_id], scorer, labels, min_margin)
        for prompt in prompts.itertuples()
        if prompt.prompt_id in groups
    ]
    return pd.DataFrame(rows, columns=PROMPT_COLUMNS)


def _prompt_row(prompt, group: pd.DataFrame, scorer: TaoScorer, labels: dict, min_margin: float) -> dict:
    answers = [answer if isinstance(answer, str) else None for answer in group["answer"]]
    votes = Counter(answer for answer in answers if answer is not None)
    majority, top = votes.most_common(1)[0] if votes else (None, 0)
    scores = [float(score) for score in group["score"]]
    known = [score for score in scores if not math.isnan(score)]
    spread = max(known) - min(known) if len(known) >= 2 else math.nan
    row = {
        "prompt_id": prompt.prompt_id,
        "task": prompt.task,
        "samples": len(answers),
        "answered": len(answers) - answers.count(None),
        "agreement": top / len(answers),
        "clear_majority": top > len(answers) / 2,
        "score_spread": spread,
        "pairable": spread > 1e-9 and spread >= min_margin,  # as preference_pairs decides; NaN is never pairable
        "new_tokens": int(group["completion_tokens"].sum()),
        "labeled": False,
    }
    accepted = labels.get(label_key(prompt.prompt, getattr(prompt, "history", None)))
    if accepted:
        context = prompt_context(prompt)
        correct = [scorer.matches_label(context, answer, accepted) for answer in answers]
        # The scorer's pick, as best-of-k in evaluation: the top known score, the earliest sample on a tie.
        best = max(range(len(scores)), key=lambda i: (-math.inf if math.isnan(scores[i]) else scores[i], -i))
        row.update(
            labeled=True,
            one_sample_correct=sum(correct) / len(correct),
            majority_correct=float(scorer.matches_label(context, majority, accepted)),
            best_of_k_correct=float(correct[best]),
        )
    return row


def task_table(signals: pd.DataFrame, scorer: TaoScorer, settings: TaoSettings) -> pd.DataFrame:
    """One row per task: the label-free signals, labeled accuracies where labels exist, and the verdict."""
    rows = []
    for task, group in signals.groupby("task", sort=True):
        labeled = group[group["labeled"]]
        row = {
            "task": task,
            "prompts": len(group),
            "answered": group["answered"].sum() / group["samples"].sum(),
            "agreement_p10": group["agreement"].quantile(0.1),
            "agreement_median": group["agreement"].median(),
            "agreement_p90": group["agreement"].quantile(0.9),
            "clear_majority": group["clear_majority"].mean(),
            "pairable": group["pairable"].mean(),
            "mean_score_spread": group["score_spread"].mean(),
            "labeled": len(labeled),
            "one_sample": labeled["one_sample_correct"].mean() if len(labeled) else math.nan,
            "maj_at_k": labeled["majority_correct"].mean() if len(labeled) else math.nan,
            "best_of_k": labeled["best_of_k_correct"].mean() if len(labeled) else math.nan,
            "gain_margin": _margin_95(labeled["best_of_k_correct"] - labeled["one_sample_correct"]),
        }
        votes = _votes(scorer, task)
        signal, reason = verdict(row, votes, settings.preflight)
        verdict_text = (SELF_CONSISTENCY_SIGNAL if votes else SCORER_SIGNAL) if signal else NO_SIGNAL
        rows.append({**row, "signal": signal, "verdict": verdict_text, "reason": reason})
    return pd.DataFrame(rows, columns=TASK_COLUMNS)


def _margin_95(gains: pd.Series) -> float:
    """Half the width of a 95% interval around the mean per-prompt gain (normal approximation)."""
    return 1.96 * gains.std() / math.sqrt(len(gains)) if len(gains) >= 2 else math.nan


def _votes(scorer: TaoScorer, task: str) -> bool:
    """Does the task's recipe rank by self-consistency (a positive weight or a gate)?"""
    recipe = scorer.recipe(task)
    return recipe.weights.get("self_consistency", 0.0) > 0 or "self_consistency" in recipe.gates


def verdict(row: dict, votes: bool, preflight: PreflightSettings) -> tuple[bool, str]:
    """(has signal, why): pairs to train on, and labels that confirm the scorer's pick or else clear majorities."""
    tests = [
        (
            row["pairable"] >= preflight.min_pairable_share,
            f"pairs from {row['pairable']:.0%} of prompts",
            f"preflight.min_pairable_share={preflight.min_pairable_share}",
        )
    ]
    if row["labeled"] >= preflight.min_labeled_prompts:
        gain = row["best_of_k"] - row["one_sample"]
        tests.append(
            (
                gain >= preflight.min_accuracy_gain,
                f"best-of-k right {gain:+.3f} (±{row['gain_margin']:.3f}) more often than one sample "
                f"on {row['labeled']} labeled prompts",
                f"preflight.min_accuracy_gain={preflight.min_accuracy_gain}",
            )
        )
    elif votes:
        tests.append(
            (
                row["clear_majority"] >= preflight.min_clear_majority_share,
                f"a clear majority on {row['clear_majority']:.0%} of prompts",
                f"preflight.min_clear_majority_share={preflight.min_clear_majority_share}",
            )
        )
    else:
        tests.append((True, "no labels and no vote: whether the scorer's pick is right is not measured", ""))
    failed = [f"{finding}, below {setting}" for passed, finding, setting in tests if not passed]
    return not failed, "; ".join(failed or [finding for _, finding, _ in tests])
