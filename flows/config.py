"""The one configuration model of fewtune.

Every number the pipeline uses is a named field here with a documented default. A config is read from YAML
(`configs/demo.yaml` is the embedded default) and adjusted with dotted `key=value` overrides, e.g.
`--set train.learning_rate=1e-4`. Relative paths in a config file are resolved against the file's folder, relative
paths given with `--set` against the current folder.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "demo.yaml"


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says what to change."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Section):
    train: str = Field(description="Training data: a .jsonl/.json/.csv/.parquet file, a `save_to_disk` folder or a hub id.")
    eval: str | None = Field(None, description="Held-out eval/test data; when absent, `eval_fraction` of train is split off.")
    probe: str | None = Field(None, description="General-ability probe set (any accepted format), for forgetting checks.")
    format: Literal["auto", "messages", "prompt_completion", "alpaca", "text_label"] = Field(
        "auto", description="Row shape: auto-detected from the first row, or one of messages, prompt_completion, alpaca, text_label."
    )
    eval_fraction: float = Field(0.15, gt=0, lt=1, description="Share of train held out when no eval file is given.")
    split_seed: int = Field(0, description="Seed of the deterministic train/eval split.")
    system_prompt: str | None = Field(None, description="System message added to rows that have none.")
    max_bad_fraction: float = Field(
        0.2, ge=0, le=1, description="Stop the run when more than this share of rows cannot be read or is quarantined."
    )


class ModelConfig(_Section):
    base: str = Field(
        "smollm2-135m-instruct",
        description="Base model: the alias `smollm2-135m-instruct`, a hub id, a local folder or a .gguf file.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Compute dtype; auto = bfloat16 where the hardware runs it fast, else float32."
    )
    max_length: int = Field(256, ge=16, description="Tokens per example after the chat template; longer rows are cut.")


class ValidateConfig(_Section):
    min_rows: int = Field(8, ge=1, description="Fewer usable training rows than this stops the run.")
    min_eval_rows: int = Field(2, ge=1, description="Fewer usable eval rows than this stops the run.")
    max_chars: int = Field(20_000, ge=1, description="Longest accepted message content, in characters.")


class ScoreConfig(_Section):
    batch_size: int = Field(16, ge=1, description="Sequences per forward pass when scoring.")
    outlier_z: float = Field(3.5, gt=0, description="Robust z-score of log-perplexity above which a row is an outlier.")


class AugmentConfig(_Section):
    enabled: bool = Field(False, description="Self-distillation / paraphrase of training rows (off: pass-through).")


class TrainConfig(_Section):
    method: Literal["lora"] = Field("lora", description="PEFT method.")
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(0.1, ge=0, lt=1, description="Dropout on the LoRA path (0.1-0.2 for small data).")
    target_modules: list[str] | str = Field(
        "all-linear", description="Modules that get adapters; `all-linear` = every linear layer but the output head."
    )
    lora_top_layers: int | None = Field(
        None,
        ge=1,
        description="Adapt only the top N transformer layers (None: all). The backward pass then stops there: "
        "several times cheaper on a CPU, at some cost in capacity.",
    )
    learning_rate: float = Field(
        2e-4, gt=0, description="Peak learning rate. LoRA trains few, freshly initialised weights: 1e-4..3e-4 is usual."
    )
    epochs: float = Field(3.0, gt=0, description="Passes over the training rows (early stopping may end sooner).")
    batch_size: int = Field(8, ge=1, description="Micro-batch size per device.")
    gradient_accumulation: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr_scheduler: Literal["linear", "cosine", "constant_with_warmup"] = Field("cosine", description="Learning-rate schedule.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of steps spent warming the learning rate up.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (0.01-0.05).")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping.")
    evals_per_epoch: int = Field(2, ge=1, description="Evaluations (and checkpoints) per epoch.")
    early_stopping_patience: int = Field(2, ge=1, description="Evaluations without eval-loss improvement before stopping.")
    validation_fraction: float = Field(
        0.1, gt=0, lt=1, description="Share of training rows held out for early stopping (the eval set stays untouched)."
    )
    seed: int = Field(42, description="Seed for adapter init, dropout, data order and the validation slice.")


class EvaluateConfig(_Section):
    max_new_tokens: int = Field(48, ge=1, description="Greedy generation budget per test prompt.")
    batch_size: int = Field(16, ge=1, description="Prompts per generation batch.")
    max_examples: int | None = Field(None, ge=1, description="Evaluate on the first N test rows only (None: all).")
    primary_metric: Literal["rouge_l", "exact_match"] = Field(
        "rouge_l", description="Metric the promotion gate compares between baseline and tuned model."
    )
    examples_in_summary: int = Field(5, ge=0, description="Side-by-side example outputs kept in the summary.")


class RegisterConfig(_Section):
    enabled: bool = Field(True, description="Log the run to MLflow and register a model version.")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; default: SQLite under FEWTUNE_HOME.")
    model_name: str = Field("fewtune-demo", description="Registered model name.")
    min_gain: float = Field(0.0, description="Tuned primary metric must exceed baseline by more than this to be champion.")


class RunConfig(_Section):
    name: str | None = Field(None, description="Run folder name; default: <config name>-<UTC timestamp>.")
    runs_dir: str = Field("runs", description="Folder that holds run folders (relative to the current folder).")
    refresh_cache: bool = Field(False, description="Recompute every stage even when a cached result matches.")


class FewtuneConfig(_Section):
    name: str = Field("fewtune", description="Config name; used in run names and the MLflow experiment.")
    data: DataConfig
    model: ModelConfig = ModelConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    score: ScoreConfig = ScoreConfig()
    augment: AugmentConfig = AugmentConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    register_: RegisterConfig = Field(RegisterConfig(), alias="register")
    run: RunConfig = RunConfig()

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not v or any(c in v for c in "/\\ "):
            raise ValueError("use letters, digits, '-' or '_' (no spaces or slashes)")
        return v

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def section_hash(self, *sections: str) -> str:
        """Stable hash of some config sections (used in stage cache keys)."""
        data = self.dump()
        picked = {s: data[s] for s in sections}
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]


def _parse_value(text: str) -> Any:
    """`--set` values are YAML scalars: 1e-4, true, null, [a, b] all work."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set train.epochs=2")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"--set {item!r}: the key needs dotted names, e.g. --set train.epochs=2")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a section")
        node[parts[-1]] = _parse_value(value)
    return raw


