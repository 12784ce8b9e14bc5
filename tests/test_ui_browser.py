"""The Dagster UI end to end, as a person uses it: `tao ui` (webserver + daemon) on a loopback
port, driven by headless Chromium, and the same round through the UI's GraphQL API.

One `tao ui` serves the whole module: a fresh home (instance, lake, model store) and the tiny
random model, with a config whose promotion gate lets the tiny model's challenger through, so a
round ends in SUCCESS with `champion` materialized. The daemon's ingestion sensor ingests the
logs on its own, as it does for a user; the rounds are launched by hand: in the browser
(asset graph -> Materialize all -> add a partition -> launchpad config -> launch), then through
GraphQL (list assets, add the partition, launchRun, poll).

Needs Debian's chromium at /usr/bin/chromium (`make browser`, which `make test` runs first);
Playwright drives it, no `playwright install`. Screenshots and the server log go to
test-artifacts/ in the repo root.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import requests

from tao_pipeline.data.lake import Lake
from tao_pipeline.settings import TaoSettings, load_settings
from tests.helpers import ingest_assets, round_assets, write_tiny_config

pytestmark = [pytest.mark.ui, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
# Without the background-networking flags Chromium's own connections are refused on a closed network.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ROUND_ASSETS = [asset.key.to_user_string() for asset in round_assets()]
INGEST_ASSETS = [asset.key.to_user_string() for asset in ingest_assets()]
CHECK = "challenger_beats_champion"  # the blocking promotion gate on checkpoint_evaluation
UI_RUN_CONFIG = """\
resources:
  settings:
    config:
      overrides: ["generation.num_samples=2"]
"""
TERMINAL = {"SUCCESS", "FAILURE", "CANCELED"}
STARTUP_TIMEOUT_S = 150  # `tao ui` -> dagster dev -> webserver, daemon and code server, on a slow 2-core box
RUN_TIMEOUT_S = 300


# --- the server -----------------------------------------------------------------------------------


@dataclass
class Dagster:
    url: str
    location: str
    settings: TaoSettings
    log: Path
    process: subprocess.Popen

    def gql(self, query: str, **variables) -> dict:
        response = requests.post(f"{self.url}/graphql", json={"query": query, "variables": variables}, timeout=60)
        response.raise_for_status()
        body = response.json()
        assert "errors" not in body, body["errors"]
        return body["data"]

    @property
    def repository(self) -> dict:
        return {"repositoryName": "__repository__", "repositoryLocationName": self.location}

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ui_config(directory: Path, tiny_model_dir: Path) -> Path:
    """The tiny round config, plus: a promotion gate the tiny model passes (its challenger ties the
    champion: win rate 0.5), quick sensors, rounds only by hand, every round taking every prompt."""
    config = write_tiny_config(directory, tiny_model_dir)
    text = config.read_text()
    text = _with_section(
        text, "evaluation", ["min_win_rate = 0.0", "max_accuracy_drop = 1.0", "max_length_ratio = 1000.0"]
    )
    text = _with_section(
        text,
        "flywheel",
        ["sensor_interval_s = 5", "min_new_prompts = 100000", "replay_fraction = 1.0", 'schedule_cron = "0 0 1 1 *"'],
    )
    config.write_text(text)
    return config


def _with_section(text: str, section: str, lines: list[str]) -> str:
    header = f"[{section}]\n"
    body = "".join(f"{line}\n" for line in lines)
    return text.replace(header, header + body, 1) if header in text else f"{text}\n{header}{body}"


# Kills the server's process group should this pytest process die without its teardown (SIGKILL, OOM).
_WATCHDOG = """
import os, signal, sys, time
parent, group = int(sys.argv[1]), int(sys.argv[2])
while True:
    time.sleep(1)
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        break
    try:
        os.kill(parent, 0)
    except ProcessLookupError:
        os.killpg(group, signal.SIGKILL)
        break
