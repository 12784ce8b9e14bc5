"""Evaluation on held-out prompts that can't fool us.

For each held-out prompt (never trained on):

- champion vs challenger: both answer greedily; both answers are scored by the round's composite
  scorer against a reference pool of samples drawn from both models, so neither model's own
  habits decide the consensus (the label-free win rate);
- test-time compute: the base model's greedy answer (pass@1), its majority vote over k samples
  (maj@k) and its best-of-k under the scorer, against the tuned model's single greedy answer;
- the control arm (when trained): a model tuned on the same pairs with random preference
  directions; if it gains as much as the real run, the gain is not from the scorer's signal.

Labels, when configured, only feed the ``*_correct`` columns here; scoring, pairing and
training never see them. Every generation goes through the response cache, so the base
model's samples are drawn once across rounds.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tao_pipeline.generation import GenerationCache, SamplingParams, generation_cache, lazy_generator
from tao_pipeline.scoring import PromptContext, prompt_constraints
from tao_pipeline.scoring.extractors import answer_matches
from tao_pipeline.settings import EvaluationSettings, TaoSettings

SIDES = ("champion", "challenger", "control")
_PER_SIDE = ("version", "response", "answer", "score", "chars", "correct")
TEST_TIME = ("base_greedy", "base_majority", "base_best_of_k")
EVALUATION_COLUMNS = [
    "prompt_id", "task", "prompt", "outcome", "control_outcome",
    *(f"{side}_{field}" for side in SIDES for field in _PER_SIDE),
    "base_version", "k", *(f"{method}_{field}" for method in TEST_TIME for field in ("answer", "correct")),
    "base_sample_accuracy",
]


@dataclass(frozen=True)
class Contender:
    version_id: str
    path: Path | str


@dataclass
class _Answers:
    greedy: pd.Series  # prompt_id -> response
    samples: pd.Series  # prompt_id -> list of sampled responses


class _Sampler:
    """Greedy answers and sample pools for any model, through the response cache."""

    def __init__(self, settings: TaoSettings, cache: GenerationCache, progress: bool):
        self.settings, self.cache, self.progress = settings, cache, progress

    def answers(self, contender: Contender, heldout: pd.DataFrame, samples: int, seed_offset: int = 1) -> _Answers:
        evaluation, generation = self.settings.evaluation, self.settings.generation
        model = lazy_generator(contender.path, contender.version_id, self.settings)
        greedy = self._generate(model, heldout, SamplingParams(1, evaluation.max_new_tokens, greedy=True))
        pool = self._generate(model, heldout, SamplingParams(
            samples, evaluation.max_new_tokens, temperature=generation.temperature, top_p=generation.top_p,
            seed=generation.seed + seed_offset,
        ))
        model.close()  # a vLLM engine holds GPU memory until shut down; the next model comes next
        return _Answers(greedy.set_index("prompt_id")["response"], pool.groupby("prompt_id")["response"].apply(list))

    def _generate(self, model, heldout: pd.DataFrame, params: SamplingParams) -> pd.DataFrame:
        table, _ = self.cache.generate(model, heldout, params, progress=self.progress)
        return table


def evaluate(
    heldout: pd.DataFrame, champion: Contender, challenger: Contender, scorer, labels: dict[str, list[str]],
    settings: TaoSettings, progress: bool = True, *, base: Contender | None = None,
    control: Contender | None = None, cache: GenerationCache | None = None,
) -> pd.DataFrame:
    """One row per held-out prompt: greedy answers, scores, outcomes, test-time baselines and label checks."""
    evaluation = settings.evaluation
    sampler = _Sampler(settings, cache or generation_cache(settings), progress)
    answers = {"champion": sampler.answers(champion, heldout, evaluation.pool_samples),
               "challenger": sampler.answers(challenger, heldout, evaluation.pool_samples)}
    if control is not None:
        answers["control"] = sampler.answers(control, heldout, evaluation.pool_samples)
    base = base or champion
    k = evaluation.test_time_k
    base_samples = sampler.answers(base, heldout, k, seed_offset=2) if k else None
    versions = {"champion": champion, "challenger": challenger, "control": control}
    rows = [
        _row(prompt, answers, versions, base, base_samples, scorer, labels, k)
        for prompt in heldout.itertuples()
    ]
    return pd.DataFrame(rows, columns=EVALUATION_COLUMNS)


def _row(prompt, answers: dict[str, _Answers], versions: dict, base: Contender, base_samples: _Answers | None,
         scorer, labels: dict[str, list[str]], k: int) -> dict:
    context = PromptContext(prompt.prompt, prompt.task, prompt.system, prompt_constraints(prompt._asdict()))
    pid = prompt.prompt_id
    reference = answers["champion"].samples[pid] + answers["challenger"].samples[pid]
    accepted = labels.get(prompt.prompt.strip())
    extractor = scorer.consistency.extractor(prompt.task)

    def correct(answer: str | None) -> bool | None:
        return answer_matches(answer, accepted, extractor, prompt.prompt) if accepted else None

    row = {"prompt_id": pid, "task": prompt.task, "prompt": prompt.prompt, "base_version": base.version_id, "k": k}
    greedy = {side: a.greedy[pid] for side, a in answers.items()}
    # Each comparison scores the two greedy answers against the same champion+challenger reference pool.
    scores = scorer.score(context, [greedy["champion"], greedy["challenger"], *reference]).scores
    row["outcome"] = _outcome(scores[1], scores[0])
    side_scores = {"champion": scores[0], "challenger": scores[1]}
    if "control" in greedy:
        control_scores = scorer.score(context, [greedy["champion"], greedy["control"], *reference]).scores
        row["control_outcome"] = _outcome(control_scores[1], control_scores[0])
        side_scores["control"] = control_scores[1]
    for side in SIDES:
        response = greedy.get(side)
        answer = scorer.answers(context, [response])[0] if response is not None else None
        row.update({
            f"{side}_version": versions[side].version_id if versions[side] else None,
            f"{side}_response": response, f"{side}_answer": answer, f"{side}_score": side_scores.get(side),
            f"{side}_chars": len(response) if response is not None else None,
            f"{side}_correct": correct(answer) if response is not None else None,
        })
    if base_samples is not None:
        answers, sampled = _test_time_answers(context, base_samples, pid, scorer)
        for method, answer in answers.items():
            row[f"{method}_answer"], row[f"{method}_correct"] = answer, correct(answer)
        if accepted:
            row["base_sample_accuracy"] = sum(bool(correct(a)) for a in sampled) / len(sampled)
    return row


def _test_time_answers(
    context: PromptContext, base: _Answers, pid: str, scorer,
) -> tuple[dict[str, str | None], list[str | None]]:
    """pass@1 (greedy), maj@k (most common extracted answer), best-of-k (top score under the scorer); the samples' answers."""
    samples = base.samples[pid]
    extracted = scorer.answers(context, [base.greedy[pid], *samples])
    votes = Counter(a for a in extracted[1:] if a is not None)
    scores = scorer.score(context, samples).scores
    best = max(range(len(samples)), key=lambda i: (scores[i], -i))
    answers = {"base_greedy": extracted[0], "base_majority": votes.most_common(1)[0][0] if votes else None,
               "base_best_of_k": extracted[1 + best]}
    return answers, extracted[1:]


