"""Object storage (``s3://`` URLs) for what leaves the machine: exported checkpoints, base models, the lake.

Only the standard S3 API is used, through pyarrow's own S3 filesystem, so the same URLs work on AWS,
MinIO or GCS's S3 interoperability. Credentials and the endpoint come from the standard environment
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, ``AWS_ENDPOINT_URL`` for a server
other than AWS), exactly as the AWS CLI and SDKs read them.

Uploads of a folder write a manifest (the names, sizes and SHA-256 of what was written) last, so a
reader that finds the manifest finds every file it lists; a mirror uploads only what changed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from tao_pipeline.common.atomic import atomic_directory
from tao_pipeline.common.safe_files import plain_name

SCHEMES = ("s3://",)
MIRROR_MANIFEST = ".tao-mirror.json"
_BLOCK = 1 << 20


class ObjectStoreError(OSError):
    """An object-store URL that cannot be reached, read or written; the message names it and why."""


def is_object_url(text: object) -> bool:
    return isinstance(text, str) and text.startswith(SCHEMES)


@dataclass(frozen=True)
class Location:
    """A bucket prefix: the filesystem to reach it and the path inside it ("bucket/prefix")."""

    url: str
    filesystem: pafs.FileSystem
    path: str

    def child(self, name: str) -> str:
        return f"{self.path.rstrip('/')}/{name}"


def locate(url: str) -> Location:
    """The filesystem and path of ``s3://bucket/prefix`` (the standard AWS environment configures it)."""
    if not is_object_url(url):
        raise ObjectStoreError(f"{url!r} is not an object-store URL (s3://bucket/prefix)")
    try:
        filesystem, path = pafs.FileSystem.from_uri(url.rstrip("/"))
    except (OSError, ValueError) as error:
        raise ObjectStoreError(f"{url}: {_reason(error)}") from None
    if not path.strip("/") or "/" not in path.strip("/"):
        raise ObjectStoreError(f"{url}: give a prefix inside the bucket, e.g. s3://bucket/tao/models")
    return Location(url.rstrip("/"), filesystem, path.strip("/"))


def listed(location: Location) -> dict[str, int]:
    """Every object under the prefix: its path relative to the prefix -> its size."""
    try:
        infos = location.filesystem.get_file_info(
            pafs.FileSelector(location.path, recursive=True, allow_not_found=True)
        )
    except OSError as error:
        raise ObjectStoreError(f"{location.url}: cannot list it ({_reason(error)})") from None
    prefix = location.path + "/"
    return {info.path.removeprefix(prefix): info.size for info in infos if info.type == pafs.FileType.File}


def upload_files(files: list[Path], location: Location, manifest_name: str, manifest: dict) -> None:
    """Upload ``files`` (plain names) under the prefix, then the manifest naming them, last."""
    for path in files:
        _upload(path, location, path.name)
    _put(json.dumps(manifest, indent=1).encode(), location, manifest_name)


def read_json(location: Location, name: str) -> dict | None:
    """A small JSON object stored under the prefix, or None when it is missing or not a JSON object."""
    try:
        with location.filesystem.open_input_stream(location.child(name)) as stream:
            value = json.loads(stream.read(_BLOCK + 1))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def delete(location: Location, names: list[str]) -> None:
    for name in names:
        if plain_name(name):
            try:
                location.filesystem.delete_file(location.child(name))
            except FileNotFoundError:
                pass


def download_folder(url: str, target: Path, manifest_name: str) -> Path:
    """The objects a manifest at ``url`` lists, downloaded into ``target`` (atomically: all or nothing)."""
    location = locate(url)
    manifest = read_json(location, manifest_name)
    if manifest is None or not isinstance(manifest.get("files"), list):
        raise ObjectStoreError(f"{url}: no {manifest_name} there (upload it with `tao export {url}`)")
    names = manifest["files"]
    if not all(plain_name(name) for name in names):
        raise ObjectStoreError(f"{url}: its {manifest_name} names something other than files of that prefix")

    def fetch(staging: Path) -> None:
        for name in names:
            _download(location, name, staging / name)

    return atomic_directory(target, fetch)


@dataclass
class MirrorSummary:
    uploaded: int = 0
    unchanged: int = 0
    bytes_uploaded: int = 0


def mirror_tree(root: Path, url: str, suffixes: tuple[str, ...] = (".parquet",)) -> MirrorSummary:
    """Upload every file under ``root`` with one of ``suffixes`` whose content the mirror does not hold yet
    (compared by SHA-256, recorded in the mirror's manifest, which is written last)."""
    location = locate(url)
    previous = (read_json(location, MIRROR_MANIFEST) or {}).get("files", {})
    recorded = dict(previous) if isinstance(previous, dict) else {}
    summary = MirrorSummary()
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.is_symlink() or not path.name.endswith(suffixes) or path.name.startswith("."):
            continue
        relative = path.relative_to(root).as_posix()
        digest = _sha256(path)
        if recorded.get(relative) == digest:
            summary.unchanged += 1
            continue
        _upload(path, location, relative)
        recorded[relative] = digest
        summary.uploaded += 1
        summary.bytes_uploaded += path.stat().st_size
    _put(json.dumps({"files": recorded}, indent=1).encode(), location, MIRROR_MANIFEST)
    return summary


def _upload(path: Path, location: Location, name: str) -> None:
    try:
        with path.open("rb") as source, location.filesystem.open_output_stream(location.child(name)) as sink:
            shutil.copyfileobj(source, sink, _BLOCK)
    except OSError as error:
        raise ObjectStoreError(f"cannot upload {path.name} to {location.url}: {_reason(error)}") from None


def _put(data: bytes, location: Location, name: str) -> None:
    try:
        with location.filesystem.open_output_stream(location.child(name)) as sink:
            sink.write(data)
    except OSError as error:
        raise ObjectStoreError(f"cannot write {name} to {location.url}: {_reason(error)}") from None


def _download(location: Location, name: str, target: Path) -> None:
    try:
        with location.filesystem.open_input_stream(location.child(name)) as stream, target.open("wb") as sink:
            shutil.copyfileobj(stream, sink, _BLOCK)
    except OSError as error:
        raise ObjectStoreError(f"cannot download {name} from {location.url}: {_reason(error)}") from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _reason(error: BaseException) -> str:
    return " ".join(str(error).split())[:300]