"""


def _process_tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the whole session (tao ui, dagster dev, webserver, daemon, code servers, run and step
    workers), then SIGKILL whatever is left, by group and by the tree seen before the signal."""
    tree = _process_tree(process.pid)
    for sig, grace in [(signal.SIGTERM, 5), (signal.SIGKILL, 5)]:
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        for child in tree:
            try:
                child.send_signal(sig)
            except psutil.Error:  # gone already (psutil also refuses a reused pid)
                pass
        _, alive = psutil.wait_procs(tree, timeout=grace)
        if not alive and process.poll() is not None:
            break
    process.wait(timeout=10)


def _wait_until(predicate, timeout: float, what: str, server: subprocess.Popen, log: Path, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(
                f"`tao ui` exited ({server.returncode}) while waiting for {what}:\n"
                + log.read_text(errors="replace")[-4000:]
            )
        try:
            value = predicate()
        except requests.RequestException:
            value = None
        if value:
            return value
        time.sleep(every)
    raise AssertionError(
        f"timed out after {timeout:.0f}s waiting for {what}:\n" + log.read_text(errors="replace")[-4000:]
    )


@pytest.fixture(scope="module")
def dagster(tmp_path_factory, tiny_model_dir) -> Iterator[Dagster]:
    """`tao ui` on 127.0.0.1:<free port> in its own session; its daemon ingests the logs meanwhile."""
    directory = tmp_path_factory.mktemp("ui")
    config = _ui_config(directory, tiny_model_dir)
    settings = load_settings(config)
    port = _free_port()
    log = directory / "tao-ui.log"
    env = {
        **os.environ,
        "TAO_CONFIG": str(config),
        "TAO_HOME": str(settings.home),
        "DAGSTER_HOME": str(settings.dagster_home),
        "PYTHONUNBUFFERED": "1",
    }
    with log.open("wb") as out:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tao_pipeline.cli",
                "ui",
                "--config",
                str(config),
                "--port",
                str(port),
                "--host",
                "127.0.0.1",
            ],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    watchdog = subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(server.pid)],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_until(
            lambda: requests.get(f"{url}/server_info", timeout=5).ok, STARTUP_TIMEOUT_S, "the webserver", server, log
        )
        probe = Dagster(url, "", settings, log, server)
        location = _wait_until(lambda: _loaded_location(probe), STARTUP_TIMEOUT_S, "the code location", server, log)
        ready = Dagster(url, location, settings, log, server)
        # A fresh instance greets its first visitor on 127.0.0.1 with a newsletter dialog; mark it seen.
        ready.gql("mutation { setNuxSeen }")
        yield ready
    finally:
        _stop(server)
        watchdog.kill()
        watchdog.wait()
        ARTIFACTS.mkdir(exist_ok=True)
        shutil.copyfile(log, ARTIFACTS / "tao-ui.log")


def _loaded_location(server: Dagster) -> str | None:
    data = server.gql("""{ workspaceOrError { __typename ... on Workspace { locationEntries {
        name loadStatus locationOrLoadError { __typename ... on PythonError { message } } } } } }""")
    for entry in data["workspaceOrError"].get("locationEntries", []):
        loaded = entry["locationOrLoadError"] or {}
        if loaded.get("__typename") == "PythonError":
            raise AssertionError(f"code location {entry['name']} failed to load: {loaded['message']}")
        if entry["loadStatus"] == "LOADED" and loaded.get("__typename") == "RepositoryLocation":
            return entry["name"]
    return None


def _runs(server: Dagster, **filters) -> list[dict]:
    data = server.gql(
        """query($filter: RunsFilter) { runsOrError(filter: $filter) { __typename
        ... on Runs { results { runId jobName status tags { key value } } } } }""",
        filter=filters,
    )
    return data["runsOrError"]["results"]


