"""One training process, as `accelerate launch` starts it on each GPU (see :mod:`.distributed`).

python -m tao_pipeline.training.worker job.json
"""

from __future__ import annotations

import sys
from pathlib import Path

from tao_pipeline.training.distributed import read_job, save_result
from tao_pipeline.training.methods import run_training
from tao_pipeline.training.trainer import TrainingResult


def run_job(job_file: Path) -> TrainingResult:
    job = read_job(job_file)
    result = run_training(job)
    save_result(job.output_dir, result)
    return result


if __name__ == "__main__":
    run_job(Path(sys.argv[1]))
