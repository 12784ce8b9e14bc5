"""Rounds and log batches as dynamic partitions: a sensor (or the CLI) adds one per round or per file."""

import dagster as dg

from tao_pipeline.defs.constants import LOG_BATCHES, ROUND_GROUP, ROUNDS

rounds_partitions = dg.DynamicPartitionsDefinition(name=ROUNDS)
log_batches_partitions = dg.DynamicPartitionsDefinition(name=LOG_BATCHES)

# What every stage of a round shares: partitioned by round, shown as one group in the asset graph.
ROUND_STAGE = {"partitions_def": rounds_partitions, "group_name": ROUND_GROUP}
