"""The training recipe by measurement: DPO arms on the same pairs, from the same base model, side by side.

One demo round (the embedded model, the bundled logs, the demo's settings) makes the round's preference pairs
and tunes them with today's recipe: that checkpoint is the `default` arm. Each other arm changes one thing in
`training` (precision, learning rate, beta, epochs) and tunes the base model on exactly those pairs, with the
same seed and LoRA. Every arm is then answered greedily on the demo's labeled held-out prompts (labels read here,
never by the pipeline), paired with the base model and with the default arm: accuracy with its Wilson interval,
the difference with Newcombe's interval, McNemar's p. Training seconds per arm are measured in this run, one
arm after another on the same machine.

Scorer arms instead score the round's candidates another way (the self-certainty scorer, alone or beside the
demo's vote), build their own pairs, and tune the base model with the default recipe for as many steps as the
default arm took: the same candidates and the same training budget, another signal. The method arm tunes the
base model with GRPO on the round's train prompts, the round's scorer as its reward, for as many steps.

    .venv/bin/python bench/recipe.py [--arm NAME=key=value[,key=value...]] [--base-model-from ~/.tao]
    .venv/bin/python bench/recipe.py --groups scorer,method   # the scorer arms and GRPO only
    .venv/bin/python bench/recipe.py --family procedural   # on a generated task family (bench/procedural.py)
    .venv/bin/python bench/recipe.py --tiny MODEL_DIR   # a tiny random model: the plumbing, in minutes
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
from common import DEMO, TINY_ROUND, bench_parser, fresh_home, show
from labeled import fixed_heldout, fixed_set_accuracy, paired_difference
from procedural import TASKS, family_overrides, write_family

from tao_pipeline.cli.runner import run_round
from tao_pipeline.data.lake import Lake
from tao_pipeline.registry import ModelStore
from tao_pipeline.scoring import build_scorer, score_responses
from tao_pipeline.settings import load_settings
from tao_pipeline.training.dpo import train_dpo
from tao_pipeline.training.methods import TrainingJob, run_training
from tao_pipeline.training.pairs import build_pairs

# One change each from the demo's recipe (bf16 autocast where the CPU has it, lr 5e-5, beta 0.1, 2 epochs).
ARMS = {
    "fp32": ["training.bf16=false"],
    "lr 1e-4": ["training.learning_rate=1e-4"],
    "beta 0.05": ["training.beta=0.05"],
    "3 epochs": ["training.epochs=3"],
}


# GRPO on the round's train prompts with the round's own scorer as the reward (online RL from the label-free
# vote, as TTRL does), for as many steps as the default DPO arm took.
METHOD_ARMS = {"grpo (same steps)": ["training.method='grpo'"]}

# Each task's format verifier in its recipe (the demo's, and the generated family's: bench/procedural.py).
DEMO_RECIPES = {"short_answer": "concise_format", "arithmetic": "number_format"}
FAMILY_RECIPES = dict.fromkeys(TASKS, "number_format")


def scorer_arms_for(recipes: dict[str, str]) -> dict[str, list[str]]:
    """Every task scored by the model's own confidence (the base model's: scoring.options.self_certainty.model is
    set to it), alone and beside the task's own recipe (the vote plus its format verifier)."""
    return {
        "self-certainty": [f"scoring.scorers.{task}={{self_certainty=1.0}}" for task in recipes],
        "vote + self-certainty": [
            f"scoring.scorers.{task}={{self_consistency=1.0, {fmt}=0.25, self_certainty=0.5}}"
            for task, fmt in recipes.items()
        ],
    }