def _wait_for_ingestion(server: Dagster) -> None:
    """The usage-log sensor ingests data.logs on the daemon's first tick, as it would for a user."""
    _wait_until(
        lambda: _ingest_succeeded(server),
        RUN_TIMEOUT_S,
        "the sensor's ingest run",
        server.process,
        server.log,
        every=2.0,
    )


def _ingest_succeeded(server: Dagster) -> bool:
    runs = _runs(server, pipelineName="ingest_usage_logs")
    failed = [r for r in runs if r["status"] in ("FAILURE", "CANCELED")]
    assert not failed, f"ingest run failed: {_run_errors(server, failed[0]['runId'])}"
    return any(r["status"] == "SUCCESS" for r in runs)


def _run_errors(server: Dagster, run_id: str) -> str:
    data = server.gql(
        """query($id: ID!) { logsForRun(runId: $id) { ... on EventConnection { events {
        __typename ... on MessageEvent { message } ... on ErrorEvent { error { message } } } } } }""",
        id=run_id,
    )
    events = data["logsForRun"].get("events", [])
    lines = [
        f"{e['__typename']}: {e.get('message', '')} {(e.get('error') or {}).get('message', '')}".strip()
        for e in events
        if e["__typename"]
        in ("ExecutionStepFailureEvent", "RunFailureEvent", "EngineEvent", "AssetCheckEvaluationEvent")
    ]
    return "\n".join(lines[-15:])


def _wait_for_run(server: Dagster, run_id: str) -> str:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        status = server.gql("query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }", id=run_id)[
            "runOrError"
        ]["status"]
        if status in TERMINAL:
            return status
        time.sleep(2)
    raise AssertionError(f"run {run_id} not finished after {RUN_TIMEOUT_S}s:\n{server.log_tail()}")


def _run(server: Dagster, run_id: str) -> dict:
    return server.gql(
        """query($id: ID!) { runOrError(runId: $id) { ... on Run {
        status runConfigYaml stepStats { stepKey status } } } }""",
        id=run_id,
    )["runOrError"]


def _assert_candidates_per_prompt(server: Dagster, partition: str, samples: int) -> None:
    lake = Lake(server.settings.lake_dir)
    prompts = lake.read("raw_prompts", partition)
    train = int((prompts["split"] == "train").sum())
    assert train > 0 and len(lake.read("candidate_responses", partition)) == samples * train


def _round_outcome(server: Dagster, partition: str) -> tuple[set[str], str | None]:
    """The round assets materialized for `partition`, and the status of the promotion check's execution."""
    data = server.gql(
        """query($keys: [AssetKeyInput!], $partitions: [String!], $check: String!) {
        assetNodes(assetKeys: $keys) { assetKey { path } assetMaterializations(partitions: $partitions) { partition }
          assetCheckOrError(checkName: $check) { __typename ... on AssetCheck {
            executionForLatestMaterialization { status } } } } }""",
        keys=[{"path": [name]} for name in ROUND_ASSETS],
        partitions=[partition],
        check=CHECK,
    )
    materialized, check = set(), None
    for node in data["assetNodes"]:
        name = node["assetKey"]["path"][-1]
        if any(m["partition"] == partition for m in node["assetMaterializations"]):
            materialized.add(name)
        if name == "checkpoint_evaluation":
            execution = (node["assetCheckOrError"] or {}).get("executionForLatestMaterialization")
            check = execution and execution["status"]
    return materialized, check


# --- the browser ----------------------------------------------------------------------------------


@contextmanager
def _browser_page(name: str):
    """A Chromium page (wide, so the graph draws full asset nodes); a screenshot on failure."""
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    expect.set_options(timeout=30_000)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 2400, "height": 1100})
            page.set_default_timeout(30_000)
            # Should the newsletter dialog show anyway (see the fixture), skip it whenever it does.
            page.add_locator_handler(
                page.get_by_text("Join the Dagster community"), lambda: page.get_by_role("button", name="Skip").click()
            )
            try:
                yield page
            except BaseException:
                page.screenshot(path=ARTIFACTS / f"{name}-failure.png")
                raise
        finally:
            browser.close()


