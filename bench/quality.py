"""Quality: base model vs TAO vs the control arm, two consecutive rounds on the bundled demo logs.

Round 1 tunes the embedded base model on the demo prompts; round 2 replays every prompt from
the new champion (flywheel.replay_fraction=1). Both rounds train the control arm (the same
DPO run with random preference directions). Held-out accuracy is against the bundled labels,
which only evaluation reads. Prints the figures and how they compare with the targets:

- the TAO-tuned model's held-out accuracy at least 10 points above the base model's greedy;
- on at least one task, the tuned greedy answer reaches the base model's maj@8;
- the control within 2 points of the model it started from.

Then every arm on the demo's labeled held-out prompts, paired with the base model: TAO round 1, TAO
after the last round, the control, and the labeled arm TAO is measured against: supervised
fine-tuning (TRL SFT) of the base model on the gold answers of round 1's train prompts, with the
same LoRA, steps and learning rate (`bench/labeled.py`; the pipeline never sees those answers).

    .venv/bin/python bench/quality.py [--rounds 2] [--base-model-from ~/.tao] [--set key=value ...]
    .venv/bin/python bench/quality.py --tiny MODEL_DIR   # a tiny random model: the plumbing, in minutes
"""

from __future__ import annotations

import time

import pandas as pd
from common import DEMO, TINY_ROUND, bench_parser, fresh_home, show
from labeled import fixed_heldout, fixed_set_accuracy, train_labeled_arm, versus_labeled

from tao_pipeline.cli.runner import run_round
from tao_pipeline.data.lake import Lake
from tao_pipeline.evaluation import (
    collapse_alerts,
    compare_control,
    round_history,
    tuned_vs_sampling_table,
)
from tao_pipeline.registry import ModelStore
from tao_pipeline.settings import load_settings

TARGET_GAIN = 0.10
CONTROL_BAND = 0.02


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--set", dest="extra", action="append", default=[], help="another settings override")
    parser.add_argument("--tiny", help="a tiny model folder instead of the embedded model (checks the plumbing)")
    args = parser.parse_args()
    home = fresh_home("quality", args.base_model_from)
    overrides = ["evaluation.control_arm=true", "evaluation.test_time_k=8", *args.extra]
    if args.tiny:
        overrides += [*TINY_ROUND, f"model.base='{args.tiny}'", "evaluation.test_time_k=2"]
    print(f"home {home}; settings: defaults + {overrides}")
    started = time.perf_counter()
    for number in range(1, args.rounds + 1):
        round_overrides = overrides + (["flywheel.replay_fraction=1.0"] if number > 1 else [])
        report = run_round(DEMO, round_overrides, echo=print)
        if not report.completed:
            raise SystemExit(f"{report.round_id} failed; see `TAO_HOME={home} tao ui`")
        rows = Lake(load_settings(DEMO, round_overrides).lake_dir).read("checkpoint_evaluation", report.round_id)
        print(f"\n=== {report.round_id}: {report.verdict} ({report.seconds / 60:.1f} min)")
        show(
            "labeled held-out accuracy (base model with k=8 samples vs one greedy pass)", tuned_vs_sampling_table(rows)
        )
        show("stages", report.stages)
        print(f"\ncontrol: {compare_control(rows, load_settings(DEMO, overrides).evaluation).message}")
    print(f"\nall rounds: {(time.perf_counter() - started) / 60:.1f} min")
    summarize_against_targets(load_settings(DEMO, overrides))
    compare_arms(load_settings(DEMO, overrides), home, args.rounds)


def compare_arms(settings, home, rounds: int) -> None:
    """Base, TAO round 1, TAO after the last round, control and labeled SFT on the same labeled held-out prompts."""
    lake, store = Lake(settings.lake_dir), ModelStore(settings.models_dir)
    history = round_history(lake)
    first = history.iloc[0]
    base = store.ancestors(first["starting_model"])[-1]
    champion = store.champion(settings.model)
    control = lake.read("control_checkpoint", first["round"]).iloc[0]
    sft_name, sft_weights, examples = train_labeled_arm(settings, [first["round"]], home / "labeled")
    arms = {
        "TAO round 1": (first["tuned_model"], store.get(first["tuned_model"]).path),
        f"TAO champion after {rounds} rounds": (champion.version_id, champion.path),
        "control (round 1)": (control["version_id"], control["path"]) if control["enabled"] else None,
        f"labeled SFT ({examples} gold answers)": (sft_name, sft_weights),
    }
    heldout = fixed_heldout()
    accuracy = fixed_set_accuracy(settings, heldout, base.version_id, arms, store)
    table = [{"arm": f"base ({base.version_id})", "accuracy": accuracy["base"], "arm - base": ""}]
    table += [
        {"arm": name, "accuracy": accuracy[name], "arm - base": accuracy[f"{name}-base"]} for name in arms if arms[name]
    ]
    show(f"every arm on the {len(heldout)} labeled held-out prompts (paired with the base model)", pd.DataFrame(table))
    print("\n" + versus_labeled(settings, heldout, (champion.version_id, champion.path), (sft_name, sft_weights)))


def summarize_against_targets(settings) -> None:
    lake = Lake(settings.lake_dir)
    history = round_history(lake)
    show(
        "rounds",
        history[
            [
                "round",
                "starting_model",
                "tuned_model",
                "train_reward",
                "reward_before",
                "reward_after",
                "base_greedy_accuracy",
                "base_majority_accuracy",
                "accuracy_before",
                "accuracy_after",
                "control_accuracy",
            ]
        ],
    )
    alerts = collapse_alerts(history)
    print("\ncollapse guard: " + ("; ".join(alerts) if alerts else "no round where reward rose while accuracy fell"))
    champion = ModelStore(settings.models_dir).champion(settings.model).version_id
    final = _rows_where_tuned_is(lake, history, champion)
    base_greedy = history["base_greedy_accuracy"].iloc[0]
    if final is None:
        print(f"\nno round was promoted: the champion is still the base model {champion}")
        return
    table = tuned_vs_sampling_table(final).set_index("task")
    tuned = table.loc["all", "tuned greedy"]
    gain = tuned - base_greedy
    reached = [task for task in table.index if task != "all" and table.loc[task, "tuned_reaches_majority"]]
    print(
        f"\nTAO champion {champion}: held-out accuracy {tuned:.3f} vs base greedy {base_greedy:.3f} "
        f"= {gain * 100:+.1f} points (target >= +{TARGET_GAIN * 100:.0f}): "
        f"{'met' if gain >= TARGET_GAIN else 'NOT met'}"
    )
    print(
        f"tasks where the tuned greedy reaches the base model's maj@8: {reached or 'none'} "
        f"(target: at least one): {'met' if reached else 'NOT met'}"
    )
    for row in history.itertuples():
        drift = row.control_accuracy - row.accuracy_before
        print(
            f"{row.round}: control {row.control_accuracy:.3f} vs its starting model {row.accuracy_before:.3f} "
            f"= {drift * 100:+.1f} points (target within {CONTROL_BAND * 100:.0f}): "
            f"{'met' if abs(drift) <= CONTROL_BAND + 1e-9 else 'NOT met'}"
        )


def _rows_where_tuned_is(lake: Lake, history, version: str):
    match = history[history["tuned_model"] == version]
    return lake.read("checkpoint_evaluation", match["round"].iloc[-1]) if len(match) else None


if __name__ == "__main__":
    main()
