"""Registration: gate the evaluation, log the run to MLflow, register a version, move the aliases.

Every run that reaches this stage becomes a new version of the registered model with alias `challenger`; `champion`
moves to it only when every criterion of the gate passes (`gate.py`). The decision and each criterion's status, value,
interval and threshold are recorded as run tags, version tags (`gate.<criterion>` = status) and `gate.json`.

A re-run reuses an existing version only when its `decision_key` (training inputs, evaluation inputs and results the
gate reads, the gate's thresholds, the gate's code) matches and the champion is the same as when it was decided.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tasks.common.cache import hash_text
from tasks.common.home import fewtune_home
from tasks.common.registry import CHALLENGER, CHAMPION, _quiet_mlflow, code_version, tracking_uri
from tasks.config import FewtuneConfig
from tasks.register.champion import ChampionLookupError, compare_with_champion, current_champion, generation_key, set_champion
from tasks.register.gate import GateDecision, gate_decision

log = logging.getLogger("fewtune.register")


@dataclass
class RegisterResult:
    tracking_uri: str
    experiment: str
    experiment_id: str
    run_id: str
    model_name: str
    version: str
    model_uri: str
    promoted: bool
    decision: str
    aliases: list[str]
    gate: dict[str, Any] = field(default_factory=dict)
    champion_before: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


DECISION_CODE = ("gate.py", "champion.py")  # the modules whose source is part of the decision key
NO_CHAMPION = "none"  # the `champion_before` tag of a version decided when there was no champion
REGISTRY_FIELDS = ("enabled", "tracking_uri", "model_name")  # register fields the decision does not depend on
TAG_LIMIT = 4900  # a tracking server before MLflow 2.x's larger limits keeps tag values under 5000 characters
GATE_INPUTS = ("task", "primary_metric", "n_examples", "intervals", "forgetting", "memorization", "bootstrap", "generation")


def decision_key(cfg: FewtuneConfig, evaluation: dict[str, Any], lineage: dict[str, str]) -> str:
    """Everything the gate's decision depends on: the training inputs (`train_key`), the evaluation's inputs
    (`data_eval_hash`, `evaluate_key` when the lineage has one, the evaluate section) and the figures the gate reads,
    the gate's thresholds, and the gate's code (the source of `gate.py` and `champion.py`)."""
    register = {k: v for k, v in cfg.dump()["register"].items() if k not in REGISTRY_FIELDS}
    code = [(Path(__file__).parent / f).read_text(encoding="utf-8") for f in DECISION_CODE]
    return hash_text(
        lineage.get("train_key"),
        lineage.get("data_eval_hash"),
        lineage.get("evaluate_key"),
        cfg.dump()["evaluate"],
        {k: evaluation.get(k) for k in GATE_INPUTS},
        register,
        code,
    )


def _existing_version(client, name: str, lineage: dict[str, str], key: str):
    """The registered version decided on exactly these inputs (a re-run on unchanged data, evaluation, thresholds and
    gate code) while the champion was the one there is now; None when there is none, or when the registry cannot
    tell (the run then registers and decides again, failing closed)."""
    if not lineage.get("train_key"):
        return None
    from mlflow.exceptions import MlflowException

    try:
        found = client.search_model_versions(f"name = '{name}' and tags.decision_key = '{key}'")
        now = current_champion(client, name)
    except (MlflowException, ChampionLookupError):
        return None
    now_version = str(now.version) if now is not None else NO_CHAMPION
    for v in sorted(found, key=lambda v: int(v.version), reverse=True):
        full = client.get_model_version(name, v.version)
        tags = full.tags or {}
        if tags.get("gate.champion") == "error":  # the champion could not be compared then: decide again
            continue
        if now_version in (tags.get("champion_before", NO_CHAMPION), str(full.version)):
            return full
    return None


def _gate_tag(gate: GateDecision) -> str:
    """`gate.json` as a version tag; without the details when too long for an older tracking server's tag limit."""
    full = json.dumps(gate.to_dict())
    if len(full) <= TAG_LIMIT:
        return full
    short = {**gate.to_dict(), "criteria": [{**c.to_dict(), "detail": c.detail[:120]} for c in gate.criteria]}
    return json.dumps(short)[:TAG_LIMIT]