def _select_partition(page, dialog, key: str) -> None:
    """Tick `key` in the launch dialog's partition picker unless adding it already selected it.

    The dialog selects a partition it just created, but only once its partition list has caught
    up, so it is checked (not toggled blindly) and done again until the dialog counts 1 partition.
    """
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    selected = dialog.get_by_text("1 partition", exact=True)
    for _ in range(3):
        try:
            selected.wait_for(timeout=3_000)
            return
        except PlaywrightTimeout:
            pass
        dialog.get_by_text("Select a partition or create one").click()
        checkbox = page.get_by_role("checkbox", name=key)
        checkbox.wait_for(state="attached")
        if not checkbox.is_checked():
            page.get_by_text(key, exact=True).filter(visible=True).first.click()
        dialog.get_by_text("Launch runs to materialize").click()  # closes the picker, not the dialog
    selected.wait_for(timeout=5_000)


def test_a_round_launched_from_the_asset_graph_runs_to_success(dagster: Dagster):
    # `make test` installs Chromium; a machine without it fails here rather than skipping unseen.
    assert CHROMIUM.exists(), f"no Chromium at {CHROMIUM}: `make browser` installs Debian's package"
    from playwright.sync_api import expect

    partition = "round-0001"
    group_url = f"{dagster.url}/locations/{dagster.location}/asset-groups/tao_round"
    with _browser_page("ui") as page:
        # The global lineage lists both groups.
        page.goto(f"{dagster.url}/asset-groups")
        for group in ("ingestion", "tao_round"):
            expect(page.get_by_text(group, exact=True).first).to_be_visible()

        # A person starts a round once the logs are in: the sensor's ingest run has materialized
        # usage_logs (before that, the launch dialog asks "Are you sure?"). Load the page after it.
        _wait_for_ingestion(dagster)

        # The round's group: every stage is a node in the graph, usage_logs upstream of it.
        page.goto(group_url)
        for asset in ROUND_ASSETS:
            expect(page.get_by_text(asset, exact=True).first).to_be_visible()
        expect(page.get_by_text(INGEST_ASSETS[0], exact=True).first).to_be_visible()

        # Materialize all -> add a partition for the round -> config -> launch one run.
        page.get_by_role("button", name="Materialize all").click()
        dialog = page.get_by_role("dialog").filter(has_text="Launch runs to materialize")
        expect(dialog.get_by_text(f"materialize {len(ROUND_ASSETS)} assets")).to_be_visible()
        dialog.get_by_text("Add a partition").click()
        add = page.get_by_role("dialog").filter(has_text="Add a partition for")
        add.get_by_placeholder("name").fill(partition)
        add.get_by_role("button", name="Save").click()
        expect(add).to_be_hidden()
        _select_partition(page, dialog, partition)

        # The launchpad config (README: overrides go under resources.settings.config.overrides).
        dialog.get_by_text("Config", exact=True).click()
        dialog.get_by_role("button", name="Add config").click()
        editor = page.get_by_role("dialog").filter(has_text="Config Editor")
        editor.locator(".CodeMirror").click()
        page.keyboard.insert_text(UI_RUN_CONFIG)
        expect(editor.get_by_text("No errors")).to_be_visible()
        editor.get_by_role("button", name="Save config").click()
        expect(editor).to_be_hidden()
        expect(dialog.get_by_text("Config saved")).to_be_visible()

        dialog.get_by_role("button", name="Launch 1 run").click()
        expect(dialog).to_be_hidden()

        # The launched run: one, for the partition, with that config; wait for it to finish.
        runs = _wait_until(
            lambda: _runs(dagster, tags=[{"key": "dagster/partition", "value": partition}]),
            30,
            f"the run for {partition}",
            dagster.process,
            dagster.log,
        )
        assert len(runs) == 1, runs
        run_id = runs[0]["runId"]
        status = _wait_for_run(dagster, run_id)
        assert status == "SUCCESS", f"run {run_id} {status}:\n{_run_errors(dagster, run_id)}"
        run = _run(dagster, run_id)
        assert "generation.num_samples=2" in run["runConfigYaml"], run
        steps = [step["status"] for step in run["stepStats"]]
        assert steps and set(steps) == {"SUCCESS"}, run["stepStats"]

        # The run's page says so, too.
        page.goto(f"{dagster.url}/runs/{run_id}")
        expect(page.get_by_text("Success", exact=True).first).to_be_visible()
        expect(page.get_by_text("Loading run logs")).to_be_hidden()
        expect(page.get_by_text(f"Succeeded ({len(steps)})", exact=True)).to_be_visible()
        expect(page.get_by_text("Errored (0)", exact=True)).to_be_visible()
        page.screenshot(path=ARTIFACTS / "ui-run.png")

        # Every stage materialized for the round, the promotion gate passed, the override took.
        materialized, check = _round_outcome(dagster, partition)
        assert materialized == set(ROUND_ASSETS) and check == "SUCCEEDED", (materialized, check)
        _assert_candidates_per_prompt(dagster, partition, 2)

        # Back on the graph: every node shows its one partition filled. The screenshot is the artifact.
        page.goto(group_url)
        for asset in ROUND_ASSETS:
            expect(page.get_by_text(asset, exact=True).first).to_be_visible()
        expect(page.get_by_text("100% filled", exact=True)).to_have_count(len(ROUND_ASSETS))
        page.wait_for_timeout(1_000)  # the UI polls forever, so no "network idle"; let the nodes settle
        page.screenshot(path=ARTIFACTS / "ui-asset-graph.png")
    assert (ARTIFACTS / "ui-asset-graph.png").stat().st_size > 10_000


