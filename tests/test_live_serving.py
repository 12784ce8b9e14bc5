"""Promotion on live traffic through `tao serve`: shadow and canary beside the champion, the answers in the
lake, and the always-valid decision that promotes or rolls back (the official client, the tiny models)."""

import time
from concurrent.futures import ThreadPoolExecutor

import dagster as dg
import openai
import pytest
import requests
from click.testing import CliRunner

from tao_pipeline.cli import main
from tao_pipeline.defs.resources import TaoSettingsResource
from tao_pipeline.defs.sensors import build_live_sensor
from tao_pipeline.live.evidence import live_decision
from tao_pipeline.registry import ModelStore
from tao_pipeline.serving.live import in_canary, sticky_key
from tao_pipeline.settings import CONFIG_ENV
from tests.helpers import build_tiny_model
from tests.serve_helpers import load, register_checkpoint, running_server, serve_config

LIVE = "[live]\nmin_pairs = 20\nmin_latency_answers = 1000\n"
pytestmark = pytest.mark.slow(minutes=1)


def _cli(config, *args: str) -> str:
    result = CliRunner().invoke(main, [*args, "--config", str(config)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _wait_for_the_challenger(running, mode: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        live = requests.get(running.root + "/health", timeout=10).json()["live"]
        if live and live["mode"] == mode and live["serving"]:
            return
        assert time.monotonic() < deadline, live
        time.sleep(0.1)


def _ask(client, user: str, question: str):
    return client.chat.completions.create(
        model="tao", messages=[{"role": "user", "content": question}], user=user, max_tokens=4, temperature=0
    )


def test_a_shadow_answers_beside_the_champion_unseen_and_an_equal_one_is_promoted(
    tmp_path, tiny_model_dir, monkeypatch
):
    config = serve_config(tmp_path, tiny_model_dir, LIVE + "margin = 0.2\nstages = ['shadow']\n")  # shadow alone
    settings = load(config)
    store = ModelStore(settings.models_dir)
    with running_server(settings) as running:
        client = openai.OpenAI(base_url=running.url, api_key="unused", max_retries=0)
        champion = _ask(client, "u0", "warm up").model
        register_checkpoint(settings, tiny_model_dir, "round-0001-dpo-same", parent=champion)  # the same weights
        started = _cli(config, "shadow", "round-0001-dpo-same")
        assert "shadow: round-0001-dpo-same answers every request" in started and "passing it promotes it" in started
        _wait_for_the_challenger(running, "shadow")
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda i: _ask(client, f"u{i}", f"question {i}"), range(90)))
        assert {answer.model for answer in answers} == {champion}  # a shadow's answer is never returned
        deadline = time.monotonic() + 30
        while running.app.state.metrics.live_latency.labels("shadow", "round-0001-dpo-same")._sum.get() == 0:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(1.0)  # the last shadow answers
        running.app.state.request_log.flush()
    _cli(config, "ingest")

    experiment = store.live_experiment()
    outcome = live_decision(settings, store, experiment, act=False)
    counts = outcome.table.set_index("arm")["answers"]
    assert counts["champion"] == 90 and 80 <= counts["shadow"] <= 90  # a shadow may be skipped when busy, not lost
    assert outcome.verdict.decision == "promote" and outcome.verdict.mean == 0.0, outcome.verdict
    assert store.live_experiment() == experiment  # not acted on yet

    # The Dagster sensor acts on it, and the UI sees the decision as an observation of the champion asset.
    monkeypatch.setenv(CONFIG_ENV, str(config))
    with dg.instance_for_test() as instance:
        with dg.build_sensor_context(instance=instance, resources={"settings": TaoSettingsResource()}) as context:
            result = build_live_sensor(30)(context)
    [observation] = result.asset_events
    assert observation.asset_key == dg.AssetKey("champion")
    assert observation.metadata["live_decision"].value == "promote" and observation.metadata["pairs"].value >= 80
    assert store.champion_id() == "round-0001-dpo-same" and store.live_experiment() is None
    [ended] = store.live_history().to_dict("records")
    assert ended["outcome"] == "promoted" and '"decision": "promote"' in ended["evidence"]
    assert "live evidence: advantage +0.000" in store.promotions()["reason"].iloc[-1]


def test_a_canary_its_users_rate_down_is_rolled_back_and_stays_sticky(tmp_path, tiny_model_dir):
    config = serve_config(tmp_path, tiny_model_dir, LIVE + 'metric = "feedback"\n')
    settings = load(config)
    store = ModelStore(settings.models_dir)
    worse = build_tiny_model(tmp_path / "worse", seed=3)
    with running_server(settings) as running:
        client = openai.OpenAI(base_url=running.url, api_key="unused", max_retries=0)
        champion = _ask(client, "u0", "warm up").model
        register_checkpoint(settings, worse, "round-0002-dpo-worse", parent=champion)
        assert "50% of the conversations" in _cli(config, "canary", "round-0002-dpo-worse", "--share", "0.5")
        _wait_for_the_challenger(running, "canary")
        seen: dict[str, set[str]] = {}
        for turn in range(2):
            for i in range(60):
                answer = _ask(client, f"user-{i}", f"turn {turn} of user {i}")
                seen.setdefault(f"user-{i}", set()).add(answer.model)
                rating = "down" if answer.model == "round-0002-dpo-worse" else "up"
                posted = requests.post(f"{running.url}/feedback", json={"response_id": answer.id, "rating": rating})
                assert posted.status_code == 200, posted.text
        assert all(len(models) == 1 for models in seen.values())  # sticky per user
        canaried = sum(models == {"round-0002-dpo-worse"} for models in seen.values())
        assert canaried == sum(in_canary(sticky_key(u, None, None), "round-0002-dpo-worse", 0.5) for u in seen)
        assert 15 <= canaried <= 45
        running.app.state.request_log.flush()
    _cli(config, "ingest")
    shown = _cli(config, "live", "--decide")
    assert "roll back: advantage -1.000" in shown and "proven worse by more than 0.02" in shown, shown
    assert "acted: round-0002-dpo-worse rolled back" in shown
    assert store.champion_id() == champion and store.live_experiment() is None
    assert "rolled back" in _cli(config, "live")  # the history says what happened


def test_live_commands_refuse_what_cannot_run_in_one_line(tmp_path, tiny_model_dir):
    config = serve_config(tmp_path, tiny_model_dir)
    settings = load(config)
    store = ModelStore(settings.models_dir)
    champion = store.champion(settings.model).version_id
    register_checkpoint(settings, tiny_model_dir, "round-0001-dpo-x", parent=champion)
    runner = CliRunner()
    for args, message in [
        (["canary", "round-0009-nope"], "round-0009-nope"),
        (["canary", "round-0001-dpo-x", "--share", "0"], "canary share 0.0: give a fraction above 0"),
        (["canary", "round-0001-dpo-x", "--share", "1.5"], "canary share 1.5"),
        (["shadow", champion], "is the champion already"),
    ]:
        result = runner.invoke(main, [*args, "--config", str(config)])
        assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output, result.output
    assert "no live experiment is running" in _cli(config, "canary", "stop")
    assert "passing it promotes it" in _cli(config, "canary", "round-0001-dpo-x")  # live.share by default
    assert store.live_experiment().share == pytest.approx(0.1)
    assert "stopped: canary of round-0001-dpo-x" in _cli(config, "canary", "stop")
    # live.stages is ['canary']: a shadow started by hand leads to the canary, it never promotes on its own.
    assert "passing it starts the canary (live.stages)" in _cli(config, "shadow", "round-0001-dpo-x")
    assert "stopped: shadow of round-0001-dpo-x" in _cli(config, "canary", "stop")
    assert store.champion_id() == champion
    assert list(store.promotions()["action"])[-4:] == ["canary", "live stop", "shadow", "live stop"]


def test_stopping_a_canary_lets_its_answers_in_flight_finish(tmp_path, tiny_model_dir):
    config = serve_config(tmp_path, tiny_model_dir, "[live]\nshare = 1.0\n")
    settings = load(config)
    store = ModelStore(settings.models_dir)
    with running_server(settings) as running:
        client = openai.OpenAI(base_url=running.url, api_key="unused", max_retries=0)
        champion = _ask(client, "u0", "warm up").model
        register_checkpoint(settings, build_tiny_model(tmp_path / "other", seed=2), "round-0003-dpo-c", parent=champion)
        _cli(config, "canary", "round-0003-dpo-c")
        _wait_for_the_challenger(running, "canary")
        with ThreadPoolExecutor(1) as pool:
            long = pool.submit(
                client.chat.completions.create, model="tao", messages=[{"role": "user", "content": "go on"}],
                max_tokens=400, n=2, seed=7, temperature=1.0, user="anyone",
            )  # fmt: skip
            router = running.app.state.live
            deadline = time.monotonic() + 20
            while router.challenger is None or not router.challenger.status()["running_rows"]:
                assert time.monotonic() < deadline
                time.sleep(0.005)
            store.end_live("stopped by hand", {"reason": "test"})
            answer = long.result(timeout=120)
        assert answer.model == "round-0003-dpo-c" and answer.usage.completion_tokens > 0
        assert all(choice.finish_reason in ("stop", "length") for choice in answer.choices)
        deadline = time.monotonic() + 20
        while router.experiment is not None:  # the server follows the registry: the champion answers everyone
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert _ask(client, "anyone", "after").model == champion


def test_a_canary_through_a_proxy_in_front_of_tao_serve_is_routed_once_by_name(tmp_path, tiny_model_dir):
    """Proxy mode: the front routes a share of users to the challenger by naming it upstream; the upstream
    (the local engine, following the same registry) answers a named version as named, never routing again."""
    config = serve_config(tmp_path, tiny_model_dir, "[live]\nshare = 0.5\n")
    settings = load(config)
    store = ModelStore(settings.models_dir)
    champion = store.champion(settings.model).version_id
    other = build_tiny_model(tmp_path / "other", seed=5)
    register_checkpoint(settings, other, "round-0004-dpo-p", parent=champion)
    with running_server(load(config, "serve.log_requests=false")) as upstream:
        front_settings = load(config, "serve.engine='proxy'", f"serve.upstream_url='{upstream.url}'")
        with running_server(front_settings) as front:
            _cli(config, "canary", "round-0004-dpo-p")
            _wait_for_the_challenger(upstream, "canary")
            _wait_for_the_challenger(front, "canary")
            listed = {model.id for model in openai.OpenAI(base_url=upstream.url, api_key="x").models.list()}
            assert {"tao", champion, "round-0004-dpo-p"} <= listed

            client = openai.OpenAI(base_url=front.url, api_key="unused", max_retries=0)
            direct = openai.OpenAI(base_url=upstream.url, api_key="unused", max_retries=0)
            for i in range(16):
                answer = _ask(client, f"user-{i}", "the same question")
                expected = "round-0004-dpo-p" if in_canary(f"user:user-{i}", "round-0004-dpo-p", 0.5) else champion
                assert answer.model == expected
                # What that version says when named upstream: the front's routing was not routed again there.
                named = direct.chat.completions.create(
                    model=expected, messages=[{"role": "user", "content": "the same question"}], user=f"user-{i}",
                    max_tokens=4, temperature=0,
                )  # fmt: skip
                assert named.model == expected and named.choices[0].message.content == answer.choices[0].message.content
            upstream_live = upstream.app.state.metrics.live_latency
            assert not any(sample.value for metric in upstream_live.collect() for sample in metric.samples
                           if sample.name.endswith("_count"))  # fmt: skip
            front_live = front.app.state.metrics.live_latency
            samples = [sample for metric in front_live.collect() for sample in metric.samples]
            counts = {sample.labels["arm"]: sample.value for sample in samples if sample.name.endswith("_count")}
            assert counts["canary"] > 0 and counts["champion"] > 0 and counts["canary"] + counts["champion"] == 16