def _recorded_gate(version) -> dict[str, Any]:
    """The gate a registered version was decided with: its `gate_json` tag, else its run's `gate.json` artifact."""
    try:
        return json.loads((version.tags or {}).get("gate_json", ""))
    except json.JSONDecodeError:
        pass
    try:
        import mlflow

        return json.loads(Path(mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path="gate.json")).read_text())
    except Exception:  # noqa: BLE001 - the decision text and the `gate.<criterion>` tags still say it
        return {}


def _flat(prefix: str, value: Any, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}.{k}" if prefix else k, v, out)
    else:
        out[prefix] = value
    return out


def run_metrics(evaluation: dict[str, Any], gate: GateDecision) -> dict[str, float]:
    """The numbers logged as MLflow run metrics (NaN and missing values left out)."""
    out: dict[str, Any] = {f"baseline_{k}": v for k, v in evaluation["baseline"].items()}
    out.update({f"tuned_{k}": v for k, v in evaluation["tuned"].items()})
    out["gain"] = evaluation["gain"]
    for name, iv in evaluation.get("intervals", {}).items():
        out[f"delta_{name}"], out[f"delta_{name}_low"], out[f"delta_{name}_high"] = iv["delta"], iv["low"], iv["high"]
    for signal, sv in ((evaluation.get("forgetting") or {}).get("signals") or {}).items():
        for part in ("value", "low", "high"):
            out[f"forgetting_{signal}" + ("" if part == "value" else f"_{part}")] = (sv or {}).get(part)
    mem = evaluation.get("memorization") or {}
    for model in ("baseline", "tuned"):
        for rows, rates in (mem.get(model) or {}).items():
            for kind, v in rates.items():
                out[f"memorization_{model}_{rows}_{kind}"] = v
    for kind in ("exact", "near_verbatim"):
        if mem.get(f"excess_{kind}"):
            out[f"memorization_excess_{kind}"] = mem[f"excess_{kind}"]["value"]
    gap = (evaluation.get("robustness") or {}).get("original_vs_rephrased")
    if gap:
        out["robustness_original"], out["robustness_rephrased"] = gap["original"], gap["rephrased"]
    for c in gate.criteria:
        out[f"gate_{c.name}_passed"] = float(c.passed)
        for part in ("value", "low", "high"):
            if getattr(c, part) is not None:
                out[f"gate_{c.name}_{part}"] = getattr(c, part)
        if c.rows_needed is not None:
            out[f"gate_{c.name}_rows_needed"] = c.rows_needed
    out["gate_promoted"] = float(gate.promoted)
    for part, s in (evaluation.get("seconds") or {}).items():
        out[f"evaluate_seconds_{part}"] = s
    return {k: float(v) for k, v in out.items() if isinstance(v, (int, float)) and v == v}


