"""Do rounds compound? Three rounds on the demo logs arriving in thirds, with the control arm.

Round 1 gets the first third of the bundled demo logs; round 2 the second third plus a replay of
prompts already used; round 3 the last third plus replay (flywheel.replay_fraction). Every round
trains the control arm (the same DPO run on random preference directions) next to the real one.

Each round's own gate sees only that round's held-out prompts. To compare rounds on one
yardstick, after every round the base model, the round's challenger, its control and the
champion answer the demo's whole labeled held-out set (the same prompts each time): accuracy with
Wilson intervals, and each model's paired difference to the base model with Newcombe's score
interval and McNemar's p. Also per round, why it could (not) add anything: prompts, pairs built, and the
share of train prompts whose candidates all gave the same answer (no pair can come from those).

    .venv/bin/python bench/rounds.py [--rounds 3] [--replay 0.5] [--set key=value ...] [--base-model-from ~/.tao]
    .venv/bin/python bench/rounds.py --rounds 5 --set "flywheel.start_from='challenger'"   # stack unproven rounds
    .venv/bin/python bench/rounds.py --rounds 5 --replay 1 --set "flywheel.start_from='base'"   # retrain the base
    .venv/bin/python bench/rounds.py --rounds 5 --replay 1 --recipe demo   # the chosen recipe, all traffic replayed
    .venv/bin/python bench/rounds.py --tiny MODEL_DIR   # a tiny random model: the plumbing, in a minute

--recipe short (the default) tunes with 6 samples and 30 DPO steps a round, as the promise test does;
--recipe demo with the recipe `make bench-recipe` chose and the demo round uses (8 samples, 2 epochs
over the round's pairs). Both skip the base model's maj@k evaluation, which does not change a model.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
from common import DEMO, RECIPES, TINY_ROUND, bench_parser, fresh_home, show
from labeled import fixed_heldout, fixed_set_accuracy, train_labeled_arm, versus_labeled

from tao_pipeline.cli.runner import run_round
from tao_pipeline.data.lake import Lake
from tao_pipeline.evaluation.verdict import VERDICTS_TABLE, RoundVerdict
from tao_pipeline.registry import ModelStore
from tao_pipeline.settings import load_settings


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--replay", type=float, default=0.5, help="flywheel.replay_fraction from round 2 on")
    parser.add_argument("--set", dest="extra", action="append", default=[], help="another settings override")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="short", help="the tuning recipe (see above)")
    parser.add_argument("--tiny", help="a tiny model folder instead of the embedded model (checks the plumbing)")
    args = parser.parse_args()
    home = fresh_home("rounds", args.base_model_from)
    arrivals = split_logs(home, args.rounds)
    recipe = TINY_ROUND if args.tiny else RECIPES[args.recipe]
    base = ["evaluation.control_arm=true", "data.logs=[]", *recipe, *args.extra]
    if args.tiny:
        base.append(f"model.base='{args.tiny}'")
    settings = load_settings(DEMO, base)
    heldout = fixed_heldout()
    print(f"home {home}; settings: demo + {base}; fixed held-out set: {len(heldout)} labeled prompts")
    started, table = time.perf_counter(), []
    for number, arrival in enumerate(arrivals, start=1):
        settings.inbox_dir.mkdir(parents=True, exist_ok=True)
        arrival.rename(settings.inbox_dir / arrival.name)  # the next third of the traffic arrives
        overrides = base + ([f"flywheel.replay_fraction={args.replay}"] if number > 1 else [])
        report = run_round(DEMO, overrides, echo=print)
        if not report.completed:
            raise SystemExit(f"{report.round_id} failed: {report.failure}; see `TAO_HOME={home} tao ui`")
        print(f"\n=== {report.round_id}: {report.verdict} ({report.seconds / 60:.1f} min)")
        table.append(round_row(settings, report.round_id, heldout, report.seconds))
        show("rounds so far (accuracy on the fixed held-out set)", pd.DataFrame(table))
    print(f"\nall rounds: {(time.perf_counter() - started) / 60:.1f} min")
    against_labeled(settings, home, [row["round"] for row in table], heldout)


def against_labeled(settings, home: Path, round_ids: list[str], heldout: pd.DataFrame) -> None:
    """The champion after every round against the labeled arm: SFT of the base model on the gold answers of
    every train prompt the rounds saw, with as many steps as the rounds took together."""
    name, weights, examples = train_labeled_arm(settings, round_ids, home / "labeled")
    store = ModelStore(settings.models_dir)
    champion = store.champion(settings.model)
    base = store.ancestors(champion.version_id)[-1]
    arms = {"champion": (champion.version_id, champion.path), f"labeled SFT ({examples} gold answers)": (name, weights)}
    accuracy = fixed_set_accuracy(settings, heldout, base.version_id, arms, store)
    show("the champion after every round and the labeled arm (fixed held-out set)", pd.DataFrame([accuracy]))
    print("\n" + versus_labeled(settings, heldout, arms["champion"], (name, weights)))


def split_logs(home: Path, parts: int) -> list[Path]:
    """The demo logs in ``parts`` consecutive slices, staged beside the inbox (renamed into it one by one)."""
    lines = (Path(DEMO).parent / "usage_logs.jsonl").read_text(encoding="utf-8").splitlines()
    staging = home / "arrivals"
    staging.mkdir(parents=True)
    size = -(-len(lines) // parts)
    paths = []
    for part in range(parts):
        path = staging / f"usage-part-{part + 1}.jsonl"
        path.write_text("\n".join(lines[part * size : (part + 1) * size]) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def round_row(settings, round_id: str, heldout: pd.DataFrame, seconds: float) -> dict:
    lake, store = Lake(settings.lake_dir), ModelStore(settings.models_dir)
    verdict = RoundVerdict.from_frame(lake.read(VERDICTS_TABLE, round_id))
    control = lake.read("control_checkpoint", round_id).iloc[0]
    base = store.ancestors(verdict.champion_version)[-1]
    champion = store.champion(settings.model)
    models = {  # name -> (version, weights); control checkpoints are kept out of the registry
        "challenger": (verdict.challenger_version, store.get(verdict.challenger_version).path),
        "control": (control["version_id"], control["path"]) if control["enabled"] else None,
        "champion": (champion.version_id, champion.path),
    }
    accuracy = fixed_set_accuracy(settings, heldout, base.version_id, models, store)
    prompts = lake.read("raw_prompts", round_id)
    train = prompts[prompts["split"] == "train"]
    earlier = [lake.read("raw_prompts", r) for r in lake.partitions("raw_prompts") if r < round_id]
    used_before = set(pd.concat(earlier)["prompt_id"]) if earlier else set()
    return {
        "round": round_id,
        "minutes": round(seconds / 60, 1),
        "train_prompts": len(train),
        "replayed": int(train["prompt_id"].isin(used_before).sum()),
        "started_from": lake.read("candidate_responses", round_id)["model_version"].iloc[0],
        "weights_from": lake.read("tuned_checkpoint", round_id)["weights_from"].iloc[0],
        "pairs": len(lake.read("preference_pairs", round_id)),
        "all_agree": round(all_agree_share(lake, round_id), 3),
        "gate": verdict.promotion.evidence or ("promoted" if verdict.promote else "kept"),
        "gate_win_rate": f"{verdict.promotion.win_rate:.3f} {verdict.promotion.win_rate_interval} "
        f"n={verdict.promotion.heldout}",
        **accuracy,
        "champion_after": champion.version_id,
    }


def all_agree_share(lake: Lake, round_id: str) -> float:
    """Share of the round's train prompts whose candidates all gave the same (extracted) answer."""
    scores = lake.read("response_scores", round_id)
    distinct = scores.groupby("prompt_id")["answer"].nunique(dropna=False)
    return float((distinct == 1).mean()) if len(distinct) else 0.0


if __name__ == "__main__":
    main()
