"""Landed datasets: turn the URI a run was started with into a local path the loader reads.

A deployment run (the nightly schedule, `prefect deployment run ... --param dataset=URI`, or the data-landed
event) names its training data by URI:

- a local path or a `file://` URI is read in place;
- an object-store URI (`s3://`, `gs://`, `az://`, ... any protocol fsspec knows) is downloaded into
  `<dest>/<hash of the URI>/` on every run, so new content under the same key is seen; the stage cache keys then
  hash the downloaded bytes, which is what makes an unchanged nightly run cheap. The fsspec driver of the scheme
  (`s3fs`, `gcsfs`, `adlfs`) must be installed where the flow runs.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from urllib.parse import unquote, urlsplit

from tasks.common.readers import DataError

_DRIVERS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs"}


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


def materialize(uri: str, dest_dir: str | Path) -> str:
    """A local path holding the dataset at `uri` (downloaded for object-store URIs)."""
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
        if fs.isdir(remote):
            fs.get(remote.rstrip("/") + "/", str(tmp / name) + "/", recursive=True)
        else:
            fs.get_file(remote, str(tmp / name))
    except DataError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as exc:  # noqa: BLE001 - object stores raise many types (auth, network, permissions)
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(uri, f"download failed ({type(exc).__name__}: {exc})", fix="check the URI and credentials") from None
    shutil.rmtree(target_dir, ignore_errors=True)
    tmp.rename(target_dir)
    return str(target_dir / name)
