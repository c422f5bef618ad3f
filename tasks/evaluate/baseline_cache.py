"""The base model's side of an evaluation, kept between runs.

The baseline answers the same eval prompts, scores the same eval rows and the same general-ability probe in every
run that shares the base model, the eval rows and the settings: a nightly re-train on new training rows would
otherwise spend half its evaluation recomputing them. Each part (answers, eval-row perplexity, general-text
perplexity, general answers, k-shot predictions, extraction checks, judge scores) is stored under a key that hashes
what that part reads: the run-wide key (base model fingerprint, dtype, the model/evaluate settings, the evaluate
code) and the part's own inputs (the prompts, rows, probe, k-shot examples, extraction cases). A changed input
changes the key; a part whose inputs include the training rows (k-shot examples, extraction cases) is reused only
when those are unchanged too.

Files are written whole (temporary file, fsync, rename) with a SHA-256 of their content checked on reading; a
damaged or unreadable file is recomputed, never trusted. `evaluate.baseline_cache: false` turns the cache off;
`run.refresh_cache` recomputes every part (and stores it again).
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

from tasks.common.cache import hash_text

log = logging.getLogger("fewtune.evaluate")
T = TypeVar("T")
MAGIC = b"fewtune-baseline-v1\n"


@dataclass
class BaselineCache:
    """Parts of the baseline's evaluation under `folder` (None: nothing stored, every part computed)."""

    folder: Path | None
    key: str
    refresh: bool = False  # compute every part again (run.refresh_cache) and store it
    parts: dict[str, str] = field(default_factory=dict)  # part -> "reused" | "computed"

    def get(self, part: str, inputs: Any, compute: Callable[[], T]) -> T:
        """The stored value of `part` for `inputs`, else `compute()` (stored for the next run)."""
        found = self.find(part, inputs)
        return found[0] if found is not None else self.put(part, inputs, compute())

    def find(self, part: str, inputs: Any) -> tuple[Any] | None:
        """(the stored value,) of `part` for `inputs`; None when there is none (or the cache is off or refreshed)."""
        if self.folder is None or self.refresh:
            return None
        found = _read(self._path(part, inputs))
        if found is not None:
            self.parts[part] = "reused"
        return found

    def put(self, part: str, inputs: Any, value: T) -> T:
        """Stores a computed `value` of `part` for `inputs` (kept for the next run) and returns it."""
        self.parts[part] = "computed"
        if self.folder is None:
            return value
        try:
            _write(self._path(part, inputs), value)
        except (OSError, pickle.PicklingError, AttributeError, TypeError) as exc:
            log.warning("baseline cache: %s not stored (%s: %s); the next run computes it again", part,
                        type(exc).__name__, exc)
        return value

    def _path(self, part: str, inputs: Any) -> Path:
        return self.folder / f"{part}-{hash_text(self.key, part, inputs)}.pkl"

    def summary(self) -> dict[str, Any]:
        """What this run reused and computed (for the evaluation's record)."""
        return {"enabled": self.folder is not None, "key": self.key, "parts": dict(self.parts),
                "reused": sorted(p for p, how in self.parts.items() if how == "reused")}


def baseline_cache_for(runs_dir: str | Path, enabled: bool, refresh: bool, *key_parts: Any) -> BaselineCache:
    """The cache of a run: `<runs_dir>/.cache/baseline`, its run-wide key from `key_parts` (base model fingerprint,
    settings, code) and the installed torch and transformers versions (their kernels shape the numbers)."""
    import torch
    import transformers

    key = hash_text(*key_parts, torch.__version__, transformers.__version__)
    return BaselineCache(Path(runs_dir) / ".cache" / "baseline" if enabled else None, key, refresh)


def _read(path: Path) -> tuple[Any] | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("baseline cache: cannot read %s (%s); computing it again", path, exc)
        return None
    head, _, rest = data.partition(b"\n")
    digest, _, payload = rest.partition(b"\n")
    if head + b"\n" != MAGIC or hashlib.sha256(payload).hexdigest().encode() != digest:
        log.warning("baseline cache: %s is damaged (checksum); computing it again", path)
        return None
    try:
        return (pickle.loads(payload),)
    except Exception as exc:  # noqa: BLE001  (a file from other code: recompute, never fail the run on it)
        log.warning("baseline cache: %s cannot be loaded (%s); computing it again", path, exc)
        return None


def _write(path: Path, value: Any) -> None:
    payload = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        f.write(MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
