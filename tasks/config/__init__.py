"""The one configuration model of fewtune.

Every number the pipeline uses is a named field here with a documented default. A config is read from YAML
(`configs/demo.yaml` is the embedded default) and adjusted with dotted `key=value` overrides, e.g.
`--set train.learning_rate=1e-4`. Relative paths in a config file are resolved against the file's folder, relative
paths given with `--set` against the current folder."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tasks.config.augment import AugmentConfig, GeneratorConfig, ParaphraseConfig
from tasks.config.base import DEFAULT_CONFIG, REPO_ROOT, ConfigError, _Section
from tasks.config.data import DataConfig, ModelConfig, ValidateConfig
from tasks.config.evaluate import EvaluateConfig, RegisterConfig
from tasks.config.run import CVConfig, DoctorConfig, HealthConfig, RunConfig, ServeConfig, WebhookConfig
from tasks.config.score import ScoreConfig, TokenMaskingConfig
from tasks.config.train import TrainConfig


class FewtuneConfig(_Section):
    name: str = Field("fewtune", description="Config name; used in run names and the MLflow experiment.")
    data: DataConfig
    model: ModelConfig = ModelConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    score: ScoreConfig = ScoreConfig()
    augment: AugmentConfig = AugmentConfig()
    train: TrainConfig = TrainConfig()
    cv: CVConfig = CVConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    health: HealthConfig = HealthConfig()
    register_: RegisterConfig = Field(RegisterConfig(), alias="register")
    run: RunConfig = RunConfig()
    serve: ServeConfig = ServeConfig()
    webhook: WebhookConfig = WebhookConfig()
    doctor: DoctorConfig = DoctorConfig()

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
    for key in ("train", "eval", "probe", "replay"):
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
        "This page is generated from `tasks/config/` (`python -m tasks.config > docs/configuration.md`).",
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
            fields = [(f"{key}.{sub}", info)]
            if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):  # a nested section
                fields = [(f"{key}.{sub}.{n}", i) for n, i in info.annotation.model_fields.items()]
            for dotted, item in fields:
                default = "required" if item.is_required() else f"`{json.dumps(item.default)}`"
                lines.append(f"| `{dotted}` | {default} | {(item.description or '').replace('|', '/')} |")
    return "\n".join(lines) + "\n"




__all__ = [
    "AugmentConfig",
    "CVConfig",
    "ConfigError",
    "DEFAULT_CONFIG",
    "DataConfig",
    "DoctorConfig",
    "EvaluateConfig",
    "FewtuneConfig",
    "GeneratorConfig",
    "HealthConfig",
    "ModelConfig",
    "ParaphraseConfig",
    "REPO_ROOT",
    "RegisterConfig",
    "RunConfig",
    "ScoreConfig",
    "ServeConfig",
    "TokenMaskingConfig",
    "TrainConfig",
    "ValidateConfig",
    "WebhookConfig",
    "apply_overrides",
    "load_config",
    "reference_markdown",
]
