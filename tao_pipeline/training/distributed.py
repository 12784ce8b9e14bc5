"""Training under `accelerate launch` (one process per GPU, DeepSpeed/FSDP): the job file and the launch.

    accelerate launch --config_file configs/accelerate/multi_gpu.yaml -m tao_pipeline.training.worker job.json

The job file names the method, the parent model, the round's pairs or prompts (Parquet), the
settings and the output folder; every process runs :mod:`tao_pipeline.training.worker`, TRL's
trainers handle the distribution, and rank 0 saves the checkpoint and ``training_result.json``.
``training.accelerate_config`` makes a round train this way.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

from tao_pipeline.settings import TaoSettings
from tao_pipeline.training.methods import TrainingJob
from tao_pipeline.training.trainer import TrainingResult, is_main_process

RESULT_FILE = "training_result.json"
WORKER_MODULE = "tao_pipeline.training.worker"


def write_job(folder: Path, job: TrainingJob) -> Path:
    """The job as files in ``folder`` (job.json plus Parquet tables), for the worker processes to read."""
    folder.mkdir(parents=True, exist_ok=True)
    tables = {}
    for name, table in (("pairs", job.pairs), ("prompts", job.prompts)):
        if table is not None:
            table.to_parquet(folder / f"{name}.parquet", index=False)
            tables[name] = str(folder / f"{name}.parquet")
    spec = {
        "method": job.method,
        "parent_path": str(job.parent_path),
        "output_dir": str(job.output_dir),
        "settings": json.loads(job.settings.model_dump_json()),
        **tables,
    }
    path = folder / "job.json"
    path.write_text(json.dumps(spec, indent=1))
    return path


def read_job(job_file: Path) -> TrainingJob:
    spec = json.loads(Path(job_file).read_text())
    tables = {name: pd.read_parquet(spec[name]) for name in ("pairs", "prompts") if spec.get(name)}
    return TrainingJob(
        spec["method"],
        spec["parent_path"],
        Path(spec["output_dir"]),
        TaoSettings.model_validate(spec["settings"]),
        **tables,
    )


def launch(job_file: Path, accelerate_config: Path) -> TrainingResult:
    """Run the job under `accelerate launch`; raise with the tail of its output if it fails."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(accelerate_config),
        "-m",
        WORKER_MODULE,
        str(job_file),
    ]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"accelerate launch failed ({completed.returncode}):\n{completed.stderr[-3000:]}")
    output = Path(json.loads(job_file.read_text())["output_dir"])
    saved = json.loads((output / RESULT_FILE).read_text())
    return TrainingResult(
        saved["steps"], saved["seconds"], saved["log_history"], history_turns_cut=saved.get("history_turns_cut", 0)
    )


def save_result(output_dir: Path, result: TrainingResult) -> None:
    """Rank 0 records what it trained, for :func:`launch` to read back."""
    if is_main_process():
        (output_dir / RESULT_FILE).write_text(
            json.dumps(
                {
                    "steps": result.steps,
                    "seconds": result.seconds,
                    "log_history": result.log_history,
                    "history_turns_cut": result.history_turns_cut,
                }
            )
        )