def _outcome(challenger_score: float, champion_score: float) -> str:
    if abs(challenger_score - champion_score) < 1e-9:
        return "tie"
    return "win" if challenger_score > champion_score else "loss"


def win_rate(outcomes: pd.Series) -> float:
    outcomes = outcomes.dropna()
    if outcomes.empty:
        return 0.0
    return float(((outcomes == "win").sum() + 0.5 * (outcomes == "tie").sum()) / len(outcomes))


def has_labels(rows: pd.DataFrame) -> bool:
    return bool(rows["champion_correct"].notna().any())


def has_control(rows: pd.DataFrame) -> bool:
    return bool(rows["control_response"].notna().any())


def summarize(rows: pd.DataFrame) -> pd.DataFrame:
    """The before/after table: one row per metric (overall and per task), champion vs challenger (vs control)."""
    table = []
    for task, subset in [("all", rows), *sorted(rows.groupby("task"))]:
        table.append(_metric_row(f"label-free score ({task})", subset, "score"))
        if has_labels(subset):
            table.append(_metric_row(f"labeled accuracy ({task})", subset, "correct"))
        table.append({"metric": f"challenger win rate ({task})", "champion": None,
                      "challenger": round(win_rate(subset["outcome"]), 3),
                      "control": round(win_rate(subset["control_outcome"]), 3) if has_control(subset) else None,
                      "n": len(subset)})
    table.append(_metric_row("mean response chars", rows, "chars"))
    table.append(_metric_row("median response chars", rows, "chars", statistic="median"))
    table.append(_metric_row("90th percentile response chars", rows, "chars", statistic=0.9))
    return pd.DataFrame(table, columns=["metric", "champion", "challenger", "control", "n"])


def _metric_row(metric: str, rows: pd.DataFrame, column: str, statistic: str | float = "mean") -> dict:
    values = {side: rows[f"{side}_{column}"].dropna().astype(float) for side in SIDES}

    def summary(v: pd.Series) -> float | None:
        if not len(v):
            return None
        return round(float(v.quantile(statistic) if isinstance(statistic, float) else v.agg(statistic)), 3)

    return {"metric": metric, **{side: summary(v) for side, v in values.items()}, "n": len(values["champion"])}


