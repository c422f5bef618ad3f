"""Log the run to MLflow and register the tuned model behind a promotion gate.

Every run that reaches this stage becomes a new version of the registered model with alias `challenger`. The alias
`champion` moves to it only when the gate passes: the tuned model's primary metric beats the baseline's by more than
`register.min_gain`. The logged model is an MLflow pyfunc holding the LoRA adapter plus a reference to the base
model (logging a PEFT model with a local base through `mlflow.transformers` silently re-initialises weights), so
`mlflow.pyfunc.load_model("models:/NAME@champion")` answers prompts with the tuned model.

Default store: SQLite at `$FEWTUNE_HOME/mlflow.db`, artifacts under `$FEWTUNE_HOME/mlartifacts/`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from flows.config import FewtuneConfig
from tasks.models import fewtune_home

log = logging.getLogger("fewtune.register")

CHAMPION = "champion"
CHALLENGER = "challenger"


def tracking_uri(cfg: FewtuneConfig) -> str:
    return cfg.register_.tracking_uri or f"sqlite:///{fewtune_home() / 'mlflow.db'}"


def _quiet_mlflow() -> None:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("mlflow", "alembic", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)


try:
    import mlflow.pyfunc as _pyfunc

    _PythonModel = _pyfunc.PythonModel
except ImportError:  # pragma: no cover - mlflow is a dependency
    _PythonModel = object


class AdapterModel(_PythonModel):
    """MLflow pyfunc: base model + LoRA adapter; input a DataFrame with a `prompt` column, output the answers."""

    def load_context(self, context) -> None:
        from peft import PeftModel

        from tasks.models import load_model, load_tokenizer, pick_dtype

        mc = context.model_config
        self.tokenizer = load_tokenizer(mc["base_path"])
        base = load_model(mc["base_path"], dtype=pick_dtype(mc.get("dtype", "auto")))
        self.model = PeftModel.from_pretrained(base, context.artifacts["adapter"]).merge_and_unload()
        self.system_prompt = mc.get("system_prompt")
        self.max_new_tokens = int(mc.get("max_new_tokens", 64))
        self.max_length = int(mc.get("max_length", 256))

    def predict(self, context, model_input, params=None) -> list[str]:
        from flows.config import FewtuneConfig as _Cfg
        from tasks.evaluation import generate_answers

        prompts = list(model_input["prompt"]) if hasattr(model_input, "columns") else list(model_input)
        conversations = []
        for p in prompts:
            msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
            conversations.append(msgs + [{"role": "user", "content": str(p)}])
        cfg = _Cfg(
            data={"train": "-"},
            model={"max_length": self.max_length},
            evaluate={"max_new_tokens": self.max_new_tokens},
        )
        return generate_answers(self.model, self.tokenizer, conversations, cfg, desc="answering")


@dataclass
class RegisterResult:
    tracking_uri: str
    experiment: str
    run_id: str
    model_name: str
    version: str
    model_uri: str
    promoted: bool
    decision: str
    aliases: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def gate(primary: str, baseline: float, tuned: float, min_gain: float) -> tuple[bool, str]:
    gain = tuned - baseline
    if gain > min_gain:
        return True, f"promoted: tuned {primary} {tuned:.4f} beats baseline {baseline:.4f} by {gain:+.4f} (> {min_gain})"
    return False, f"kept as challenger: tuned {primary} {tuned:.4f} vs baseline {baseline:.4f} ({gain:+.4f}, needs > {min_gain})"


def _existing_version(client, name: str, train_key: str | None):
    """The registered version built from the same training inputs, if any (a re-run on unchanged data)."""
    if not train_key:
        return None
    from mlflow.exceptions import MlflowException

    try:
        found = client.search_model_versions(f"name = '{name}' and tags.train_key = '{train_key}'")
    except MlflowException:
        return None
    if not found:
        return None
    return client.get_model_version(name, max(found, key=lambda v: int(v.version)).version)


def _flat(prefix: str, value: Any, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}.{k}" if prefix else k, v, out)
    else:
        out[prefix] = value
    return out


def register_model(
    cfg: FewtuneConfig,
    *,
    run_name: str,
    adapter_path: str,
    base_path: str,
    base_spec: str,
    evaluation: dict[str, Any],
    lineage: dict[str, str],
    system_prompt: str | None,
) -> RegisterResult:
    """Log params, metrics and the adapter; register a version; set `challenger` and maybe `champion`."""
    _quiet_mlflow()
    import mlflow
    from mlflow import MlflowClient

    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    experiment = f"fewtune-{cfg.name}"
    if mlflow.get_experiment_by_name(experiment) is None:
        artifacts = fewtune_home() / "mlartifacts" / experiment
        artifacts.mkdir(parents=True, exist_ok=True)
        mlflow.create_experiment(experiment, artifact_location=artifacts.resolve().as_uri())
    mlflow.set_experiment(experiment)

    client = MlflowClient(uri)
    name = cfg.register_.model_name
    existing = _existing_version(client, name, lineage.get("train_key"))
    if existing is not None:
        log.info("%s version %s already holds this exact model (same data, config and code): not registering again", name, existing.version)
        aliases = [a for a in (CHALLENGER, CHAMPION) if a in (existing.aliases or [])]
        return RegisterResult(
            tracking_uri=uri,
            experiment=experiment,
            run_id=existing.run_id,
            model_name=name,
            version=str(existing.version),
            model_uri=f"models:/{name}/{existing.version}",
            promoted=existing.tags.get("promoted") == "true",
            decision=existing.tags.get("gate", ""),
            aliases=aliases,
        )

    primary = evaluation["primary_metric"]
    promoted, decision = gate(primary, evaluation["baseline"][primary], evaluation["tuned"][primary], cfg.register_.min_gain)
    with mlflow.start_run(run_name=run_name) as run:
        params = _flat("", cfg.dump(), {})
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        metrics = {f"baseline_{k}": v for k, v in evaluation["baseline"].items()}
        metrics.update({f"tuned_{k}": v for k, v in evaluation["tuned"].items()})
        metrics["gain"] = evaluation["gain"]
        mlflow.log_metrics(metrics)
        mlflow.set_tags({f"fewtune.{k}": v for k, v in lineage.items()})
        mlflow.set_tag("fewtune.gate", decision)
        mlflow.log_dict(evaluation, "evaluation.json")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=AdapterModel(),
            artifacts={"adapter": adapter_path},
            model_config={
                "base_path": base_path,
                "base_spec": base_spec,
                "dtype": cfg.model.dtype,
                "max_length": cfg.model.max_length,
                "max_new_tokens": cfg.evaluate.max_new_tokens,
                "system_prompt": system_prompt,
            },
            pip_requirements=["fewtune", "torch", "transformers", "peft", "mlflow"],
            registered_model_name=cfg.register_.model_name,
        )
    version = str(info.registered_model_version)
    tags = {**lineage, "gate": decision, "promoted": str(promoted).lower(), "base_model": base_spec}
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))
    client.set_registered_model_alias(name, CHALLENGER, version)
    aliases = [CHALLENGER]
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
        aliases.append(CHAMPION)
    log.info("registered %s version %s (%s)", name, version, decision)
    return RegisterResult(
        tracking_uri=uri,
        experiment=experiment,
        run_id=run.info.run_id,
        model_name=name,
        version=version,
        model_uri=f"models:/{name}/{version}",
        promoted=promoted,
        decision=decision,
        aliases=aliases,
    )
