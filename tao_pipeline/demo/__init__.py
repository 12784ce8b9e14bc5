"""Bundled demo data: simulated LLM-app usage logs and evaluation-only labels.

Regenerate with ``python tao_pipeline/demo/make_demo_data.py``.
"""

from pathlib import Path

DEMO_LOGS = Path(__file__).resolve().parent / "usage_logs.jsonl"
DEMO_LABELS = Path(__file__).resolve().parent / "labels.jsonl"
