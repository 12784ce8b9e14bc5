"""The live flywheel, unattended, under faults: `bench/flywheel.py --tiny` (CI's short version of
`make bench-flywheel`): serve -> inbox -> sensors -> round -> promotion -> swap, with the daemon
SIGKILLed mid-round, the catalog locked and the upstream killed; the bench asserts its invariants.
Once on the embedded default (the instance in SQLite files) and once on Postgres, the production layout;
both promote after the offline gate (the bench's live phases run by hand: README, "The live flywheel")."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.postgres import running_postgres

pytestmark = pytest.mark.slow(minutes=2)  # real servers and a real daemon

BENCH = Path(__file__).resolve().parents[1] / "bench" / "flywheel.py"
URL_ENV = "TAO_TEST_POSTGRES_URL"


@pytest.mark.parametrize("instance", ["sqlite", "postgres"])
def test_the_flywheel_turns_by_itself_under_faults(tiny_model_dir, tmp_path, instance):
    command = [sys.executable, str(BENCH), "--tiny", str(tiny_model_dir), "--prompts", "40", "--late-prompts", "10",
               "--kill-after-s", "3", "--lock-s", "5", "--outage-s", "6", "--round-wait-s", "480"]  # fmt: skip
    # Promotion after the offline gate (--no-live). The live phases are not in CI yet: beside the other tests
    # on 2 cores, the tiny run's ingestion fell behind its live traffic and a phase waited past its limit.
    command += ["--no-live"]
    if instance == "sqlite":
        result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    else:
        with running_postgres() as url:
            environment = {**os.environ, URL_ENV: url}
            command += ["--set", f"storage.postgres_url_env='{URL_ENV}'"]
            result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path, env=environment)
    output = result.stdout + result.stderr[-3000:]
    assert result.returncode == 0, output
    assert "invariants hold" in result.stdout
    figures = {
        cells[1].strip(): cells[2].strip()
        for line in result.stdout.splitlines()
        if line.startswith("| ") and len(cells := line.split("|")) == 4
    }
    assert figures["failed outside the upstream outage"] == "0" and figures["rounds completed"] == "1"
    # The daemon died with the round's run worker: Dagster's run retries re-executed it once.
    assert figures["round runs that lost their process / resumes"] == "1 / 1"
    answers, shadows = figures["of them: answers the app got / shadow answers nobody saw"].split(" / ")
    assert int(answers) == int(figures["requests served"])
    logged, ingested = int(figures["rows logged by the server"]), int(figures["rows ingested"])
    assert logged == int(answers) + int(shadows) == ingested + int(figures["rows quarantined (with a reason)"])
    assert float(figures["minutes from promotion to the front serving it to everyone"]) < 1.0
