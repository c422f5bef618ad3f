"""Incremental mode: continue an existing adapter (a folder, or the registered model's `champion` version) instead
of training a fresh one (`train.init_adapter`)."""

from __future__ import annotations

import hashlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from tasks.common.home import fewtune_home
from tasks.common.models import ModelError
from tasks.common.registry import CHAMPION, tracking_uri
from tasks.config import FewtuneConfig
from tasks.train.peft_models import adapter_method

log = logging.getLogger("fewtune.train")


@dataclass(frozen=True)
class InitAdapter:
    path: str
    source: str  # what the config said: a folder, or "champion"
    fingerprint: str  # changes when the adapter changes; part of the train stage's cache key


def _folder_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def champion_adapter(cfg: FewtuneConfig) -> InitAdapter | None:
    """The adapter of the registered model's `champion` version (downloaded once), or None when there is none."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    uri = tracking_uri(cfg)
    name = cfg.register_.model_name
    try:
        version = MlflowClient(uri).get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    target = fewtune_home() / "champions" / f"{name}-v{version.version}"
    if not (target.exists() and any(target.rglob("adapter_config.json"))):
        tmp = target.with_name(target.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        mlflow.set_tracking_uri(uri)
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version.version}", dst_path=str(tmp))
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    found = sorted(target.rglob("adapter_config.json"))
    if not found:
        raise ModelError(f"{name} version {version.version} (champion) holds no adapter under {target}")
    folder = found[0].parent
    return InitAdapter(str(folder), f"champion ({name} version {version.version})", _folder_hash(folder))


def resolve_init_adapter(cfg: FewtuneConfig) -> InitAdapter | None:
    """train.init_adapter as a local folder: `champion` asks the registry; None when training starts fresh."""
    spec = cfg.train.init_adapter
    if not spec:
        return None
    if spec == "champion":
        found = champion_adapter(cfg)
        if found is None:
            log.info("incremental mode: %s has no champion yet; training a fresh adapter", cfg.register_.model_name)
        return found
    folder = Path(spec).expanduser().resolve()
    adapter_method(folder)  # clear error when it is not an adapter folder
    return InitAdapter(str(folder), spec, _folder_hash(folder))
