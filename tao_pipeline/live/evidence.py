"""The live experiment's evidence, read from the lake: the answers ``tao serve`` logged during it.

Shadow: every request has the champion's answer and the challenger's (``live_pair`` links them);
the two are scored together by the task's scorers, and each pair gives one difference. Canary:
the two versions answered different conversations; each answer is worth its score alone (or, with
``live.metric = "feedback"``, its user's rating), and each is paired with the other version's answer
next to it in time (:mod:`tao_pipeline.common.pairing`). :func:`tao_pipeline.live.sequential.decide` turns
the differences into promote / roll back / continue, and a latency guard rolls back a challenger
much slower than the champion whatever its answers are worth.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import pandas as pd

from tao_pipeline.common.pairing import paired_in_time
from tao_pipeline.data.ingest.writer import EVENTS_TABLE, USAGE_TABLE
from tao_pipeline.data.lake import Lake
from tao_pipeline.live.report import refresh_live_report
from tao_pipeline.live.sequential import CONTINUE, PROMOTE, ROLL_BACK, LiveVerdict, decide
from tao_pipeline.registry import LiveExperiment, ModelStore
from tao_pipeline.settings import TaoSettings

ANSWER_COLUMNS = [
    "response_id", "response", "response_model", "live_arm", "live_pair", "latency_ms", "rating",
    "prompt_id", "prompt", "system", "history", "task", "constraints",
]  # fmt: skip


@dataclass
class LiveOutcome:
    verdict: LiveVerdict
    table: pd.DataFrame  # per arm: answers, mean worth, rated answers, p95 latency
    acted: str | None = None  # what was done in the registry, if anything
    evidence: dict = field(default_factory=dict)


def live_answers(lake: Lake, experiment: LiveExperiment) -> pd.DataFrame:
    """The answers of the experiment's two versions logged since it started, with their users' mean ratings."""
    logs = lake.scan(USAGE_TABLE)
    if logs is None:
        return pd.DataFrame(columns=[*ANSWER_COLUMNS, "received_at"])
    events = lake.scan(EVENTS_TABLE)
    ratings = (
        f"SELECT response_id, avg(rating) AS event_rating FROM {events} "
        "WHERE kind = 'feedback' AND rating IS NOT NULL GROUP BY response_id"
        if events
        else "SELECT NULL::VARCHAR AS response_id, NULL::DOUBLE AS event_rating WHERE false"
    )
    columns = set(lake.sql(f"SELECT * FROM {logs} LIMIT 0").columns)
    if not {"live_arm", "live_pair", "latency_ms"} <= columns:
        return pd.DataFrame(columns=[*ANSWER_COLUMNS, "received_at"])  # written before tao serve logged live arms
    # When the server answered; rows ingested before answered_at existed have only their ingestion time.
    answered = "coalesce(u.answered_at, u.received_at)" if "answered_at" in columns else "u.received_at"
    selected = ", ".join(f"u.{c}" for c in ANSWER_COLUMNS if c != "rating")
    return lake.sql(
        f"SELECT {selected}, coalesce(r.event_rating, u.rating) AS rating, {answered} AS received_at, u.line_number "
        f"FROM {logs} u LEFT JOIN ({ratings}) r USING (response_id) "
        f"WHERE u.live_arm IS NOT NULL AND {answered} >= $started "
        f"AND u.response_model IN ($champion, $challenger) ORDER BY {answered}, u.source_file, u.line_number",
        {
            "started": experiment.started_at,
            "champion": experiment.champion_version,
            "challenger": experiment.version_id,
        },
    )


def shadow_differences(answers: pd.DataFrame, scorer) -> np.ndarray:
    """Challenger minus champion, per request both answered, scored together by the task's scorers
    (NaN where either answer could not be scored)."""
    from tao_pipeline.scoring import score_responses

    shadows = answers[answers["live_arm"] == "shadow"].dropna(subset=["live_pair"])
    champions = answers[answers["live_arm"] == "champion"].drop_duplicates("response_id")
    pairs = shadows.merge(champions, left_on="live_pair", right_on="response_id", suffixes=("", "_champion"))
    if pairs.empty:
        return np.array([])
    keys = pairs["live_pair"]
    candidates = pd.concat(
        [
            pd.DataFrame({"response_id": f"{side}:" + keys, "prompt_id": keys, "response": pairs[column]})
            for side, column in (("challenger", "response"), ("champion", "response_champion"))
        ],
        ignore_index=True,
    )
    context = ["prompt", "system", "history", "task", "constraints"]
    prompts = pairs[[f"{c}_champion" for c in context]].set_axis(context, axis=1).assign(prompt_id=keys.to_numpy())
    scores = score_responses(candidates, prompts, scorer, progress=False).set_index("response_id")["score"]
    return scores.reindex("challenger:" + keys).to_numpy() - scores.reindex("champion:" + keys).to_numpy()


def canary_differences(answers: pd.DataFrame, scorer, metric: str) -> np.ndarray:
    """A canary answer's worth minus that of the champion answer next to it in time (NaN: not scored).

    Answers (with ``metric = "feedback"``, rated answers) are taken in the order they were given; each
    waits for the other version's next one, and an older one still waiting is dropped. So at a small
    share each canary answer meets a champion answer of the same moment, not one given long before,
    and whatever changes with time (the traffic's mix, an outage) touches both sides of a pair alike.
    """
    answers = answers[answers["live_arm"].isin(["canary", "champion"])]
    if metric == "feedback":
        answers = answers[answers["rating"].notna()]
    worth = _worth(answers, scorer, metric)
    return np.asarray(paired_in_time((answers["live_arm"] == "canary").tolist(), worth.tolist()), dtype=float)


def _worth(answers: pd.DataFrame, scorer, metric: str) -> np.ndarray:
    if metric == "feedback":
        return (np.clip(answers["rating"].to_numpy(dtype=float), -1.0, 1.0) + 1) / 2
    from tao_pipeline.scoring import score_responses

    if answers.empty:
        return np.array([])
    alone = answers.assign(prompt_id=answers["response_id"])  # each answer its own group
    scores = score_responses(alone[["response_id", "prompt_id", "response"]], alone, scorer, progress=False)
    return scores.set_index("response_id")["score"].reindex(answers["response_id"]).to_numpy(dtype=float)


def arm_table(answers: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for arm, group in answers.groupby("live_arm", sort=True):
        latency = group["latency_ms"].dropna()
        rows.append(
            {
                "arm": arm,
                "version": ", ".join(sorted(group["response_model"].dropna().unique())),
                "answers": len(group),
                "rated": int(group["rating"].notna().sum()),
                "mean rating": round(float(group["rating"].mean()), 3) if group["rating"].notna().any() else None,
                "p95 latency ms": round(float(latency.quantile(0.95)), 1) if len(latency) else None,
            }
        )
    return pd.DataFrame(rows, columns=["arm", "version", "answers", "rated", "mean rating", "p95 latency ms"])


def latency_guard(answers: pd.DataFrame, experiment: LiveExperiment, settings) -> str | None:
    """Why the challenger must go on latency alone, or None."""
    challenger_arm = "shadow" if experiment.mode == "shadow" else "canary"
    challenger = answers.loc[answers["live_arm"] == challenger_arm, "latency_ms"].dropna()
    champion = answers.loc[answers["live_arm"] == "champion", "latency_ms"].dropna()
    if min(len(challenger), len(champion)) < settings.min_latency_answers:
        return None
    ratio = float(challenger.quantile(0.95)) / max(float(champion.quantile(0.95)), 1e-9)
    if ratio > settings.max_latency_ratio:
        return (
            f"latency guard: the challenger's p95 is {ratio:.2f}x the champion's "
            f"(live.max_latency_ratio={settings.max_latency_ratio})"
        )
    return None


def live_decision(settings: TaoSettings, store: ModelStore, experiment: LiveExperiment, act: bool) -> LiveOutcome:
    """The evidence so far and its decision; with ``act``, a conclusive one is carried out in the registry."""
    from tao_pipeline.scoring import build_scorer

    live = settings.live
    answers = live_answers(Lake(settings.lake_dir), experiment)
    scorer = build_scorer(settings.scoring, settings.cache_dir)
    if experiment.mode == "shadow":
        differences = shadow_differences(answers, scorer)
    else:
        differences = canary_differences(answers, scorer, live.metric)
    unscored = int((~np.isfinite(differences)).sum())  # a scorer that failed: left out, and said so
    differences = differences[np.isfinite(differences)]
    hours = (datetime.now(UTC).replace(tzinfo=None) - experiment.started_at).total_seconds() / 3600
    verdict = decide(differences, margin=live.margin, confidence=live.confidence, min_pairs=live.min_pairs,
                     max_pairs=live.max_pairs, hours=hours, max_hours=live.max_hours)  # fmt: skip
    if unscored:
        note = f" ({unscored} pairs left out: an answer could not be scored)"
        verdict = dataclasses.replace(verdict, reason=verdict.reason + note)
    guard = latency_guard(answers, experiment, live)
    if guard is not None:
        verdict = LiveVerdict(ROLL_BACK, verdict.n, verdict.mean, verdict.low, verdict.high, guard)
    table = arm_table(answers)
    evidence = {
        **verdict.as_dict(),
        "unscored_pairs": unscored,
        "mode": experiment.mode,
        "metric": live.metric,
        "arms": table.to_dict("records"),
    }
    outcome = LiveOutcome(verdict, table, None, evidence)
    if act and verdict.decision != CONTINUE:
        outcome.acted = _act(settings, store, experiment, verdict.decision == PROMOTE, evidence)
    return outcome


STAGE_ORDER = ("shadow", "canary")  # what no user sees comes before what some users see


def next_stage(stages: list[str], mode: str) -> str | None:
    """The first of live.stages that comes after ``mode`` (shadow before canary); None when none does: passing
    ``mode`` promotes. A stage started by hand that live.stages leaves out leads to the configured stages after
    it: `tao shadow` with live.stages = ['canary'] goes on to the canary, it never promotes from a shadow."""
    later = [stage for stage in stages if STAGE_ORDER.index(stage) > STAGE_ORDER.index(mode)]
    return later[0] if later else None


def _act(settings: TaoSettings, store: ModelStore, experiment: LiveExperiment, passed: bool, evidence: dict):
    """Carry a conclusive decision out in the registry; what was done, or None if the experiment had ended."""
    version = experiment.version_id
    following = next_stage(settings.live.stages, experiment.mode) if passed else None
    if following is not None:
        advanced = store.advance_live(following, settings.live.share, evidence)
        done = f"{version} passed its {experiment.mode}: now {following}" if advanced is not None else None
    else:
        ended = store.end_live("promoted" if passed else "rolled back", evidence, promote=passed)
        done = None if ended is None else (
            f"{version} is the champion" if passed
            else f"{version} rolled back; {experiment.champion_version} answers everyone"
        )  # fmt: skip
    if done is not None:
        refresh_live_report(store, settings.reports_dir, version)
    return done
