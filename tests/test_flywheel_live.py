"""The live flywheel, unattended, under faults: `bench/flywheel.py --tiny` (CI's short version of
`make bench-flywheel`): serve -> inbox -> sensors -> round -> promotion -> swap, with the daemon
SIGKILLed mid-round, the catalog locked and the upstream killed; the bench asserts its invariants."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow(minutes=2)  # real servers and a real daemon

BENCH = Path(__file__).resolve().parents[1] / "bench" / "flywheel.py"


def test_the_flywheel_turns_by_itself_under_faults(tiny_model_dir, tmp_path):
    command = [sys.executable, str(BENCH), "--tiny", str(tiny_model_dir), "--prompts", "40", "--late-prompts", "10",
               "--kill-after-s", "3", "--lock-s", "5", "--outage-s", "6", "--round-wait-s", "480"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    output = result.stdout + result.stderr[-3000:]
    assert result.returncode == 0, output
    assert "invariants hold" in result.stdout
    figures = {
        cells[1].strip(): cells[2].strip()
        for line in result.stdout.splitlines()
        if line.startswith("| ") and len(cells := line.split("|")) == 4
    }
    assert figures["failed outside the upstream outage"] == "0" and figures["rounds completed"] == "1"
    assert int(figures["rows logged by the server"]) == int(figures["requests served"])
    assert float(figures["minutes from promotion to the first answer by it"]) < 1.0