def test_a_round_launched_through_graphql_runs_to_success(dagster: Dagster):
    partition = "round-0002"
    nodes = dagster.gql("{ assetNodes { assetKey { path } groupName partitionDefinition { name } jobNames } }")
    by_name = {node["assetKey"]["path"][-1]: node for node in nodes["assetNodes"]}
    assert set(by_name) == {*INGEST_ASSETS, *ROUND_ASSETS, "lake_mirror"}  # the mirror: after any round
    assert {name for name, node in by_name.items() if node["groupName"] == "tao_round"} == set(ROUND_ASSETS)
    assert all(by_name[name]["partitionDefinition"]["name"] == "rounds" for name in ROUND_ASSETS)
    assert all("tao_round" in by_name[name]["jobNames"] for name in ROUND_ASSETS)

    added = dagster.gql(
        """mutation($repo: RepositorySelector!, $key: String!) {
        addDynamicPartition(repositorySelector: $repo, partitionsDefName: "rounds", partitionKey: $key) {
          __typename ... on PythonError { message } } }""",
        repo=dagster.repository,
        key=partition,
    )
    assert added["addDynamicPartition"]["__typename"] == "AddDynamicPartitionSuccess", added
    _wait_for_ingestion(dagster)

    # The round's job for the partition, with the config file's settings.
    launched = dagster.gql(
        """mutation($params: ExecutionParams!) { launchRun(executionParams: $params) {
        __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message }
        ... on RunConfigValidationInvalid { errors { message } } } }""",
        params={
            "selector": {**dagster.repository, "jobName": "tao_round"},
            "runConfigData": {},
            "executionMetadata": {"tags": [{"key": "dagster/partition", "value": partition}]},
        },
    )["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]
    status = _wait_for_run(dagster, run_id)
    assert status == "SUCCESS", f"run {run_id} {status}:\n{_run_errors(dagster, run_id)}"

    materialized, check = _round_outcome(dagster, partition)
    assert materialized == set(ROUND_ASSETS) and check == "SUCCEEDED", (materialized, check)
    _assert_candidates_per_prompt(dagster, partition, dagster.settings.generation.num_samples)
