"""The container image's build context and entrypoint, without a Docker engine (none runs here).

The Dockerfile installs the package from what it COPYs (not from this checkout), then every process starts
through `tao-entrypoint`. Here the same: a wheel built from exactly the files the Dockerfile copies, installed
apart from this checkout, and the image's commands run through the entrypoint on it: the code location loads
(as `dagster api grpc` would), `tao doctor` passes on the volume's fresh home, and a bad setting or a missing
database URL stops the container at once with one line.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow(minutes=1)  # builds and installs a wheel, loads the code location

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


def copied_paths() -> list[str]:
    """The sources of the build stage's COPY lines (those from the build context)."""
    sources = []
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            sources += line.split()[1:-1]
    return sources


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The package as the image installs it: built from the Dockerfile's build context only."""
    context = tmp_path_factory.mktemp("context")
    for source in copied_paths():
        target = context / source
        if (ROOT / source).is_dir():
            shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / source, target)
    wheels, site = tmp_path_factory.mktemp("wheels"), tmp_path_factory.mktemp("site")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(context)],
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    [wheel] = wheels.glob("tao_pipeline-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    return site


def entrypoint(site: Path, home: Path, *command: str, **environment: str) -> subprocess.CompletedProcess:
    """`tao-entrypoint COMMAND...` as the image runs it: the installed package first on the path, a fresh home."""
    home.mkdir(parents=True, exist_ok=True)  # the image's volume, /data/tao, exists and belongs to its user
    env = {key: value for key, value in os.environ.items() if not key.startswith(("TAO_", "DAGSTER_"))}
    env.update({"PYTHONPATH": str(site), "TAO_HOME": str(home), "HF_HUB_OFFLINE": "1", **environment})
    launcher = [sys.executable, "-c", "import sys; from tao_pipeline.cli.entrypoint import main; sys.exit(main())"]
    return subprocess.run([*launcher, *command], capture_output=True, text=True, timeout=300, env=env, cwd=home.parent)


def test_the_image_runs_as_a_user_through_the_entrypoint_the_package_installs():
    text = DOCKERFILE.read_text()
    final_stage = text[text.rindex("\nFROM ") :]
    assert re.search(r"^USER tao$", final_stage, re.M), "the image must not run as root"
    assert '"/opt/tao/bin/tao-entrypoint"' in final_stage
    assert 'tao-entrypoint = "tao_pipeline.cli.entrypoint:main"' in (ROOT / "pyproject.toml").read_text()
    assert set(copied_paths()) >= {"pyproject.toml", "tao_pipeline"}


def test_the_code_location_loads_and_doctor_passes_from_the_installed_package(installed, tmp_path):
    home = tmp_path / "data" / "tao"
    show = "import os, tao_pipeline; print(tao_pipeline.__file__, os.environ['DAGSTER_HOME'])"
    where = entrypoint(installed, home, sys.executable, "-c", show)
    assert where.returncode == 0, where.stderr
    module_file, dagster_home = where.stdout.split()
    assert module_file.startswith(str(installed)) and dagster_home == str(home / "dagster")
    assert (home / "dagster" / "dagster.yaml").read_text().startswith("# Written by tao")

    dagster = str(Path(sys.executable).parent / "dagster")
    loaded = entrypoint(installed, home, dagster, "definitions", "validate", "-m", "tao_pipeline.definitions")
    assert loaded.returncode == 0, loaded.stdout[-2000:] + loaded.stderr[-2000:]

    doctor = entrypoint(installed, home, sys.executable, "-m", "tao_pipeline.cli", "doctor")
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert "run monitoring and retries on" in doctor.stdout


def test_a_bad_setting_or_a_missing_database_url_stops_the_container_in_one_line(installed, tmp_path):
    home = tmp_path / "tao"
    bad = entrypoint(installed, home, "true", TAO_OVERRIDES=json.dumps(["training.max_steps=-1"]))
    assert bad.returncode == 1 and bad.stderr.startswith("tao-entrypoint: ") and bad.stderr.count("\n") == 1
    assert "training.max_steps" in bad.stderr

    postgres = json.dumps(["storage.postgres_url_env='TAO_DB_URL'"])
    missing = entrypoint(installed, home, "true", TAO_OVERRIDES=postgres)
    assert missing.returncode == 1 and "$TAO_DB_URL is not set" in missing.stderr and missing.stderr.count("\n") == 1

    nothing = entrypoint(installed, home)
    assert nothing.returncode == 2 and "usage: tao-entrypoint" in nothing.stderr
    unknown = entrypoint(installed, home, "no-such-command-here")
    assert unknown.returncode == 127 and "cannot run 'no-such-command-here'" in unknown.stderr


def test_under_the_dagster_chart_every_process_opens_the_chart_s_instance_untouched(installed, tmp_path):
    """storage.platform_instance: the chart mounts its dagster.yaml (Postgres, the K8sRunLauncher) at $DAGSTER_HOME in
    the run pods; tao must open that one, not write its own under the home and point $DAGSTER_HOME there."""
    home, platform = tmp_path / "data" / "tao", tmp_path / "opt" / "dagster_home"
    platform.mkdir(parents=True)
    theirs = "telemetry:\n  enabled: false\nrun_launcher:\n  module: dagster\n  class: DefaultRunLauncher\n"
    (platform / "dagster.yaml").write_text(theirs)
    settings = tmp_path / "etc" / "tao.toml"  # as the chart's ConfigMap mounts it
    settings.parent.mkdir()
    settings.write_text("[storage]\nplatform_instance = true\n")
    chart = {"TAO_CONFIG": str(settings), "DAGSTER_HOME": str(platform)}
    show = "import os; print(os.environ['DAGSTER_HOME'])"
    where = entrypoint(installed, home, sys.executable, "-c", show, **chart)
    assert where.returncode == 0, where.stderr
    assert where.stdout.strip() == str(platform) and (platform / "dagster.yaml").read_text() == theirs
    assert not (home / "dagster").exists()

    doctor = entrypoint(installed, home, sys.executable, "-m", "tao_pipeline.cli", "doctor", **chart)
    assert f"the platform's instance at {platform} (SQLite files; DefaultRunLauncher), left as it is" in doctor.stdout

    unset = {"TAO_CONFIG": str(settings)}
    doctor = entrypoint(installed, home, sys.executable, "-m", "tao_pipeline.cli", "doctor", **unset)
    assert doctor.returncode != 0 and "storage.platform_instance is set but $DAGSTER_HOME is not" in doctor.stdout
