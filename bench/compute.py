"""Quality against tuning compute: one demo round at each setting of the compute_scale knob.

compute_scale multiplies the samples per prompt and the DPO steps of a round (see the setting's
description). Each setting runs one round in its own fresh home on the same prompts, from the
same embedded base model, and is measured the same way: the tuned model's labeled accuracy on the
round's held-out prompts (Wilson interval), its paired difference to the base model (Newcombe's
score interval, McNemar p), the gate's win rate with its interval, wall minutes, and the tokens
generated for tuning (candidates) and for evaluation. ``--seeds`` runs each setting once per seed
(``generation.seed`` and ``training.seed``: other samples, another adapter initialisation and example
order), each in its own home, on the same held-out prompts. Writes a markdown report and the curve
as a PNG (``--out``, default bench/results/compute).

    .venv/bin/python bench/compute.py [--scales 0.25 0.5 1 2] [--seeds 0 1] [--set k=v ...] [--out DIR]
        [--base-model-from HOME]
    .venv/bin/python bench/compute.py --tiny MODEL_DIR   # a tiny random model: the plumbing, in minutes
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from common import DEMO, RECIPES, TINY_ROUND, bench_parser, fresh_home, show  # noqa: E402

from tao_pipeline.cli.runner import run_round  # noqa: E402
from tao_pipeline.data.lake import Lake  # noqa: E402
from tao_pipeline.evaluation.significance import accuracy_test, format_p, proportion_interval  # noqa: E402
from tao_pipeline.evaluation.verdict import VERDICTS_TABLE, RoundVerdict  # noqa: E402
from tao_pipeline.settings import load_settings  # noqa: E402


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--scales", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one round per setting and seed")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "compute"))
    parser.add_argument("--tiny", help="a tiny model folder instead of the embedded model (checks the plumbing)")
    parser.add_argument("--set", dest="extra", action="append", default=[], help="another settings override")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="short", help="short: 6 samples, 30 DPO steps at "
                        "scale 1; demo: the chosen recipe, 8 samples, 2 epochs")  # fmt: skip
    args = parser.parse_args()
    base = [*(TINY_ROUND if args.tiny else RECIPES[args.recipe]), *args.extra] + (
        [f"model.base='{args.tiny}'"] if args.tiny else []
    )
    source = args.base_model_from
    table = []
    for scale in args.scales:
        for seed in args.seeds:
            home = fresh_home(f"compute-{scale}-seed{seed}", source)
            overrides = [*base, f"compute_scale={scale}", f"generation.seed={seed}", f"training.seed={seed}"]
            settings = load_settings(DEMO, overrides)
            print(
                f"\n=== compute_scale {scale}, seed {seed}: {settings.generation.num_samples} samples per prompt, "
                f"{settings.training.max_steps or f'{settings.training.epochs:g} epochs of'} DPO steps (home {home})"
            )
            started = time.perf_counter()
            report = run_round(DEMO, overrides, echo=print)
            if not report.completed:
                raise SystemExit(f"compute_scale {scale}, seed {seed}: {report.round_id} failed: {report.failure}")
            table.append(measure(settings, report.round_id, scale, seed, time.perf_counter() - started))
            show("quality against tuning compute so far", pd.DataFrame(table).drop(columns=_PLOT_ONLY))
            if not args.tiny:  # later settings copy the converted base model instead of converting it again
                source = source or str(home)
    frame = pd.DataFrame(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compute_curve.png").write_bytes(curve(frame))
    (out / "report.md").write_text(report_markdown(frame), encoding="utf-8")
    print(f"\nreport: {out / 'report.md'}\nplot:   {out / 'compute_curve.png'}")


_PLOT_ONLY = ["accuracy", "low", "high", "base_accuracy"]


def measure(settings, round_id: str, scale: float, seed: int, seconds: float) -> dict:
    lake = Lake(settings.lake_dir)
    rows = lake.read("checkpoint_evaluation", round_id)
    verdict = RoundVerdict.from_frame(lake.read(VERDICTS_TABLE, round_id)).promotion
    confidence = settings.evaluation.confidence
    test = accuracy_test(rows["champion_correct"], rows["challenger_correct"], confidence)
    hits = int(rows["challenger_correct"].dropna().astype(bool).sum())
    interval = proportion_interval(hits, test.n, confidence)
    candidates = lake.read("candidate_responses", round_id)
    tuned = lake.read("tuned_checkpoint", round_id).iloc[0]
    return {
        "compute_scale": scale,
        "seed": seed,
        "samples_per_prompt": settings.generation.num_samples,
        "dpo_steps": int(tuned["steps"]),
        "pairs": len(lake.read("preference_pairs", round_id)),
        "tuning_tokens": int(candidates["completion_tokens"].sum()),
        "minutes": round(seconds / 60, 1),
        "base accuracy": f"{test.champion:.3f} {test.champion_interval}",
        "tuned accuracy": f"{test.challenger:.3f} {interval}",
        "tuned - base": f"{test.difference:+.3f} {test.difference_interval} p={format_p(test.mcnemar_p)}",
        "win rate": f"{verdict.win_rate:.3f} {verdict.win_rate_interval}",
        "gate": "promoted" if verdict.promote else verdict.evidence,
        "accuracy": test.challenger,
        "low": interval.low,
        "high": interval.high,
        "base_accuracy": test.champion,
    }


def curve(frame: pd.DataFrame) -> bytes:
    import io

    figure, axis = plt.subplots(figsize=(6.4, 3.8))
    for marker, (seed, rows) in zip(itertools.cycle("osd^v"), frame.groupby("seed")):  # every seed, however many
        errors = [rows["accuracy"] - rows["low"], rows["high"] - rows["accuracy"]]
        axis.errorbar(rows["tuning_tokens"], rows["accuracy"], yerr=errors, marker=marker, capsize=4,
                      label=f"tuned model, seed {seed}", alpha=0.8)  # fmt: skip
    for row in frame.itertuples():
        axis.annotate(f"x{row.compute_scale:g}", (row.tuning_tokens, row.accuracy), textcoords="offset points",
                      xytext=(6, -12), fontsize=8)  # fmt: skip
    axis.axhline(frame["base_accuracy"].iloc[0], color="grey", linestyle="--", label="base model")
    axis.set_xscale("log")
    axis.set(
        title="Held-out labeled accuracy vs tuning compute (95% intervals)",
        xlabel="tokens generated for tuning (log scale)",
        ylabel="accuracy",
    )
    axis.legend(fontsize=8)
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    return buffer.getvalue()


def report_markdown(frame: pd.DataFrame) -> str:
    shown = frame.drop(columns=_PLOT_ONLY)
    per_scale = frame.groupby("compute_scale").agg(
        seeds=("seed", "count"),
        mean_tuned_accuracy=("accuracy", "mean"),
        min_tuned=("accuracy", "min"),
        max_tuned=("accuracy", "max"),
        base_accuracy=("base_accuracy", "first"),
    )
    return "\n".join(
        [
            "# Quality against tuning compute (bench/compute.py)",
            "",
            shown.to_markdown(index=False),
            "",
            "Per setting, over its seeds (the same held-out prompts):",
            "",
            per_scale.round(3).to_markdown(),
            "",
            "![accuracy against tuning compute](compute_curve.png)",
            "",
        ]
    )


if __name__ == "__main__":
    main()
