"""Object storage: checkpoints exported to and loaded from s3:// URLs, and the lake mirrored after each round.

Against a real S3-compatible server on loopback (moto's server mode), reached only through the standard
S3 API with credentials and endpoint from the standard AWS environment, as on AWS, MinIO or GCS interop.
"""

from __future__ import annotations

import json

import boto3
import dagster as dg
import pandas as pd
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pytest
from click.testing import CliRunner
from moto.server import ThreadedMotoServer

from tao_pipeline.cli.commands import main
from tao_pipeline.common.object_store import MIRROR_MANIFEST, mirror_tree
from tao_pipeline.data.lake import Lake
from tao_pipeline.defs.assets.mirror import lake_mirror
from tao_pipeline.defs.resources import TaoSettingsResource
from tao_pipeline.registry import ModelStore
from tao_pipeline.registry.export import MANIFEST
from tao_pipeline.registry.loading import load_model
from tao_pipeline.settings import ModelSettings

BUCKET = "tao-test"


@pytest.fixture
def bucket(monkeypatch):
    """An S3 endpoint on a free loopback port with one empty bucket; the AWS variables point at it."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    environment = {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
    }
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    client = boto3.client("s3", endpoint_url=environment["AWS_ENDPOINT_URL"])
    client.create_bucket(Bucket=BUCKET)
    yield client
    server.stop()


def keys(client, prefix: str) -> dict[str, bytes]:
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    return {item["Key"]: client.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read() for item in listed}


@pytest.fixture
def home_with_champion(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.setenv("TAO_HOME", str(tmp_path / "home"))
    ModelStore(tmp_path / "home" / "models").champion(ModelSettings(base=str(tiny_model_dir)), log=lambda _: None)
    return tmp_path / "home"


def tao(*args: str, base) -> object:
    result = CliRunner().invoke(main, [*args, "--set", f"model.base='{base}'"])
    assert "Traceback" not in result.output, result.output
    return result


def test_a_checkpoint_exported_to_a_bucket_loads_as_the_base_of_another_home(
    bucket, home_with_champion, tiny_model_dir, tmp_path, monkeypatch
):
    url = f"s3://{BUCKET}/models/champion"
    result = tao("export", url, base=tiny_model_dir)
    assert result.exit_code == 0 and f"to {url}" in result.output, result.output
    stored = keys(bucket, "models/champion/")
    manifest = json.loads(stored[f"models/champion/{MANIFEST}"])
    assert sorted(manifest["files"]) == sorted(k.rsplit("/", 1)[1] for k in stored if not k.endswith(MANIFEST))
    assert stored["models/champion/model.safetensors"] == (tiny_model_dir / "model.safetensors").read_bytes()

    monkeypatch.setenv("TAO_HOME", str(tmp_path / "other-home"))
    loaded = CliRunner().invoke(main, ["bootstrap", "--set", f"model.base='{url}'"])
    assert loaded.exit_code == 0 and "champion: base-champion" in loaded.output, loaded.output
    champion = ModelStore(tmp_path / "other-home" / "models").champion(ModelSettings(base=url))
    assert load_model(champion.path, dtype="float32").config.num_hidden_layers == 2  # real weights


def test_exporting_again_replaces_only_its_own_objects_and_a_foreign_prefix_is_refused(
    bucket, home_with_champion, tiny_model_dir
):
    url = f"s3://{BUCKET}/exports/m"
    assert tao("export", url, base=tiny_model_dir).exit_code == 0
    assert tao("export", url, base=tiny_model_dir).exit_code == 0  # an earlier export's prefix: replaced
    bucket.put_object(Bucket=BUCKET, Key="exports/other/notes.txt", Body=b"mine")
    refused = tao("export", f"s3://{BUCKET}/exports/other", base=tiny_model_dir)
    assert refused.exit_code == 1 and "was not written by `tao export`" in refused.output
    assert keys(bucket, "exports/other/") == {"exports/other/notes.txt": b"mine"}  # untouched


def test_a_prefix_without_an_export_is_named_in_one_line(bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("TAO_HOME", str(tmp_path / "home"))
    result = CliRunner().invoke(main, ["bootstrap", "--set", f"model.base='s3://{BUCKET}/nothing/here'"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"s3://{BUCKET}/nothing/here: no {MANIFEST} there" in result.output


def test_the_lake_mirror_uploads_what_changed_and_duckdb_sized_reads_match(bucket, tmp_path):
    lake = Lake(tmp_path / "lake")
    lake.write("usage_logs", "b1", pd.DataFrame({"prompt": ["a", "b"]}))
    lake.write("raw_prompts", "round-0001", pd.DataFrame({"prompt": ["a"]}))
    url = f"s3://{BUCKET}/lake"
    first = mirror_tree(lake.root, url)
    assert (first.uploaded, first.unchanged) == (2, 0)
    again = mirror_tree(lake.root, url)
    assert (again.uploaded, again.unchanged) == (0, 2)
    lake.write("usage_logs", "b2", pd.DataFrame({"prompt": ["c"]}))
    third = mirror_tree(lake.root, url)
    assert (third.uploaded, third.unchanged) == (1, 2)
    assert f"lake/{MIRROR_MANIFEST}" in keys(bucket, "lake/")
    filesystem, path = pafs.FileSystem.from_uri(f"{url}/usage_logs")
    mirrored = ds.dataset(path, filesystem=filesystem, format="parquet").to_table().to_pandas()
    assert sorted(mirrored["prompt"]) == ["a", "b", "c"]  # what a reader of the bucket sees


def test_the_lake_mirror_asset_and_its_setting(bucket, tmp_path, monkeypatch):
    config = tmp_path / "tao.toml"
    config.write_text(f'home = "{tmp_path / "home"}"\n[storage]\nlake_mirror_url = "s3://{BUCKET}/mirror"\n')
    Lake(tmp_path / "home" / "lake").write("usage_logs", "b1", pd.DataFrame({"prompt": ["a"]}))
    resource = TaoSettingsResource(config_file=str(config))
    result = dg.materialize([lake_mirror], resources={"settings": resource})
    metadata = result.asset_materializations_for_node("lake_mirror")[0].metadata
    assert metadata["uploaded_files"].value == 1 and "mirror/usage_logs/b1.parquet" in keys(bucket, "mirror/")
    off = dg.materialize([lake_mirror], resources={"settings": TaoSettingsResource(overrides=[f"home='{tmp_path}'"])})
    assert "off" in off.asset_materializations_for_node("lake_mirror")[0].metadata["mirror"].value


@pytest.mark.parametrize("url", ["s3://bucket", "s3://bucket/", "http://bucket/x", "bucket/x"])
def test_a_mirror_url_must_name_a_prefix_in_a_bucket(url):
    from tao_pipeline.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match="storage.lake_mirror_url"):
        load_settings(None, [f"storage.lake_mirror_url='{url}'"])


@pytest.mark.parametrize("status", [dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE])
def test_a_round_ending_either_way_requests_the_mirror_when_one_is_set(tmp_path, status):
    from tao_pipeline.defs.storage import build_mirror_sensor

    @dg.op
    def finish():
        if status == dg.DagsterRunStatus.FAILURE:
            raise dg.Failure("refused")

    @dg.job
    def a_round():
        finish()

    sensor = build_mirror_sensor(status, interval_s=30)
    with dg.instance_for_test() as instance:
        run = a_round.execute_in_process(instance=instance, raise_on_error=False).dagster_run
        event_type = dg.DagsterEventType.RUN_SUCCESS if status == dg.DagsterRunStatus.SUCCESS else None
        [event] = instance.all_logs(run.run_id, of_type=event_type or dg.DagsterEventType.RUN_FAILURE)
        for mirror, expected in [(f"s3://{BUCKET}/lake", dg.RunRequest), (None, dg.SkipReason)]:
            overrides = [f"home='{tmp_path}'"] + ([f"storage.lake_mirror_url='{mirror}'"] if mirror else [])
            context = dg.build_run_status_sensor_context(
                sensor_name=sensor.name, dagster_instance=instance, dagster_run=run, dagster_event=event.dagster_event,
                resources={"settings": TaoSettingsResource(overrides=overrides)},
            )  # fmt: skip
            result = sensor(context)
            assert isinstance(result, expected), result
            if expected is dg.RunRequest:
                assert result.run_key == f"mirror-after-{run.run_id}"
