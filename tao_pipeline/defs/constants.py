"""Names the Dagster definitions share: jobs, asset groups, partitions and the pool of heavy steps."""

ROUND_JOB = "tao_round"
INGEST_JOB = "ingest_usage_logs"
ROUND_GROUP = "tao_round"
INGESTION_GROUP = "ingestion"
ROUNDS = "rounds"  # one dynamic partition per round: round-0001, round-0002, ...
LOG_BATCHES = "log_batches"  # one dynamic partition per ingested usage-log file
# Ingest runs carry this tag; the instance limits how many run at once (flywheel.max_concurrent_ingest_runs).
STAGE_TAG, INGEST_STAGE = "tao/stage", "ingest"
# Generation, training and evaluation; `dagster instance concurrency set gpu 1` queues them (docs/deployment.md).
HEAVY_POOL = "gpu"
MIRROR_JOB = "mirror_lake"
STORAGE_GROUP = "storage"