def _looks_like_hub_id(value: str) -> bool:
    return "/" in value and not value.startswith((".", "/")) and not Path(value).suffix


def _resolve_paths(raw: dict[str, Any], base_dir: Path) -> None:
    # Sections that are not mappings are left for validation to report.
    data = raw.get("data")
    data = data if isinstance(data, dict) else {}
    for key in ("train", "eval", "probe"):
        value = data.get(key)
        if isinstance(value, str) and value and not Path(value).is_absolute():
            candidate = (base_dir / value).resolve()
            # A missing file is still resolved, so the error names the place it was looked for; only a hub id
            # (owner/name[:split]) with nothing of that name under base_dir stays as written.
            if candidate.exists() or not _looks_like_hub_id(value):
                data[key] = str(candidate)
    model = raw.get("model")
    model = model if isinstance(model, dict) else {}
    base = model.get("base")
    if isinstance(base, str) and (base.startswith(".") or base.endswith(".gguf")) and not Path(base).is_absolute():
        candidate = (base_dir / base).resolve()
        if candidate.exists():
            model["base"] = str(candidate)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> FewtuneConfig:
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.exists():
        raise ConfigError(f"config file {path} not found; pass --config FILE or omit it for the embedded demo")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (data:, model:, train: ...)")
    raw.setdefault("name", path.stem)
    _resolve_paths(raw, path.parent)
    apply_overrides(raw, overrides or [])
    _resolve_paths(raw, Path.cwd())  # only paths that are still relative: those given with --set
    try:
        return FewtuneConfig.model_validate(raw)
    except ValidationError as exc:
        lines = [f"{path}: invalid configuration"]
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"])
            msg = "unknown key (check its spelling and section)" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"  {where}: {msg}")
        lines.append("See docs/configuration.md for every field and its default.")
        raise ConfigError("\n".join(lines)) from None


def reference_markdown() -> str:
    """The configuration reference (docs/configuration.md is this text; a test keeps them in sync)."""
    lines = [
        "# Configuration reference",
        "",
        "One YAML file configures a run; `configs/demo.yaml` is the embedded default. Any field can be overridden with",
        "`fewtune run --set section.field=value` (the value is parsed as YAML). Relative paths in a config file are",
        "resolved against the file's folder; paths given with `--set` against the current folder.",
        "",
        "This page is generated from `flows/config.py` (`python -m flows.config > docs/configuration.md`).",
        "",
        "| field | default | description |",
        "|---|---|---|",
    ]
    for name, field in FewtuneConfig.model_fields.items():
        if not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            default = "required" if field.is_required() else f"`{field.default}`"
            lines.append(f"| `{name}` | {default} | {field.description or ''} |")
    for name, field in FewtuneConfig.model_fields.items():
        section = field.annotation
        if not isinstance(section, type) or not issubclass(section, BaseModel):
            continue
        key = field.alias or name
        lines += ["", f"## `{key}`", "", "| field | default | description |", "|---|---|---|"]
        for sub, info in section.model_fields.items():
            default = "required" if info.is_required() else f"`{json.dumps(info.default)}`"
            lines.append(f"| `{key}.{sub}` | {default} | {(info.description or '').replace('|', '/')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