def tuned_vs_sampling_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Labeled accuracy per task: base pass@1, maj@k, best-of-k vs the tuned (and control) greedy answer.

    ``tuned_reaches_majority`` says whether one tuned greedy pass matches k base samples voting;
    without base sampling (``evaluation.test_time_k = 0``) the base columns are missing and it is None.
    """
    labeled = rows[rows["champion_correct"].notna()]
    table = []
    for task, subset in [("all", labeled), *sorted(labeled.groupby("task"))]:
        if subset.empty:
            continue
        # A table written by an older version may lack a column: that method shows as missing.
        accuracy = {name: _accuracy(subset[column]) if column in subset else None
                    for name, column in TEST_TIME_METHODS.items()}
        majority = accuracy["base maj@k"]
        table.append({"task": task, "n": len(subset), **accuracy,
                      "tuned_reaches_majority": None if majority is None else accuracy["tuned greedy"] >= majority})
    return pd.DataFrame(table, columns=["task", "n", *TEST_TIME_METHODS, "tuned_reaches_majority"])


TEST_TIME_METHODS = {
    "base pass@1": "base_greedy_correct", "base one sample": "base_sample_accuracy",
    "base maj@k": "base_majority_correct", "base best-of-k": "base_best_of_k_correct", "champion greedy": "champion_correct",
    "tuned greedy": "challenger_correct", "control greedy": "control_correct",
}


def _accuracy(column: pd.Series) -> float | None:
    values = column.dropna().astype(float)
    return round(float(values.mean()), 3) if len(values) else None


@dataclass(frozen=True)
class Verdict:
    promote: bool
    win_rate: float
    champion_accuracy: float | None
    challenger_accuracy: float | None
    length_ratio: float
    reason: str


def decide(rows: pd.DataFrame, settings: EvaluationSettings) -> Verdict:
    """Promote only when the challenger wins on the label-free score and no guard regresses.

    Guards: labeled accuracy (where labels exist) may not drop by more than
    evaluation.max_accuracy_drop; mean response length may not grow past evaluation.max_length_ratio.
    """
    rate = win_rate(rows["outcome"])
    labeled = rows[rows["champion_correct"].notna()]
    champion_acc = float(labeled["champion_correct"].astype(float).mean()) if len(labeled) else None
    challenger_acc = float(labeled["challenger_correct"].astype(float).mean()) if len(labeled) else None
    ratio = float(rows["challenger_chars"].mean() / max(rows["champion_chars"].mean(), 1.0)) if len(rows) else 1.0
    facts = (rate, champion_acc, challenger_acc, ratio)
    if rate <= settings.min_win_rate:
        return Verdict(False, *facts, f"win rate {rate:.3f} does not exceed evaluation.min_win_rate={settings.min_win_rate}")
    if champion_acc is not None and challenger_acc < champion_acc - settings.max_accuracy_drop:
        return Verdict(False, *facts, f"labeled accuracy fell {champion_acc:.3f} -> {challenger_acc:.3f}")
    if ratio > settings.max_length_ratio:
        return Verdict(False, *facts, f"responses grew {ratio:.2f}x longer (evaluation.max_length_ratio={settings.max_length_ratio})")
    return Verdict(True, *facts, f"win rate {rate:.3f} > {settings.min_win_rate}, no guard regressed")


@dataclass(frozen=True)
class ControlVerdict:
    """Does the real run gain more than a run trained on random preference directions?"""

    enabled: bool
    measure: str  # "labeled accuracy" or "label-free win rate"
    tao_gain: float = 0.0
    control_gain: float = 0.0
    alarm: bool = False
    message: str = "control arm off (evaluation.control_arm=false)"


def compare_control(rows: pd.DataFrame, settings: EvaluationSettings) -> ControlVerdict:
    if not has_control(rows):
        return ControlVerdict(False, "")
    if has_labels(rows):
        measure = "labeled accuracy"
        baseline = _accuracy(rows["champion_correct"])
        tao, control = _accuracy(rows["challenger_correct"]) - baseline, _accuracy(rows["control_correct"]) - baseline
    else:
        measure = "label-free win rate"
        tao, control = win_rate(rows["outcome"]) - 0.5, win_rate(rows["control_outcome"]) - 0.5
    alarm = control >= tao - settings.control_margin
    message = (
        f"CONTROL GAINS AS MUCH AS TAO: {measure} gain {control:+.3f} (random preference directions) vs "
        f"{tao:+.3f} (scored pairs); the improvement is not evidence that the scorer's signal helped"
        if alarm else f"TAO beats the control: {measure} gain {tao:+.3f} vs {control:+.3f} with random directions"
    )
    return ControlVerdict(True, measure, round(tao, 3), round(control, 3), alarm, message)
