"""The live flywheel, unattended, under faults: `bench/flywheel.py --tiny` (CI's short version of
`make bench-flywheel`): serve -> inbox -> sensors -> round -> offline gate -> swap, with the daemon
SIGKILLed mid-round, the catalog locked and the upstream killed; the bench asserts its invariants.
Once on the embedded default (the instance in SQLite files), promoting after the offline gate, and once
on Postgres, the production layout, with the live phases: the round's challenger shadowed then canaried
and promoted by the daemon's live decision (the faults again during its stages), then a challenger tuned
upside down shadowed, canaried and rolled back (README, "The live flywheel")."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.postgres import running_postgres

pytestmark = pytest.mark.slow(minutes=2)  # real servers and a real daemon

BENCH = Path(__file__).resolve().parents[1] / "bench" / "flywheel.py"
URL_ENV = "TAO_TEST_POSTGRES_URL"
WHO = ("the round's challenger", "a challenger known to be worse")


@pytest.mark.parametrize("instance", ["sqlite", pytest.param("postgres", marks=pytest.mark.slow(minutes=4))])
def test_the_flywheel_turns_by_itself_under_faults(tiny_model_dir, tmp_path, instance):
    command = [sys.executable, str(BENCH), "--tiny", str(tiny_model_dir), "--prompts", "40", "--late-prompts", "10",
               "--kill-after-s", "3", "--lock-s", "5", "--outage-s", "6", "--round-wait-s", "480"]  # fmt: skip
    if instance == "sqlite":
        command += ["--no-live"]  # promotion after the offline gate
        result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    else:
        with running_postgres() as url:
            environment = {**os.environ, URL_ENV: url}
            command += ["--set", f"storage.postgres_url_env='{URL_ENV}'"]
            # 40 users, 16 requests every 2 s: ~40 s a stage on an idle machine, bounded beside the other tests.
            command += ["--live-users", "40", "--live-batch", "16", "--live-pause-s", "2", "--live-wait-s", "400"]
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
    if instance == "postgres":
        real, worse = (next(v for k, v in figures.items() if k.startswith(f"live: {who} (")) for who in WHO)
        assert real.startswith("promoted (shadow: passed shadow; canary 50%: promoted)"), real
        assert worse.startswith("rolled back (shadow: passed shadow; canary 50%: rolled back)"), worse
        for who in WHO:  # printed: how long each decision took, on how many pairs, and who saw the version
            seconds, pairs = figures[f"live: {who}: seconds to the decision / pairs it rests on"].split(" / ")
            saw, users = figures[f"live: {who}: users who saw it / answers it gave"].split(" / ")[0].split(" of ")
            assert float(seconds) > 0 and int(pairs) >= 10 and 0 < int(saw) < int(users) == 40, figures
