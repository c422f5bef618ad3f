"""Content-hash keys for stage results.

Each stage writes its outputs into `<runs_dir>/.cache/<stage>-<key>/`, where the key hashes everything the output
depends on: the input data's content, the config sections the stage reads, the base model's fingerprint and the
stage's own code. Same inputs → same folder → the stage is skipped; any change → a new folder. A stage that
crashed leaves a folder without `result.json` and is run again (training then resumes from its last checkpoint).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

RESULT_FILE = "result.json"


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


def load_result(folder: Path) -> dict[str, Any] | None:
    path = folder / RESULT_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def save_result(folder: Path, result: dict[str, Any]) -> dict[str, Any]:
    """Write result.json atomically: a crash never leaves a half-written result that looks complete."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (RESULT_FILE + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str))
    os.replace(tmp, folder / RESULT_FILE)
    return result
