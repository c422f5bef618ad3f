"""The whole config checked before any work starts: every problem that would stop a run later, reported at once.

`fewtune run` calls `preflight` after loading the config (before a Prefect server starts) and the flow calls it
again before its first stage (a deployment's run, or a landed dataset that replaced `data.train`). It reuses the
`doctor` checks a run depends on and adds the data files; field values themselves (metric names, ranges, the
metric fitting the task) are checked when the config is loaded. Nothing is downloaded, converted or trained.

Checked: `data.train/eval/probe/replay` exist (local paths and file:// URIs; hub ids offline are looked up in the
local Hugging Face cache), `model.base` and a local augmentation generator's model are found, `train.method: qlora`
has CUDA and bitsandbytes, `train.num_processes > 1` has accelerate, `run.task_runner: dask` has prefect-dask, the
disk has `doctor.min_free_gib` free, the MLflow store is writable or the server answers (`register.enabled`), and
each tracker in `train.report_to` is installed.
"""

from __future__ import annotations

import importlib.util
import os
import urllib.parse
from pathlib import Path

from tasks.common.cache import looks_like_hub_id
from tasks.config import ConfigError, FewtuneConfig
from tasks.doctor import (
    Finding,
    check_base_model,
    check_bitsandbytes,
    check_disk,
    check_mlflow,
    check_trackers,
)

DATA_FIELDS = ("train", "eval", "probe", "replay")


def check_data_source(field: str, spec: str | None) -> Finding:
    """Whether `data.<field>` can be read: a local file or folder that exists, a file:// URI to one, a hub id
    (offline: in the local cache), or an object-store URI (read when the run starts)."""
    label = f"data.{field}"
    if not spec:
        if field == "train":
            return Finding(label, "fix", "not set", "set data.train to a .jsonl/.csv/.parquet file, a folder or a hub id")
        return Finding(label, "ok", "not set")
    if "://" in spec:
        if not spec.startswith("file://"):
            return Finding(label, "ok", f"{spec}: object-store URI (fetched when the run starts)")
        path = Path(urllib.parse.urlparse(spec).path)
    elif looks_like_hub_id(spec) and not Path(spec).exists():
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            from tasks.common.hub import hub_revision

            if hub_revision(spec, "dataset") is None:
                return Finding(label, "fix", f"{spec}: not in the local Hugging Face cache, and HF_HUB_OFFLINE=1",
                               f"download it where the hub is reachable, or point data.{field} at a local file")
        return Finding(label, "ok", f"{spec}: hub dataset")
    else:
        path = Path(spec).expanduser()
    if not path.exists():
        return Finding(label, "fix", f"{path}: no such file or folder",
                       f"fix data.{field} (relative paths are read from the config file's folder)")
    return Finding(label, "ok", str(path))


def check_package(label: str, module: str, install: str) -> Finding:
    if importlib.util.find_spec(module) is None:
        return Finding(label, "fix", f"needs the package {module}, which is not installed", install)
    return Finding(label, "ok", f"{module} installed")


def preflight_findings(cfg: FewtuneConfig) -> list[Finding]:
    """Every check a run of `cfg` depends on, `fix` where the run would fail."""
    findings = [check_data_source(field, getattr(cfg.data, field)) for field in DATA_FIELDS]
    findings.append(check_base_model(cfg.model.base))
    generator = cfg.augment.generator
    if (cfg.augment.enabled or cfg.score.outlier_action == "augment") and generator.kind == "local" and generator.model:
        found = check_base_model(generator.model)
        findings.append(Finding("augment.generator.model", found.status, found.detail, found.fix))
    if cfg.train.method == "qlora":
        bnb = check_bitsandbytes(cfg)
        findings.append(Finding("train.method qlora", bnb.status, bnb.detail, bnb.fix))
    if cfg.train.num_processes > 1:
        findings.append(check_package("train.num_processes", "accelerate", "pip install accelerate"))
    if cfg.run.task_runner == "dask":
        findings.append(check_package("run.task_runner dask", "prefect_dask", "pip install prefect-dask"))
    findings += check_disk(cfg)
    if cfg.register_.enabled:
        findings.append(check_mlflow(cfg))
    findings.append(check_trackers(cfg))
    return findings


def preflight(cfg: FewtuneConfig) -> None:
    """Raise one `ConfigError` listing every problem that would stop a run of `cfg`, each with its fix."""
    problems = [f for f in preflight_findings(cfg) if f.status == "fix"]
    if not problems:
        return
    lines = [f"the configuration cannot run as it is ({len(problems)} problem(s), found before any work started):"]
    for f in problems:
        lines.append(f"  {f.check}: {f.detail}")
        if f.fix:
            lines.append(f"    fix: {f.fix}")
    raise ConfigError("\n".join(lines))
