"""Bundled demo data: simulated LLM-app usage logs, evaluation-only labels, and the demo's settings.

Regenerate with ``python tao_pipeline/demo/make_demo_data.py``.
"""

from pathlib import Path

DEMO_LOGS = Path(__file__).resolve().parent / "usage_logs.jsonl"
DEMO_LABELS = Path(__file__).resolve().parent / "labels.jsonl"
DEMO_CONFIG = Path(__file__).resolve().parent / "demo.toml"  # what `tao demo` runs with
