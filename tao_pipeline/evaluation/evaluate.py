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

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tao_pipeline.evaluation.labels import label_key
from tao_pipeline.generation import GenerationCache, SamplingParams, generation_cache, lazy_generator
from tao_pipeline.scoring import PromptContext, TaoScorer, prompt_context
from tao_pipeline.settings import TaoSettings

SIDES = ("champion", "challenger", "control")
_PER_SIDE = ("version", "response", "answer", "score", "chars", "correct")
TEST_TIME = ("base_greedy", "base_majority", "base_best_of_k")
EVALUATION_COLUMNS = [
    "prompt_id",
    "task",
    "prompt",
    "outcome",
    "control_outcome",
    *(f"{side}_{field}" for side in SIDES for field in _PER_SIDE),
    "base_version",
    "k",
    *(f"{method}_{field}" for method in TEST_TIME for field in ("answer", "correct")),
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

    def first(self, count: int) -> _Answers:
        """The same answers with each prompt's first ``count`` samples."""
        return _Answers(self.greedy, self.samples.apply(lambda samples: samples[:count]))


def _evaluation_backend(settings: TaoSettings) -> TaoSettings:
    """The settings evaluation generates with: generation's, with evaluation.backend if one is set."""
    if settings.evaluation.backend is None:
        return settings
    generation = settings.generation.model_copy(update={"backend": settings.evaluation.backend})
    return settings.model_copy(update={"generation": generation})


class _Sampler:
    """Greedy answers and sample pools for any model, through the response cache."""

    def __init__(self, settings: TaoSettings, cache: GenerationCache, progress: bool):
        self.settings, self.cache, self.progress = _evaluation_backend(settings), cache, progress

    def answers(self, contender: Contender, heldout: pd.DataFrame, samples: int, seed_offset: int = 1) -> _Answers:
        evaluation, generation = self.settings.evaluation, self.settings.generation
        model = lazy_generator(contender.path, contender.version_id, self.settings)
        greedy = self._generate(model, heldout, SamplingParams(1, evaluation.max_new_tokens, greedy=True))
        pool = self._generate(
            model,
            heldout,
            SamplingParams(
                samples,
                evaluation.max_new_tokens,
                temperature=generation.temperature,
                top_p=generation.top_p,
                seed=generation.seed + seed_offset,
            ),
        )
        model.close()  # a vLLM engine holds GPU memory until shut down; the next model comes next
        return _Answers(greedy.set_index("prompt_id")["response"], pool.groupby("prompt_id")["response"].apply(list))

    def _generate(self, model, heldout: pd.DataFrame, params: SamplingParams) -> pd.DataFrame:
        table, _ = self.cache.generate(model, heldout, params, progress=self.progress)
        return table


def evaluate(
    heldout: pd.DataFrame,
    champion: Contender,
    challenger: Contender,
    scorer: TaoScorer,
    labels: dict[str, list[str]],
    settings: TaoSettings,
    progress: bool = True,
    *,
    base: Contender | None = None,
    control: Contender | None = None,
    cache: GenerationCache | None = None,
) -> pd.DataFrame:
    """One row per held-out prompt: greedy answers, scores, outcomes, test-time baselines and label checks."""
    evaluation = settings.evaluation
    sampler = _Sampler(settings, cache or generation_cache(settings), progress)
    base, k, pool = base or champion, evaluation.test_time_k, evaluation.pool_samples
    # When the champion is the base model (round 1), one draw of max(pool, k) samples serves as both its
    # reference pool and the test-time samples: nothing is generated twice.
    shared = base.version_id == champion.version_id and k > 0
    champion_answers = sampler.answers(champion, heldout, max(pool, k) if shared else pool)
    answers = {
        "champion": champion_answers.first(pool),
        "challenger": sampler.answers(challenger, heldout, pool),
    }
    if control is not None:
        answers["control"] = sampler.answers(control, heldout, pool)
    if shared:
        base_samples = champion_answers.first(k)
    else:
        base_samples = sampler.answers(base, heldout, k, seed_offset=2) if k else None
    versions = {"champion": champion, "challenger": challenger, "control": control}
    rows = [_row(prompt, answers, versions, base, base_samples, scorer, labels, k) for prompt in heldout.itertuples()]
    return pd.DataFrame(rows, columns=EVALUATION_COLUMNS)


def _row(
    prompt,
    answers: dict[str, _Answers],
    versions: dict,
    base: Contender,
    base_samples: _Answers | None,
    scorer: TaoScorer,
    labels: dict[str, list[str]],
    k: int,
) -> dict:
    context = prompt_context(prompt)
    pid = prompt.prompt_id
    reference = answers["champion"].samples[pid] + answers["challenger"].samples[pid]
    accepted = labels.get(label_key(prompt.prompt, getattr(prompt, "history", None)))

    def correct(answer: str | None) -> bool | None:
        return scorer.matches_label(context, answer, accepted) if accepted else None

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
        row.update(
            {
                f"{side}_version": versions[side].version_id if versions[side] else None,
                f"{side}_response": response,
                f"{side}_answer": answer,
                f"{side}_score": side_scores.get(side),
                f"{side}_chars": len(response) if response is not None else None,
                f"{side}_correct": correct(answer) if response is not None else None,
            }
        )
    if base_samples is not None:
        answers, sampled = _test_time_answers(context, base_samples, pid, scorer)
        for method, answer in answers.items():
            row[f"{method}_answer"], row[f"{method}_correct"] = answer, correct(answer)
        if accepted:
            row["base_sample_accuracy"] = sum(bool(correct(a)) for a in sampled) / len(sampled)
    return row


def _test_time_answers(
    context: PromptContext,
    base: _Answers,
    pid: str,
    scorer: TaoScorer,
) -> tuple[dict[str, str | None], list[str | None]]:
    """pass@1 (greedy), maj@k (most common extracted answer), best-of-k (top score under the scorer),
    and the samples' own answers."""
    samples = base.samples[pid]
    extracted = scorer.answers(context, [base.greedy[pid], *samples])
    votes = Counter(a for a in extracted[1:] if a is not None)
    scores = scorer.score(context, samples).scores
    # An unknown score never wins best-of-k.
    best = max(range(len(samples)), key=lambda i: (-math.inf if math.isnan(scores[i]) else scores[i], -i))
    answers = {
        "base_greedy": extracted[0],
        "base_majority": votes.most_common(1)[0][0] if votes else None,
        "base_best_of_k": extracted[1 + best],
    }
    return answers, extracted[1:]


def _outcome(challenger_score: float, champion_score: float) -> str | None:
    """win / loss / tie for the challenger; None when either score is unknown (it counts for neither)."""
    if math.isnan(challenger_score) or math.isnan(champion_score):
        return None
    if abs(challenger_score - champion_score) < 1e-9:
        return "tie"
    return "win" if challenger_score > champion_score else "loss"
