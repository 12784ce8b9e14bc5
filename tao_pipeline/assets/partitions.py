"""Rounds: one dynamic partition per turn of the flywheel (round-0001, round-0002, ...)."""

import dagster as dg

ROUNDS = "rounds"
rounds_partitions = dg.DynamicPartitionsDefinition(name=ROUNDS)


def round_key(number: int) -> str:
    return f"round-{number:04d}"


def next_round_key(existing: list[str]) -> str:
    numbers = [int(key.split("-")[1]) for key in existing if key.startswith("round-") and key[6:].isdigit()]
    return round_key(max(numbers, default=0) + 1)


LOG_BATCHES = "log_batches"
log_batches_partitions = dg.DynamicPartitionsDefinition(name=LOG_BATCHES)