def _experiment(cfg: FewtuneConfig) -> tuple[str, str]:
    import mlflow

    experiment = f"fewtune-{cfg.name}"
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        artifacts = fewtune_home() / "mlartifacts" / experiment
        artifacts.mkdir(parents=True, exist_ok=True)
        exp_id = mlflow.create_experiment(
            experiment,
            artifact_location=artifacts.resolve().as_uri(),
            tags={"fewtune.dataset.train": str(cfg.data.train), "fewtune.dataset.eval": str(cfg.data.eval)},
        )
    else:
        exp_id = found.experiment_id
    mlflow.set_experiment(experiment)
    return experiment, str(exp_id)


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
    eval_records: list[dict[str, Any]] | None = None,
    artifacts: dict[str, str] | None = None,
) -> RegisterResult:
    """Gate, then log params, metrics and artifacts; register a version; set `challenger` and maybe `champion`.

    `eval_records`: the test rows (needed to re-evaluate a champion that was evaluated on other rows).
    `artifacts`: name → file or folder logged with the run (report, Data Docs, quarantine, predictions...).
    """
    _quiet_mlflow()
    import mlflow
    from mlflow import MlflowClient

    # The pyfunc class imports mlflow.pyfunc and pandas: loaded here, not when `tasks.register` is imported.
    from tasks.register.pyfunc import AdapterModel, served_model_config

    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    experiment, exp_id = _experiment(cfg)

    client = MlflowClient(uri)
    name = cfg.register_.model_name
    decided = decision_key(cfg, evaluation, lineage)
    existing = _existing_version(client, name, lineage, decided)
    if existing is not None:
        log.info("%s version %s was decided on these exact inputs with the same champion: not registering again", name, existing.version)
        aliases = [a for a in (CHALLENGER, CHAMPION) if a in (existing.aliases or [])]
        gate = _recorded_gate(existing)
        before = existing.tags.get("champion_before", NO_CHAMPION)
        return RegisterResult(
            tracking_uri=uri,
            experiment=experiment,
            experiment_id=exp_id,
            run_id=existing.run_id,
            model_name=name,
            version=str(existing.version),
            model_uri=f"models:/{name}/{existing.version}",
            promoted=existing.tags.get("promoted") == "true",
            decision=existing.tags.get("gate", ""),
            aliases=aliases,
            gate=gate,
            champion_before=None if before == NO_CHAMPION else before,
        )

    key = generation_key(evaluation, lineage.get("data_eval_hash"))
    champion = compare_with_champion(client, cfg, evaluation, eval_records or [], key)
    gate = gate_decision(evaluation, cfg, champion)
    code = code_version()
    with mlflow.start_run(run_name=run_name) as run:
        params = _flat("", cfg.dump(), {})
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        mlflow.log_metrics(run_metrics(evaluation, gate))
        mlflow.set_tags({f"fewtune.{k}": v for k, v in lineage.items()})
        mlflow.set_tags({"fewtune.gate": gate.decision, "fewtune.promoted": str(gate.promoted).lower(), "fewtune.code_version": code})
        mlflow.set_tags({f"fewtune.gate.{c.name}": c.status for c in gate.criteria})
        mlflow.log_dict(evaluation, "evaluation.json")
        mlflow.log_dict(gate.to_dict(), "gate.json")
        for artifact, path in (artifacts or {}).items():
            p = Path(path)
            if p.is_dir():
                mlflow.log_artifacts(str(p), artifact_path=artifact)
            elif p.is_file():
                mlflow.log_artifact(str(p), artifact_path=None if artifact == p.name else artifact)
        if evaluation.get("predictions_path") and not (artifacts or {}).get("predictions.jsonl"):
            mlflow.log_artifact(evaluation["predictions_path"])
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=AdapterModel(),
            artifacts={"adapter": adapter_path},
            model_config=served_model_config(cfg, evaluation, base_path, base_spec, system_prompt),
            pip_requirements=["fewtune", "torch", "transformers", "peft", "mlflow"],
            registered_model_name=name,
        )
    version = str(info.registered_model_version)
    criteria = {c.name: c.status for c in gate.criteria}
    before = (champion or {}).get("version")
    tags = {
        **lineage,
        "gate": gate.decision[:4500],
        "gate_json": _gate_tag(gate),
        "promoted": str(gate.promoted).lower(),
        "base_model": base_spec,
        "code_version": code,
        "generation_key": key,
        "decision_key": decided,
        "champion_before": before or NO_CHAMPION,
        "primary_metric": evaluation["primary_metric"],
        "primary_value": str(evaluation["tuned"][evaluation["primary_metric"]]),
        **{f"gate.{k}": v for k, v in criteria.items()},
    }
    for tag, value in tags.items():
        client.set_model_version_tag(name, version, tag, str(value))
    client.set_registered_model_alias(name, CHALLENGER, version)
    aliases = [CHALLENGER]
    if gate.promoted:
        set_champion(client, name, version, "gate")
        aliases.append(CHAMPION)
    log.info("registered %s version %s (%s)", name, version, gate.decision)
    return RegisterResult(
        tracking_uri=uri,
        experiment=experiment,
        experiment_id=exp_id,
        run_id=run.info.run_id,
        model_name=name,
        version=version,
        model_uri=f"models:/{name}/{version}",
        promoted=gate.promoted,
        decision=gate.decision,
        aliases=aliases,
        gate=gate.to_dict(),
        champion_before=before,
    )


def log_artifacts(cfg: FewtuneConfig, run_id: str, paths: list[str | Path]) -> None:
    """Add files to a logged run (the report is written after registration, since it shows the version)."""
    _quiet_mlflow()
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri(cfg))
    for path in paths:
        if Path(path).is_file():
            client.log_artifact(run_id, str(path))
