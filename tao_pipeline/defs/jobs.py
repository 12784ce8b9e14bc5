"""The two jobs the automation launches, and the code location's executor."""

import importlib.util
import json
from collections.abc import Mapping
from typing import Any

import dagster as dg

from tao_pipeline.defs.constants import INGEST_JOB, INGEST_STAGE, INGESTION_GROUP, ROUND_GROUP, ROUND_JOB, STAGE_TAG
from tao_pipeline.defs.partitions import log_batches_partitions, rounds_partitions
from tao_pipeline.defs.resources import startup_settings
from tao_pipeline.settings import SettingsError

# A round whose process was lost (killed with the daemon, out of memory, a reboot, a run that never started) is
# re-executed by Dagster's run retries from the stage it lost, reusing every cached shard; never one that failed
# on its own error (the instance sets retry_on_asset_or_op_failure: false). See cli/instance.py.
ROUND_RETRIES = 2
K8S_CONFIG_TAG = "dagster-k8s/config"  # read by the K8sRunLauncher: the round's pod (a GPU, a node selector)
ROUND_TAGS = {"dagster/max_retries": str(ROUND_RETRIES), "dagster/retry_strategy": "FROM_FAILURE"}


def round_run_tags(extra_tags: Mapping[str, Any] | None = None) -> dict[str, str]:
    """A round run's tags: flywheel.round_run_tags (a table as JSON, as Dagster reads it), then tao's own."""
    encoded = {key: value if isinstance(value, str) else json.dumps(value) for key, value in (extra_tags or {}).items()}
    _check_k8s_config(encoded)
    return {**encoded, **ROUND_TAGS}


def _check_k8s_config(tags: Mapping[str, str]) -> None:
    """A mistyped `dagster-k8s/config` would fail only when the K8sRunLauncher starts the round's pod: checked now, by
    dagster-k8s itself (the deploy extra), so the code location refuses to load and names the setting."""
    if K8S_CONFIG_TAG not in tags or importlib.util.find_spec("dagster_k8s") is None:
        return
    from dagster_k8s.job import get_user_defined_k8s_config

    try:
        get_user_defined_k8s_config({K8S_CONFIG_TAG: tags[K8S_CONFIG_TAG]})
    except Exception as error:  # noqa: BLE001 - dagster-k8s raises config errors and pydantic/kubernetes ones
        problem = " ".join(str(error).split())[:300]
        setting = f"flywheel.round_run_tags['{K8S_CONFIG_TAG}']"
        raise SettingsError(f"{setting} is not valid for Kubernetes: {problem}") from None


def round_job(extra_tags: Mapping[str, Any] | None = None):
    """The round job, with flywheel.round_run_tags (e.g. a GPU for the run's pod on Kubernetes) on every run."""
    return dg.define_asset_job(
        ROUND_JOB,
        selection=dg.AssetSelection.groups(ROUND_GROUP),
        partitions_def=rounds_partitions,
        tags=round_run_tags(extra_tags),
        description="One TAO round: prompts -> candidates -> scores -> pairs -> DPO -> evaluation -> promotion.",
    )


tao_round_job = round_job()
ingest_job = dg.define_asset_job(
    INGEST_JOB,
    selection=dg.AssetSelection.groups(INGESTION_GROUP),
    partitions_def=log_batches_partitions,
    tags={STAGE_TAG: INGEST_STAGE},  # queued beyond flywheel.max_concurrent_ingest_runs (cli/instance.py)
    description="Ingest one usage-log file into the usage_logs table.",
)


@dg.definitions
def jobs() -> dg.Definitions:
    # One process per run, as `tao round` does: with Dagster's default (a process per step) every
    # step would import torch and load a model again. Heavy steps are serialized by the gpu pool.
    tags = startup_settings().flywheel.round_run_tags
    return dg.Definitions(jobs=[round_job(tags), ingest_job], executor=dg.in_process_executor)
