"""The run folder `<runs_dir>/<run-name>/`: what a run leaves for people to read.

Each run gets its own folder (`start`): an automatic name that another run of the same second already took gets a
suffix; a name set with `run.name` is reused on purpose. The stages write into their cache folders; the run folder
gets copies: the config used, the validated, quarantined and augmented rows, the Data Docs, the scores, the adapter
and its training logs, the predictions, the cross-validation results, `eval_results.json` and `summary.json` (whose
keys are defined here, in `summarize`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Any

import yaml

from flows.results import AugmentOutput, CVOutput, EvalOutput, ScoreOutput, TrainOutput, ValidateOutput
from tasks.common.models import ResolvedModel
from tasks.config import FewtuneConfig
from tasks.health import assess_train_dir
from tasks.register import gate_decision

TRAIN_FILES = ("train_log.json", "train_plan.json", "train_result.json", "tensorboard")
REGISTERED_FILES = ("data", "data_docs", "predictions.jsonl", "probe_predictions.jsonl", "train_log.json", "config.yaml")
TRAIN_SUMMARY = ("method", "train_rows", "validation_rows", "best_val_loss", "best_step", "steps", "epochs_run",
                 "stopped_early", "tokens_per_s", "seconds", "stop_reason", "replay_rows", "replay_source")
EVALUATE_SUMMARY = ("task", "primary_metric", "n_examples", "baseline", "tuned", "gain", "intervals", "overmemorization",
                    "forgetting", "memorization", "robustness", "seconds", "labels", "worth_it")


def baseline_summary(evaluation: dict[str, Any]) -> dict[str, Any] | None:
    """Labelled data: each baseline's metrics and the tuned model's delta against it (without the per-row lists)."""
    table = evaluation.get("baselines")
    if not table:
        return None
    systems = {n: {k: b[k] for k in ("description", "metrics", "tuned_minus")} for n, b in table["systems"].items()}
    return {**{k: v for k, v in table.items() if k != "systems"}, "systems": systems}


@dataclass(frozen=True)
class Run:
    name: str
    dir: Path


def start(cfg: FewtuneConfig, run_name: str) -> Run:
    """Create the run folder and write the config used into it.

    A name the user gave (`run.name`) is reused: when its folder exists, this run writes into it (files of the same
    name are replaced). An automatic name (`<config name>-<UTC timestamp>`) is never shared: the folder is created
    atomically, and when another run started in the same second holds the name, the first free of `<name>-2`,
    `<name>-3`, ... is taken."""
    runs_dir = Path(cfg.run.runs_dir).resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    if cfg.run.name and run_name == cfg.run.name:
        (runs_dir / run_name).mkdir(exist_ok=True)
    else:
        for n in count(1):
            candidate = run_name if n == 1 else f"{run_name}-{n}"
            try:
                (runs_dir / candidate).mkdir()
            except FileExistsError:
                continue
            run_name = candidate
            break
    run_dir = runs_dir / run_name
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.dump(), sort_keys=False))
    return Run(run_name, run_dir)


def copy_into(run_dir: Path, src: str | None, name: str | None = None) -> None:
    """Copy a file or folder into `run_dir` (as `name` when given); nothing when `src` is None or missing."""
    if not src:
        return
    path = Path(src)
    target = run_dir / (name or path.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        shutil.copytree(path, target, dirs_exist_ok=True)
    elif path.exists():
        shutil.copy2(path, target)


def collect(run_dir: Path, validated: ValidateOutput, scored: ScoreOutput, augmented: AugmentOutput,
            trained: TrainOutput, evaluated: EvalOutput, cv: CVOutput | None, cfg: FewtuneConfig) -> dict[str, Any]:
    """Copy the stages' outputs into the run folder, write `eval_results.json`, and return the training-health checks
    (assessed before registration, as a failure there must not follow a registered version)."""
    v = validated
    for src in (v.train_path, v.eval_path, v.quarantine_path, v.report_path, v.warnings_path):
        copy_into(run_dir / "data", src)
    copy_into(run_dir, v.docs_path, "data_docs")
    for src in (scored.scores_path, scored.outliers_path, scored.report_path, scored.histogram_path):
        copy_into(run_dir, src)
    if augmented.report_path:  # augmentation ran: its report, the rows passed to training, the rejected candidates
        for src in (augmented.report_path, augmented.markdown_path):
            copy_into(run_dir, src)
        copy_into(run_dir / "data", augmented.train_path, "augmented.jsonl")
        copy_into(run_dir / "data", augmented.rejected_path, "augment_rejected.jsonl")
    copy_into(run_dir, trained.adapter_path, "adapter")
    copy_into(run_dir / "data", trained.validation_path)  # validation.jsonl: held out of training (memorization control)
    copy_into(run_dir / "data", str(Path(trained.adapter_path).parent / "replay.jsonl"))  # the replay rows, when any
    for name in TRAIN_FILES:
        copy_into(run_dir, str(Path(trained.adapter_path).parent / name))
    copy_into(run_dir, cv.path if cv else None)
    if evaluated.predictions_path:
        copy_into(run_dir, evaluated.predictions_path)
        copy_into(run_dir, str(Path(evaluated.predictions_path).parent / "probe_predictions.jsonl"))
    health = assess_train_dir(Path(trained.adapter_path).parent, evaluated.model_dump(), cfg).to_dict()
    (run_dir / "eval_results.json").write_text(json.dumps(evaluated.model_dump(), indent=2))
    return health


def lineage(run: Run, train_key: str, validated: ValidateOutput, cfg: FewtuneConfig,
            base: ResolvedModel, evaluate_key: str | None = None) -> dict[str, str]:
    """Where a registered model comes from (tags of its version), and the evaluation its decision rests on."""
    return {
        "run_name": run.name,
        "run_dir": str(run.dir),
        "train_key": train_key,
        **({"evaluate_key": evaluate_key} if evaluate_key else {}),
        "data_train_hash": validated.train_hash,
        "data_eval_hash": validated.eval_hash,
        "base_model": cfg.model.base,
        "base_fingerprint": base.fingerprint,
    }


def registered_files(run_dir: Path) -> dict[str, str]:
    """The run folder's files logged with a registered model."""
    return {name: str(run_dir / name) for name in REGISTERED_FILES}


def summarize(cfg: FewtuneConfig, run: Run, validated: ValidateOutput, scored: ScoreOutput,
              augmented: AugmentOutput, trained: TrainOutput, evaluated: EvalOutput, cv: CVOutput | None,
              registered: dict[str, Any] | None, health: dict[str, Any], unchanged: bool) -> dict[str, Any]:
    """The run summary (`summary.json`, also what the flow returns), with the training-health checks and the gate."""
    evaluation = evaluated.model_dump()
    return {
        "run_name": run.name,
        "run_dir": str(run.dir),
        "base_model": cfg.model.base,
        "validate": validated.summary,
        "score": scored.summary,
        "augment": augmented.summary,
        "train": {k: getattr(trained, k) for k in TRAIN_SUMMARY},
        "evaluate": {k: evaluation.get(k) for k in EVALUATE_SUMMARY} | {"baselines": baseline_summary(evaluation)},
        "examples": evaluated.examples,
        "register": registered,
        # The gate's criteria for the report when registration is off (no registry: the champion criterion is off).
        "gate": registered["gate"] if registered else gate_decision(
            evaluation, cfg, {"off": "not compared: registration is off (register.enabled=false)"}).to_dict(),
        "health": health,
        "cv": cv.model_dump() if cv else None,
        "unchanged": unchanged,
        "report": str(run.dir / "report.html"),
    }


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
