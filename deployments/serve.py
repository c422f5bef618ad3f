"""`fewtune serve`: the two deployments of the `finetune` flow, served from this process (no work pool needed).

- `finetune/nightly` — runs on `serve.cron` in `serve.timezone` (default 02:00 UTC) with the given config. On
  unchanged data every stage is a cache hit and the run ends in seconds, saying "unchanged data: nothing to
  retrain"; new data gives a full run.
- `finetune/dataset-landed` — started by the Prefect event `serve.event` (`fewtune.dataset.landed`, emitted by
  `fewtune webhook`) through a `DeploymentEventTrigger`; its `dataset` parameter is templated from the event
  payload (`{{ event.payload.dataset_uri }}`). The flow admits that URI only inside `webhook.allowed_uris` and up
  to `webhook.max_dataset_bytes` of the run's config (`tasks.common.landing.admit_dataset`, the receiver's rules),
  so an event emitted by anyone else, or a run started with another `dataset`, reads nothing elsewhere.

Both can also be started by hand: `prefect deployment run 'finetune/nightly' --param dataset=/data/new.jsonl`.
Flow runs execute in subprocesses of this process, `serve.max_concurrent_runs` at a time, in its working folder
(relative `run.runs_dir` lands there). `deployments/prefect.yaml` declares the same two deployments for a process
work pool and `prefect worker`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.config import DEFAULT_CONFIG, ConfigError, FewtuneConfig, load_config

NIGHTLY = "nightly"
LANDED = "dataset-landed"


def require_api_url(command: str) -> str:
    """The Prefect API URL, or `ConfigError`: deployments need a running server, not an ephemeral one."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        raise ConfigError(
            f"{command} needs a Prefect server: start one with `prefect server start` and "
            "export PREFECT_API_URL=http://127.0.0.1:4200/api (see docs/operations.md)"
        )
    return url


def build_deployments(config_path: str | None = None, overrides: list[str] | None = None) -> list[Any]:
    """The nightly and dataset-landed `RunnerDeployment`s for a config (validated here, before serving)."""
    from prefect.events import DeploymentEventTrigger
    from prefect.schedules import Cron
    from prefect.types.entrypoint import EntrypointType

    from flows.finetune import finetune

    path = str(Path(config_path or DEFAULT_CONFIG).resolve())
    cfg: FewtuneConfig = load_config(path, overrides or [])
    params: dict[str, Any] = {"config_path": path, "overrides": list(overrides or []), "dataset": None}
    # paused=False: a restart resumes the schedule that stopping `fewtune serve` paused.
    common = {"entrypoint_type": EntrypointType.MODULE_PATH, "tags": ["fewtune", cfg.name], "paused": False}
    nightly = finetune.to_deployment(
        name=NIGHTLY,
        schedule=Cron(cfg.serve.cron, timezone=cfg.serve.timezone),
        parameters=params,
        description=f"Nightly retraining of {cfg.name}: seconds when nothing changed, a full run on new data.",
        **common,
    )
    landed = finetune.to_deployment(
        name=LANDED,
        parameters=params,
        triggers=[
            DeploymentEventTrigger(
                name=f"{cfg.name}: {cfg.serve.event}",
                expect={cfg.serve.event},
                parameters={**params, "dataset": "{{ event.payload.dataset_uri }}"},
            )
        ],
        description=f"Retrain {cfg.name} on a landed dataset (event {cfg.serve.event}).",
        **common,
    )
    return [nightly, landed]


def serve(config_path: str | None = None, overrides: list[str] | None = None) -> None:
    """Register both deployments with the Prefect API and execute their runs until interrupted."""
    from prefect import serve as prefect_serve

    require_api_url("fewtune serve")
    cfg = load_config(config_path, overrides or [])
    prefect_serve(*build_deployments(config_path, overrides), limit=cfg.serve.max_concurrent_runs)
