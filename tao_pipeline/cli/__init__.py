"""The command line (`tao ...`) and the headless runner it drives Dagster with; above the domain and defs/."""

from tao_pipeline.cli.commands import main

__all__ = ["main"]