def parse_arms(items: list[str]) -> dict[str, list[str]]:
    """--arm 'NAME=key=value,key=value' (repeatable) instead of the built-in arms."""
    arms = {}
    for item in items:
        name, _, overrides = item.partition("=")
        if not name or not overrides:
            raise SystemExit(f"--arm {item!r}: expected NAME=key=value[,key=value...]")
        arms[name] = overrides.split(",")
    return arms


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--arm", action="append", default=[], help="NAME=key=value[,key=value...] (repeatable)")
    parser.add_argument("--scorer-arm", action="append", default=[], help="NAME=scoring overrides (repeatable)")
    parser.add_argument(
        "--groups",
        default="training,scorer,method",
        help="which arms beside the default: training (one setting each), scorer, method (GRPO); comma-separated",
    )
    parser.add_argument(
        "--family", choices=("demo", "procedural"), default="demo", help="the demo logs, or bench/procedural.py's"
    )
    parser.add_argument("--tiny", help="a tiny model folder instead of the embedded model (checks the plumbing)")
    args = parser.parse_args()
    groups = set(args.groups.split(","))
    arms = (parse_arms(args.arm) if args.arm else ARMS) if "training" in groups else {}
    recipes = FAMILY_RECIPES if args.family == "procedural" else DEMO_RECIPES
    scorer_arms = (
        (parse_arms(args.scorer_arm) if args.scorer_arm else scorer_arms_for(recipes)) if "scorer" in groups else {}
    )
    method_arms = METHOD_ARMS if "method" in groups else {}
    home = fresh_home("recipe", args.base_model_from)
    overrides = [*TINY_ROUND, f"model.base='{args.tiny}'"] if args.tiny else []
    if args.family == "procedural":
        overrides += family_overrides(*write_family(home / "family"))
    print(f"home {home}; arms: {arms}; scorer arms: {scorer_arms}; method arms: {method_arms}")

    report = run_round(DEMO, overrides, echo=print)
    if not report.completed:
        raise SystemExit(f"{report.round_id} failed; see `TAO_HOME={home} tao ui`")
    settings = load_settings(DEMO, overrides)
    lake, store = Lake(settings.lake_dir), ModelStore(settings.models_dir)
    pairs = lake.read("preference_pairs", report.round_id)
    tuned = lake.read("tuned_checkpoint", report.round_id).iloc[0]
    base_id = store.ancestors(tuned["version_id"])[-1].version_id
    trained = {"default": (tuned["version_id"], Path(store.get(tuned["version_id"]).path))}
    seconds = {"default": report.stages.set_index("stage")["seconds"].get("tuned_checkpoint")}
    history = json.loads((trained["default"][1] / "training_log.json").read_text())
    steps = max(entry.get("step", 0) for entry in history)
    loss = [entry["loss"] for entry in history if "loss" in entry][-1]
    print(f"\n{len(pairs)} pairs from {report.round_id}")
    print(f"default ({tuned['version_id']}): {steps} steps, final loss {loss:.3f}, {seconds['default']:.0f} s")

    for name, arm in arms.items():
        training = load_settings(DEMO, [*overrides, *arm]).training
        out = home / "arms" / name.replace(" ", "-")
        started = time.perf_counter()
        result = train_dpo(store.get(base_id).path, pairs, training, out, progress=True)
        seconds[name] = time.perf_counter() - started
        trained[name] = (f"arm-{name.replace(' ', '-')}", out)
        print(f"{name}: {result.steps} steps, final loss {result.series('loss')[-1]:.3f}, {seconds[name]:.0f} s")

    for name, arm in scorer_arms.items():
        arm_settings = load_settings(
            DEMO,
            [
                *overrides,
                *arm,
                f"scoring.options.self_certainty.model='{store.get(base_id).path}'",
                f"training.max_steps={steps}",  # the default arm's budget
            ],
        )
        out = home / "arms" / name.replace(" ", "-").replace("+", "and")
        started = time.perf_counter()
        arm_pairs = rescored_pairs(lake, report.round_id, arm_settings)
        result = train_dpo(store.get(base_id).path, arm_pairs, arm_settings.training, out, progress=True)
        seconds[name] = time.perf_counter() - started
        trained[name] = (f"arm-{out.name}", out)
        print(
            f"{name}: {len(arm_pairs)} pairs, {result.steps} steps, final loss {result.series('loss')[-1]:.3f}, "
            f"{seconds[name]:.0f} s (scoring included)"
        )

    for name, arm in method_arms.items():
        arm_settings = load_settings(DEMO, [*overrides, *arm, f"training.max_steps={steps}"])
        out = home / "arms" / name.split(" ")[0]
        prompts = lake.read("raw_prompts", report.round_id)
        job = TrainingJob(
            "grpo", store.get(base_id).path, out, arm_settings, prompts=prompts[prompts["split"] == "train"]
        )
        started = time.perf_counter()
        result = run_training(job)
        seconds[name] = time.perf_counter() - started
        trained[name] = (f"arm-{out.name}", out)
        rewards = result.series("reward") or [float("nan")]
        print(f"{name}: {result.steps} steps, reward {rewards[0]:.3f} -> {rewards[-1]:.3f}, {seconds[name]:.0f} s")

    heldout = fixed_heldout(overrides)
    table = pd.DataFrame([fixed_set_accuracy(settings, heldout, base_id, trained, store)]).T.reset_index()
    table.columns = ["model", "labeled accuracy on the fixed held-out set (vs base)"]
    show(f"every arm on the {len(heldout)} labeled held-out prompts, paired with the base model", table)
    versus_default = [
        {
            "arm": name,
            "training seconds": round(float(seconds[name] or 0)),
            "arm - default": paired_difference(settings, heldout, trained["default"], trained[name]),
        }
        for name in [*arms, *scorer_arms, *method_arms]
    ]
    show("each arm against the default recipe, paired on the same prompts", pd.DataFrame(versus_default))


def rescored_pairs(lake: Lake, round_id: str, settings) -> pd.DataFrame:
    """The round's candidates scored with ``settings.scoring``, paired as the round pairs them."""
    prompts, candidates = lake.read("raw_prompts", round_id), lake.read("candidate_responses", round_id)
    scores = score_responses(candidates, prompts, build_scorer(settings.scoring, settings.cache_dir))
    pairs, _ = build_pairs(prompts, candidates, scores, settings.pairs.min_margin)
    return pairs


if __name__ == "__main__":
    main()
