"""What each cached stage hands to the next: typed records, stored as the stage folder's `result.json`.

A record holds paths to the stage's files, the content hash of the rows it passes on and its summary for
`summary.json`. Training and evaluation records also carry any field their stage adds later (`extra="allow"`), so a
result round-trips unchanged: `eval_results.json` is the evaluation record, key for key. Numbers are typed
`int | float` so that loading never turns an integer into a float.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict

from tasks.common import cache

Number = int | float


class StageOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ValidateOutput(StageOutput):
    train_path: str
    eval_path: str
    probe_path: str | None = None  # the data.probe rows, added to the shipped general-ability probe
    quarantine_path: str
    report_path: str
    warnings_path: str | None = None
    docs_path: str | None = None
    train_hash: str
    eval_hash: str
    summary: dict[str, Any]


class ScoreOutput(StageOutput):
    model_config = ConfigDict(extra="allow")  # written by tasks.score.finish_scores

    scores_path: str
    train_path: str  # the rows passed on to augment and train (outliers dropped with score.outlier_action=drop)
    train_hash: str
    token_masks_path: str | None = None
    token_masks_hash: str | None = None
    augment_ids: list[str] = []
    outliers_path: str | None = None
    report_path: str | None = None
    histogram_path: str | None = None
    summary: dict[str, Any]


class AugmentOutput(StageOutput):
    train_path: str  # the rows training receives
    train_hash: str
    report_path: str | None = None  # None when augmentation did not run
    markdown_path: str | None = None
    rejected_path: str | None = None
    summary: dict[str, Any]


class CVOutput(StageOutput):
    folds: list[dict[str, Any]]
    primary_metric: str
    summary: dict[str, dict[str, Any]] = {}
    path: str | None = None


class TrainOutput(StageOutput):
    model_config = ConfigDict(extra="allow")

    adapter_path: str
    method: str
    train_rows: int
    validation_rows: int
    best_val_loss: Number | None
    best_step: int | None
    steps: int
    epochs_run: Number
    stopped_early: bool
    tokens_per_s: Number | None
    seconds: Number
    stop_reason: str = "completed"
    replay_rows: int = 0
    replay_source: str | None = None  # data.replay, or on-policy (the base model's answers to general prompts)
    validation_path: str | None = None  # the validation slice held out of training (memorization's control rows)


class EvalOutput(StageOutput):
    """The evaluation, in the order `EvalResult.to_dict()` writes it (the content of `eval_results.json`)."""

    model_config = ConfigDict(extra="allow")

    baseline: dict[str, Any]
    tuned: dict[str, Any]
    primary_metric: str
    n_examples: int
    task: str = "generation"
    generation: dict[str, Any] = {}
    bootstrap: dict[str, Any] = {}
    intervals: dict[str, dict[str, Any]] = {}
    overmemorization: dict[str, Any] = {}
    forgetting: dict[str, Any] | None = None
    memorization: dict[str, Any] | None = None
    robustness: dict[str, Any] = {}
    seconds: dict[str, Any] = {}
    examples: list[dict[str, Any]] = []
    predictions_path: str | None = None
    labels: list[str] | None = None
    baselines: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None
    worth_it: str | None = None
    gain: Number


Output = TypeVar("Output", bound=StageOutput)

OUTPUTS: dict[str, type[StageOutput]] = {
    "validate": ValidateOutput, "score": ScoreOutput, "augment": AugmentOutput, "cv": CVOutput, "train": TrainOutput,
    "evaluate": EvalOutput,
}


def save_output(folder: Path, output: Output) -> Output:
    """Write `output` as the stage folder's result.json (atomically: see `cache.save_result`)."""
    cache.save_result(folder, output.model_dump())
    return output


def load_output(folder: Path, kind: type[Output]) -> Output | None:
    """The complete result of an earlier run of the stage in `folder`, or None (none, or written by other code)."""
    found = cache.load_result(folder)
    if found is None:
        return None
    try:
        return kind.model_validate(found)
    except ValueError:  # pydantic's ValidationError: a result of another shape is no result
        return None
