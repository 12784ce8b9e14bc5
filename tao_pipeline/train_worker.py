"""One training process, as started by `accelerate launch` (one per GPU) for multi-GPU or DeepSpeed runs.

    accelerate launch --config_file configs/accelerate/multi_gpu.yaml -m tao_pipeline.train_worker job.json

The job file names the parent model, the round's pairs or prompts (Parquet), the settings and
the output folder; TRL's trainers handle the distribution, rank 0 saves the checkpoint and
writes ``training_result.json``. ``training.accelerate_config`` makes a round train this way.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

from tao_pipeline.settings import TaoSettings
from tao_pipeline.training import TrainingResult, is_main_process, train_dpo

RESULT_FILE = "training_result.json"


def write_job(folder: Path, parent_path: Path | str, settings: TaoSettings, output_dir: Path,
              pairs: pd.DataFrame, prompts: pd.DataFrame | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pairs.to_parquet(folder / "pairs.parquet", index=False)
    if prompts is not None:
        prompts.to_parquet(folder / "prompts.parquet", index=False)
    job = {"parent_path": str(parent_path), "output_dir": str(output_dir),
           "settings": json.loads(settings.model_dump_json()),
           "pairs": str(folder / "pairs.parquet"),
           "prompts": str(folder / "prompts.parquet") if prompts is not None else None}
    path = folder / "job.json"
    path.write_text(json.dumps(job, indent=1))
    return path


def launch(job_file: Path, accelerate_config: Path) -> TrainingResult:
    """Run the job under `accelerate launch`; raise with the tail of its output if it fails."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config),
               "-m", "tao_pipeline.train_worker", str(job_file)]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"accelerate launch failed ({completed.returncode}):\n{completed.stderr[-3000:]}")
    output = Path(json.loads(job_file.read_text())["output_dir"])
    saved = json.loads((output / RESULT_FILE).read_text())
    return TrainingResult(saved["steps"], saved["seconds"], saved["log_history"])


def run_job(job_file: Path) -> TrainingResult:
    job = json.loads(job_file.read_text())
    settings = TaoSettings.model_validate(job["settings"])
    output = Path(job["output_dir"])
    trust = settings.model.trust_remote_code
    if settings.training.method == "grpo":
        from tao_pipeline.grpo import train_grpo
        from tao_pipeline.scoring import build_scorer

        result = train_grpo(job["parent_path"], pd.read_parquet(job["prompts"]),
                            build_scorer(settings.scoring, settings.cache_dir), settings.training, output,
                            trust_remote_code=trust)
    else:
        result = train_dpo(job["parent_path"], pd.read_parquet(job["pairs"]), settings.training, output,
                           trust_remote_code=trust)
    if is_main_process():
        (output / RESULT_FILE).write_text(json.dumps(
            {"steps": result.steps, "seconds": result.seconds, "log_history": result.log_history}))
    return result


if __name__ == "__main__":
    run_job(Path(sys.argv[1]))
