"""A base model named so that another machine can find it: the portable reference an exported adapter and a
registered model carry instead of a path on the training machine.

The reference holds the spec as the user wrote it when it is not a local path (the embedded alias
`smollm2-135m-instruct`, a hub id), the hub id of the same model when one is known, and a fingerprint of the weights'
content (not of paths or times), so that the serving machine can check it loaded the very weights the adapter was
trained on. `resolve_portable` finds the base on this machine: a folder the operator names with
`FEWTUNE_BASE_MODEL` (a copy of the weights), else the spec, else the hub id, else the training machine's folder where
this machine has the same path; each local candidate is checked against the fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from tasks.common.models import SMOLLM2_ALIAS, ModelError, ResolvedModel, resolve_base_model

# The embedded alias is this hub model, quantized to Q4_1 and dequantized: an adapter trained on it answers the same
# on the hub's weights only approximately (the merged export carries the exact weights).
KNOWN_HUB_IDS = {SMOLLM2_ALIAS: "HuggingFaceTB/SmolLM2-135M-Instruct"}
BASE_ENV = "FEWTUNE_BASE_MODEL"
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def weights_fingerprint(folder: str | Path) -> str:
    """sha256 of the weight files' bytes (names and contents, in name order) of a local model folder."""
    folder = Path(folder)
    h = hashlib.sha256()
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise ModelError(f"{folder}: no weight files (.safetensors/.bin) to fingerprint")
    for f in files:
        h.update(f.name.encode() + b"\0")
        with f.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:32]


def _hub_id_of(spec: str, path: str) -> str | None:
    if spec in KNOWN_HUB_IDS:
        return KNOWN_HUB_IDS[spec]
    if not Path(spec).expanduser().exists() and "/" in spec and not spec.startswith((".", "/", "~")):
        return spec
    try:
        named = json.loads((Path(path) / "config.json").read_text()).get("_name_or_path") or ""
    except (OSError, ValueError):
        return None
    return named if named.count("/") == 1 and not named.startswith((".", "/", "~")) and not Path(named).exists() else None


def portable_reference(spec: str, path: str) -> dict[str, Any]:
    """How another machine finds the base at `path` (resolved from `spec`): spec, hub id, weights fingerprint."""
    local_spec = Path(spec).expanduser().is_absolute() or spec.startswith((".", "~")) or Path(spec).expanduser().exists()
    local_dir = Path(path).is_dir()
    return {
        "spec": None if local_spec else spec,
        "hub_id": _hub_id_of(spec, path),
        "fingerprint": weights_fingerprint(path) if local_dir else None,
        "name": Path(path).name if local_dir else spec,
        "path": str(Path(path).resolve()) if local_dir else None,  # a hint, tried last and checked by fingerprint
    }


def resolve_portable(reference: dict[str, Any]) -> ResolvedModel:
    """The base model of `reference` on this machine, its weights checked against the recorded fingerprint."""
    wanted = reference.get("fingerprint")
    tried: list[str] = []
    candidates = [os.environ.get(BASE_ENV), reference.get("spec"), reference.get("hub_id"), reference.get("path")]
    for candidate in dict.fromkeys(c for c in candidates if c):
        try:
            resolved = resolve_base_model(candidate)
        except ModelError as exc:
            tried.append(f"{candidate}: {str(exc).splitlines()[0]}")
            continue
        if not resolved.local:  # a hub id: its weights are fetched by from_pretrained and cannot be checked first
            from tasks.common.hub import hub_revision

            if hub_revision(candidate, "model") is None:
                tried.append(f"{candidate}: not on the hub from here, nor in the local Hugging Face cache")
            elif wanted is None or candidate == reference.get("spec"):
                return resolved
            else:
                tried.append(f"{candidate}: a hub id, whose weights cannot be checked against fingerprint {wanted}")
            continue
        if wanted is None or weights_fingerprint(resolved.path) == wanted:
            return resolved
        tried.append(f"{candidate}: weights differ from the ones the adapter was trained on (fingerprint {wanted})")
    raise ModelError(
        f"the base model {reference.get('name')!r} was not found on this machine with the weights the adapter was "
        "trained on; tried:\n  " + ("\n  ".join(tried) or "nothing (no spec, hub id or folder recorded)")
        + f"\n  fix: install it as on the training machine (e.g. `fewtune prepare-model {reference.get('spec') or ''}`), "
        f"or set {BASE_ENV} to a folder holding those weights"
    )
