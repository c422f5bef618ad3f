"""Landed datasets: which dataset URIs a run may read, and turning an admitted URI into a local path.

A deployment run (the nightly schedule, `prefect deployment run ... --param dataset=URI`, or the data-landed
event) names its training data by URI. Before anything is read, `admit_dataset` applies the same rules as the
webhook receiver (`deployments/webhook`), so whoever can emit the event or start a run with a `dataset` parameter
gets no further than a signed delivery would:

- the URI is well formed: no `..` segment (also percent-encoded), no backslash or control character; local paths
  absolute; object-store URIs with a bucket and without query, fragment, credentials or fsspec chaining (`::`);
- it lies inside an absolute folder of `webhook.allowed_uris` (symlinks resolved, also every link inside a dataset
  folder) or under one of its object-store prefixes (whole path segments);
- the data (a file, or every file of a folder) is at most `webhook.max_dataset_bytes`.

A refusal is `DatasetRefused`, a `DataError` naming the URI and the setting to change. Then `materialize`:

- a local path or a `file://` URI is read in place;
- an object-store URI (`s3://`, `gs://`, `az://`, ... any protocol fsspec knows) is downloaded into
  `<dest>/<hash of the URI>/` on every run, so new content under the same key is seen (its size is checked
  before the download); the stage cache keys then hash the downloaded bytes, which is what makes an unchanged
  nightly run cheap. The fsspec driver of the scheme (`s3fs`, `gcsfs`, `adlfs`) must be installed where the flow
  runs.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from tasks.common.readers import DataError

_DRIVERS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs"}
ALLOWED_FIX = "land the data under a folder or prefix of webhook.allowed_uris, or add its folder there"


class DatasetRefused(DataError):
    """A dataset URI the landing rules refuse. `kind`: `malformed`, `outside` (the allow-list) or `too_large`."""

    def __init__(self, uri: str, kind: str, problem: str, fix: str):
        super().__init__(uri, problem, fix=fix)
        self.kind = kind


@dataclass(frozen=True)
class Location:
    uri: str  # as given
    local: Path | None  # resolved local path (symlinks followed), or None for an object-store URI


def _segments(text: str) -> set[str]:
    return set(text.replace("\\", "/").split("/"))


def _malformed(uri: str, problem: str) -> DatasetRefused:
    return DatasetRefused(uri, "malformed", problem, "name the data by an absolute path, file:///path or scheme://bucket/key")


def _inside(real: Path, roots: list[Path]) -> bool:
    return any(real.is_relative_to(root) for root in roots)


def _escaping(folder: Path, roots: list[Path]) -> Path | None:
    """The first entry under `folder` that resolves (through a symlink) outside every root, or None."""
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            entry = Path(dirpath) / name
            if not _inside(Path(os.path.realpath(entry)), roots):
                return entry
    return None


def locate(uri: str, allowed: list[str]) -> Location:
    """Where `uri` points, if it is well formed and inside `allowed` (`webhook.allowed_uris`); else `DatasetRefused`."""
    if any(ord(c) < 32 or c == "\x7f" for c in uri) or "\\" in uri:
        raise _malformed(uri, "control characters and backslashes are not allowed")
    decoded_once = unquote(uri)
    if ".." in _segments(uri) | _segments(decoded_once) | _segments(unquote(decoded_once)):
        raise _malformed(uri, "'..' path segments are not allowed")
    if not allowed:
        raise DatasetRefused(
            uri, "outside", "no dataset locations are allowed (webhook.allowed_uris is empty)",
            "list the folders and object-store prefixes datasets may come from, e.g. "
            "--set 'webhook.allowed_uris=[/data/landing, s3://my-bucket/landing/]'",
        )
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme in ("", "file") and (scheme == "file" or uri.startswith("/")):
        if scheme == "file" and parts.netloc not in ("", "localhost"):
            raise _malformed(uri, "file:// URIs must name a local path (file:///data/...)")
        if scheme == "file" and (parts.query or parts.fragment):
            raise _malformed(uri, "query strings and fragments are not allowed")
        raw = Path(unquote(parts.path)) if scheme == "file" else Path(uri)  # plain paths are taken literally
        real = Path(os.path.realpath(raw))
        roots = [Path(os.path.realpath(entry)) for entry in allowed if "://" not in entry]
        if not _inside(real, roots):
            raise DatasetRefused(uri, "outside", "outside the folders datasets may come from (webhook.allowed_uris)", ALLOWED_FIX)
        if real.is_dir() and (escape := _escaping(real, roots)) is not None:
            raise DatasetRefused(
                uri, "outside", f"{escape} inside the folder links outside the folders datasets may come from "
                "(webhook.allowed_uris)", "copy the data into the landing folder instead of linking to it",
            )
        return Location(uri, real)
    if not scheme or "://" not in uri:
        raise _malformed(uri, "use an absolute path, file:///path or scheme://bucket/key")
    if parts.query or parts.fragment or "@" in parts.netloc or not parts.netloc:
        raise _malformed(uri, "object-store URIs need a bucket and no query, fragment or credentials")
    if "::" in uri:
        raise _malformed(uri, "chained URLs ('::') are not allowed")
    normalized = f"{scheme}://{parts.netloc}{parts.path}"
    for entry in allowed:
        if "://" not in entry:
            continue
        prefix = entry if entry.endswith("/") else entry + "/"
        e_parts = urlsplit(prefix)
        prefix = f"{e_parts.scheme.lower()}://{e_parts.netloc}{e_parts.path}"
        if normalized.startswith(prefix) or normalized == prefix.rstrip("/"):
            return Location(uri, None)
    raise DatasetRefused(uri, "outside", "outside the object-store prefixes datasets may come from (webhook.allowed_uris)", ALLOWED_FIX)


def data_files(path: Path) -> list[Path]:
    """The files of a dataset: the file itself, or every file under a folder (sorted)."""
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


def _human(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    size = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if size < 1024 or unit == "GiB":
            break
    return f"{size:.1f} {unit}"


def check_size(uri: str, size: int, max_bytes: int) -> None:
    """`DatasetRefused` when a dataset of `size` bytes is over `max_bytes` (`webhook.max_dataset_bytes`)."""
    if size > max_bytes:
        raise DatasetRefused(
            uri, "too_large", f"{_human(size)} of data, over webhook.max_dataset_bytes ({max_bytes} bytes)",
            "raise webhook.max_dataset_bytes if this size is expected, or land a smaller dataset",
        )


def local_size(path: Path, uri: str, max_bytes: int) -> int:
    """Total bytes of a local dataset, stopping (with `DatasetRefused`) as soon as it exceeds `max_bytes`."""
    total = 0
    for f in data_files(path):
        total += f.stat().st_size
        check_size(uri, total, max_bytes)
    return total


def admit_dataset(uri: str, allowed: list[str], max_bytes: int) -> Location:
    """`uri`'s location if a run may read it: inside `allowed` and, when local and present, at most `max_bytes`.

    Object-store data is size-checked by `materialize` before it is downloaded."""
    location = locate(uri, allowed)
    if location.local is not None and location.local.exists():
        local_size(location.local, uri, max_bytes)
    return location


def local_path(uri: str) -> Path | None:
    """The local path a URI names (plain path or file://), or None for a remote URI."""
    parts = urlsplit(uri)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise DataError(uri, "file:// URIs must name a local file (file:///path)", fix="drop the host part")
        return Path(unquote(parts.path))
    if "://" in uri:
        return None
    return Path(uri)


def materialize(uri: str, dest_dir: str | Path, max_bytes: int | None = None) -> str:
    """A local path holding the dataset at `uri` (downloaded for object-store URIs, refused over `max_bytes`)."""
    path = local_path(uri)
    if path is not None:
        return str(path)
    import fsspec

    scheme = urlsplit(uri).scheme
    try:
        fs, remote = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as exc:
        driver = _DRIVERS.get(scheme)
        hint = f"pip install {driver}" if driver else f"install the fsspec driver for {scheme}://"
        raise DataError(uri, f"cannot read {scheme}:// URIs here ({exc})", fix=hint) from None
    target_dir = Path(dest_dir) / hashlib.sha256(uri.encode()).hexdigest()[:16]
    name = Path(remote.rstrip("/")).name or "dataset"
    tmp = target_dir.with_name(target_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if not fs.exists(remote):
            raise DataError(uri, "no such object or prefix", fix="check the URI and the credentials of the flow's worker")
        if max_bytes is not None:
            check_size(uri, int(fs.du(remote, total=True)), max_bytes)  # before downloading anything
        if fs.isdir(remote):
            fs.get(remote.rstrip("/") + "/", str(tmp / name) + "/", recursive=True)
        else:
            fs.get_file(remote, str(tmp / name))
        if max_bytes is not None:
            local_size(tmp / name, uri, max_bytes)  # the bytes that arrived (the object may have grown meanwhile)
    except DataError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as exc:  # noqa: BLE001 - object stores raise many types (auth, network, permissions)
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(uri, f"download failed ({type(exc).__name__}: {exc})", fix="check the URI and credentials") from None
    shutil.rmtree(target_dir, ignore_errors=True)
    tmp.rename(target_dir)
    return str(target_dir / name)
