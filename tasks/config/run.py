"""Sections `run`, `serve`, `webhook`, `cv`, `health` and `doctor`: operations around the stages."""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator

from tasks.config.base import _Section


class RunConfig(_Section):
    name: str | None = Field(None, description="Run folder name; default: <config name>-<UTC timestamp>.")
    runs_dir: str = Field("runs", description="Folder that holds run folders (relative to the current folder).")
    refresh_cache: bool = Field(False, description="Recompute every stage even when a cached result matches.")
    task_runner: Literal["thread", "dask"] = Field(
        "thread",
        description="Where score and augment run: `thread` (in the flow's process) or `dask` (training rows split "
        "into `dask_shards` shards, one task each, on a Dask cluster).",
    )
    dask_address: str | None = Field(
        None, description="Scheduler of an existing Dask cluster (e.g. tcp://10.0.0.5:8786); None: a local cluster per run."
    )
    dask_workers: int = Field(2, ge=1, description="Workers of the local Dask cluster (when dask_address is None).")
    dask_processes: bool = Field(
        False, description="Local cluster workers as processes (true) or threads of the flow's process (false: less memory)."
    )
    dask_shards: int = Field(2, ge=1, description="Shards the training rows are split into for score and augment on Dask.")


def _valid_cron(value: str) -> str:
    from prefect.schedules import Cron  # the same check the Prefect server applies

    try:
        Cron(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a cron expression Prefect accepts; e.g. '0 2 * * *' is 02:00 every day") from None
    return value


class ServeConfig(_Section):
    cron: str = Field("0 2 * * *", description="When the `nightly` deployment runs (cron: minute hour day month weekday).")
    timezone: str = Field("UTC", description="IANA time zone the cron is read in, e.g. Europe/Berlin (daylight saving aware).")
    event: str = Field("fewtune.dataset.landed", description="Prefect event that starts the `dataset-landed` deployment.")
    max_concurrent_runs: int = Field(1, ge=1, description="Flow runs `fewtune serve` executes at the same time.")

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        return _valid_cron(v)

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r}; use an IANA name such as UTC or Europe/Berlin") from None
        return v


class WebhookConfig(_Section):
    host: str = Field("127.0.0.1", description="Address `fewtune webhook` listens on (put a TLS proxy in front).")
    port: int = Field(8787, ge=1, le=65535, description="Port `fewtune webhook` listens on.")
    secret_env: str = Field(
        "FEWTUNE_WEBHOOK_SECRET", description="Environment variable holding the shared HMAC-SHA256 secret (never in files)."
    )
    previous_secret_env: str = Field(
        "FEWTUNE_WEBHOOK_SECRET_PREVIOUS",
        description="Environment variable holding the previous secret, also accepted while senders switch to a new "
        "one (secret rotation); unset it once every sender signs with the new secret.",
    )
    min_secret_length: int = Field(16, ge=1, description="Shortest secret the receiver accepts at start-up.")
    tolerance_s: int = Field(300, ge=1, description="Largest accepted difference between a request's timestamp and now.")
    max_body_bytes: int = Field(16_384, ge=256, description="Larger request bodies are refused (413) before parsing.")
    allowed_uris: list[str] = Field(
        [],
        description="Where landed datasets may live: absolute local folders and object-store prefixes "
        "(s3://bucket/landing/). Anything else is refused.",
    )
    state_db: str | None = Field(
        None, description="SQLite file remembering deliveries and dataset hashes; default: FEWTUNE_HOME/webhook.sqlite."
    )
    delivery_ttl_s: int = Field(
        7 * 24 * 3600, ge=1, description="How long delivery ids are remembered (must exceed tolerance_s)."
    )
    announce_ttl_s: int = Field(
        24 * 3600,
        ge=0,
        description="How long announced content suppresses new runs: another delivery of the same bytes within this "
        "time is answered `unchanged`, later it starts a run again (0: every new delivery starts one). A delivery "
        "with `retrigger: true` always starts one.",
    )
    max_dataset_bytes: int = Field(
        1 << 30,
        ge=1,
        description="Largest landed dataset (a file, or all files of a folder) the receiver accepts and a flow run "
        "reads from a `dataset` URI.",
    )

    @field_validator("allowed_uris")
    @classmethod
    def _allowed(cls, v: list[str]) -> list[str]:
        for entry in v:
            if "://" not in entry and not Path(entry).is_absolute():
                raise ValueError(f"{entry!r}: local entries must be absolute folders, e.g. /data/landing")
            if ".." in entry.replace("\\", "/").split("/"):
                raise ValueError(f"{entry!r}: '..' is not allowed in an allow-list entry")
        return v


class CVConfig(_Section):
    folds: int = Field(
        1,
        ge=1,
        description="k-fold cross-validation of the training rows before the final adapter: k adapters, each trained "
        "on k-1 folds and evaluated on the held-out fold, give the mean ± spread of the task metric and of "
        "forgetting; then the final adapter trains on all rows. 1: off (k times the training time).",
    )
    seed: int = Field(0, description="Seed of the fold assignment (rows derived from one row stay in its fold).")
    suggest_below_rows: int = Field(
        500,
        ge=1,
        description="The validate stage's size advice suggests cv.folds below this many training rows (one test "
        "split of a small set gives a score that moves a lot with which rows land in it).",
    )


class HealthConfig(_Section):
    live_warnings: bool = Field(True, description="Warn in the log during training, at each evaluation, when a sign appears.")
    max_eval_ppl: float = Field(
        5.0,
        gt=1,
        description="Flag when the tuned model's perplexity of the test answers is above this (healthy in-domain "
        "text: about 1.5-4).",
    )
    max_loss_gap: float = Field(
        0.5,
        gt=0,
        description="Flag over-fitting when validation loss minus training loss ends above this many nats (0.5: "
        "validation perplexity 1.65x the training one) and the gap grew since the best validation loss or over the "
        "last `gap_window` evaluations.",
    )
    gap_window: int = Field(3, ge=1, description="Evaluations over which a widening loss gap counts as growing.")
    max_loss_rebound: float = Field(
        0.5,
        gt=0,
        description="Flag oscillation when the training loss climbs back above its lowest value so far by more than "
        "this share of the first logged loss (or becomes NaN): the learning rate is too high.",
    )
    max_loss_rise: float = Field(
        0.1,
        ge=0,
        description="Flag divergence when the last logged training loss is above the first by more than this share "
        "of it (a loss that creeps up instead of converging).",
    )
    metric_margin: float = Field(
        0.0,
        ge=0,
        description="Flag when the tuned model's primary metric is below the baseline's by more than this.",
    )
    min_trainable_tokens: int = Field(
        1000,
        ge=0,
        description="Flag when fewer answer tokens than this carry training loss per epoch (e.g. 100 one-word "
        "labels): too little signal, results swing with the seed.",
    )


class DoctorConfig(_Section):
    min_free_gib: float = Field(
        5.0, ge=0, description="`fewtune doctor`: least free disk space, in GiB, under FEWTUNE_HOME and run.runs_dir."
    )
    timeout_s: float = Field(5.0, gt=0, description="`fewtune doctor`: seconds to wait for the Prefect API and the MLflow server.")
