"""`fewtune models list | promote VERSION | rollback`: registry operations by hand."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from tasks.common.registry import CHAMPION, HISTORY_TAG, RegistryError, _quiet_mlflow, tracking_uri
from tasks.config import FewtuneConfig
from tasks.register.champion import champion_history, set_champion
from tasks.register.versions import unfinished


def _client(cfg: FewtuneConfig):
    _quiet_mlflow()
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri(cfg))
    try:
        client.get_registered_model(cfg.register_.model_name)
    except MlflowException:
        raise RegistryError(
            f"no registered model {cfg.register_.model_name!r} at {tracking_uri(cfg)}; run `fewtune run` first, or pass "
            "--name / --config for another model"
        ) from None
    return client


def list_versions(cfg: FewtuneConfig) -> list[dict[str, Any]]:
    """Every version of the registered model, newest first, with aliases, gate decision and key metric."""
    client = _client(cfg)
    name = cfg.register_.model_name
    rows = []
    for v in client.search_model_versions(f"name = '{name}'"):
        full = client.get_model_version(name, v.version)
        tags = full.tags or {}
        if unfinished(client, full):  # an interrupted registration: no gate decision, never aliased
            tags = {**tags, "promoted": "unfinished", "gate": "registration interrupted: no gate decision, not usable"}
        rows.append(
            {
                "version": str(full.version),
                "aliases": sorted(full.aliases or []),
                "created": datetime.fromtimestamp(full.creation_timestamp / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M"),
                "run_name": tags.get("run_name", ""),
                "primary_metric": tags.get("primary_metric", ""),
                "primary_value": tags.get("primary_value", ""),
                "promoted": tags.get("promoted", ""),
                "gate": tags.get("gate", ""),
                "criteria": {k[len("gate."):]: v for k, v in sorted(tags.items()) if k.startswith("gate.")},
                "data_train_hash": tags.get("data_train_hash", "")[:12],
                "code_version": tags.get("code_version", ""),
            }
        )
    return sorted(rows, key=lambda r: int(r["version"]), reverse=True)


def promote(cfg: FewtuneConfig, version: str) -> dict[str, Any]:
    """Make `version` the champion by hand (whatever its gate said); returns the version and the previous champion."""
    from mlflow.exceptions import MlflowException

    client = _client(cfg)
    name = cfg.register_.model_name
    try:
        target = client.get_model_version(name, str(version))
    except MlflowException:
        known = ", ".join(r["version"] for r in list_versions(cfg)) or "none"
        raise RegistryError(f"{name} has no version {version}; versions: {known}") from None
    if unfinished(client, target):
        raise RegistryError(f"{name} version {version} is an unfinished registration (interrupted before its gate "
                            "decision was recorded) and cannot be promoted; run fewtune again on its inputs")
    try:
        before = str(client.get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        before = None
    set_champion(client, name, str(target.version), "promote")
    client.set_model_version_tag(name, str(target.version), "promoted_by_hand", "true")
    return {"version": str(target.version), "previous": before, "gate": (target.tags or {}).get("gate", "")}


def rollback(cfg: FewtuneConfig) -> dict[str, Any]:
    """Move `champion` back to the champion before the current one (from the champion history)."""
    from mlflow.exceptions import MlflowException

    client = _client(cfg)
    name = cfg.register_.model_name
    try:
        current = str(client.get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        raise RegistryError(f"{name} has no champion to roll back") from None
    history = champion_history(client, name)
    while history and history[-1]["version"] == current:
        history.pop()
    if not history:
        raise RegistryError(
            f"{name} version {current} is the first champion: there is no earlier one to roll back to "
            "(use `fewtune models promote VERSION` to pick one)"
        )
    previous = history[-1]["version"]
    client.set_registered_model_alias(name, CHAMPION, previous)
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    return {"from": current, "to": previous}
