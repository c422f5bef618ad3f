"""Content-hash keys for stage results.

Each stage writes its outputs into `<runs_dir>/.cache/<stage>-<key>/`, where the key hashes everything the output
depends on: the input data's content, the config sections the stage reads, the base model's fingerprint and the
stage's own code. Same inputs → same folder → the stage is skipped; any change → a new folder. A stage that
crashed leaves a folder without `result.json` and is run again (training then resumes from its last checkpoint).

A result counts only when its folder is whole: `save_result` first writes `manifest.json` (size and SHA-256 of every
file the stage left, except training's `checkpoints/`), then `result.json`, each atomically. `load_result` checks
both: a missing manifest, a missing, resized or changed file, or a `*_path` the result names that is gone makes the
folder incomplete. Its `result.json` is then removed (with a warning naming the file), so the stage runs again in
the same folder: training resumes from its last complete checkpoint, everything else is rewritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

RESULT_FILE = "result.json"
MANIFEST_FILE = "manifest.json"
UNLISTED = ("checkpoints",)  # intermediate state, not part of a result (complete checkpoints are picked by the stage)
FULL_HASH_BYTES = 64 << 20  # larger files: size plus SHA-256 of their first and last MiB (see `file_digest`)

log = logging.getLogger("fewtune.cache")


def hash_text(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def source_fingerprint(spec: str | None) -> str | None:
    """Hash of a data file's bytes, of every file of a folder, of a hub id and its resolved revision
    (`tasks.common.hub`), or of the spec itself (an object-store URI, read through the landing folder)."""
    if spec is None:
        return None
    path = Path(spec)
    h = hashlib.sha256()
    if path.is_file():
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    elif path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(str(file.relative_to(path)).encode())
            h.update(file.read_bytes())
    elif looks_like_hub_id(spec):
        from tasks.common.hub import hub_fingerprint

        return hub_fingerprint(spec, "dataset")
    else:
        h.update(spec.encode())
    return h.hexdigest()[:16]


def looks_like_hub_id(spec: str) -> bool:
    """`owner/name` or `owner/name:split`, neither a path nor a URI."""
    return ("/" in spec and "://" not in spec and not spec.startswith((".", "/", "~")) and not Path(spec).suffix
            and spec.count("/") == 1)


def stage_dir(runs_dir: str | Path, stage: str, key: str) -> Path:
    return Path(runs_dir).resolve() / ".cache" / f"{stage}-{key}"


def file_digest(path: Path) -> str:
    """SHA-256 of a file, or for a file over FULL_HASH_BYTES of its first and last MiB (its size is checked too)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as f:
        if size <= FULL_HASH_BYTES:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        else:
            h.update(f.read(1 << 20))
            f.seek(size - (1 << 20))
            h.update(f.read())
    return h.hexdigest()


def _listed(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and p.relative_to(folder).parts[0] not in UNLISTED
        and p.name not in (RESULT_FILE, MANIFEST_FILE, RESULT_FILE + ".tmp", MANIFEST_FILE + ".tmp")
    )


def folder_manifest(folder: Path) -> dict[str, list[Any]]:
    """`{relative path: [size, digest]}` of every file of a stage folder (but `checkpoints/` and the result)."""
    return {str(p.relative_to(folder)): [p.stat().st_size, file_digest(p)] for p in _listed(folder)}


_verified: dict[tuple[str, str], tuple] = {}  # (folder, manifest text) -> file stats when last found whole


def folder_problem(folder: Path, result: dict[str, Any]) -> str | None:
    """What makes a stage folder incomplete, or None when every file of its manifest and every `*_path` of its
    result is there as written."""
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        return f"{MANIFEST_FILE} is missing"
    text = manifest_path.read_text()
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError:
        return f"{MANIFEST_FILE} is truncated"
    for key, value in result.items():
        if key.endswith("_path") and isinstance(value, str) and value and not Path(value).exists():
            return f"{key} {value} is missing"
    stats = []
    for rel, (size, _) in manifest.items():
        path = folder / rel
        if not path.is_file():
            return f"{rel} is missing"
        st = path.stat()
        if st.st_size != size:
            return f"{rel} has {st.st_size} bytes, {size} were written"
        stats.append((rel, st.st_size, st.st_mtime_ns))
    memo = (str(folder), text)
    if _verified.get(memo) == tuple(stats):  # unchanged since this process hashed it
        return None
    for rel, (_, digest) in manifest.items():
        if file_digest(folder / rel) != digest:
            return f"{rel} differs from what the stage wrote"
    _verified[memo] = tuple(stats)
    return None


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_result(folder: Path) -> dict[str, Any] | None:
    """The stage's result when its folder is whole (see the module docstring); None when there is none. An
    incomplete folder loses its `result.json` here, with a warning, so the stage runs again."""
    path = folder / RESULT_FILE
    if not path.exists():
        return None
    try:
        result = json.loads(path.read_text())
        problem = folder_problem(folder, result) if isinstance(result, dict) else "result.json is not an object"
    except json.JSONDecodeError:
        problem = "result.json is truncated"
    if problem is None:
        return result
    log.warning("stage folder %s is incomplete (%s): running the stage again", folder, problem)
    path.unlink(missing_ok=True)
    return None


def save_result(folder: Path, result: dict[str, Any]) -> dict[str, Any]:
    """Write the folder's manifest, then result.json, each atomically and synced: a crash at any moment never
    leaves a result that looks complete over files that are not."""
    folder.mkdir(parents=True, exist_ok=True)
    _write_atomically(folder / MANIFEST_FILE, json.dumps(folder_manifest(folder), indent=1))
    _write_atomically(folder / RESULT_FILE, json.dumps(result, indent=2, default=str))
    return result
