"""Registration: gate the evaluation, log the run to MLflow, register a version, move the aliases.

Every run that reaches this stage becomes a new version of the registered model with alias `challenger`; `champion`
moves to it only when every criterion of the gate passes (`gate.py`). The decision and each criterion's status, value,
interval and threshold are recorded as run tags, version tags (`gate.<criterion>` = status) and `gate.json`.

A re-run reuses an existing version only when its `decision_key` (training inputs, evaluation inputs and results the
gate reads, the gate's thresholds, the gate's code) matches and the champion is the same as when it was decided.

The model is logged without registering it; the version is then created with every tag of its decision in one
registry call, and the aliases are moved last (`versions.py`): a run killed at any point leaves either no version or
a whole one, which the next run on the same inputs reuses and finishes. Runs registering the same model at the same
time are serialized (SQLite) or keep only the lowest-numbered copy of a decision (a tracking server).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import tasks.register.versions as versions
from tasks.common.cache import hash_text
from tasks.common.home import fewtune_home
from tasks.common.registry import _quiet_mlflow, code_version, tracking_uri
from tasks.config import FewtuneConfig
from tasks.register.champion import compare_with_champion, generation_key
from tasks.register.gate import GateDecision, gate_decision
from tasks.register.versions import NO_CHAMPION

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
REGISTRY_FIELDS = ("enabled", "tracking_uri", "model_name", "bundle_base")  # register fields the decision does not depend on
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


def local_store(uri: str) -> bool:
    """Whether the tracking URI is a store on this machine (SQLite or another database, `file:`, a folder) rather
    than a tracking server (`http(s)://`, Databricks), whose own artifact store decides where artifacts go."""
    scheme = urlparse(uri).scheme.lower()
    return scheme not in ("http", "https") and not scheme.startswith("databricks")


def _experiment(cfg: FewtuneConfig, uri: str) -> tuple[str, str]:
    """The run's experiment, created on first use. For a local store its artifacts go under FEWTUNE_HOME (not the
    working directory); a tracking server keeps them in its artifact store (`mlflow server --artifacts-destination`,
    served to clients as `mlflow-artifacts:/`), so they are reachable wherever the server is."""
    import mlflow
    from mlflow.exceptions import MlflowException

    experiment = f"fewtune-{cfg.name}"
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        location = None
        if local_store(uri):
            artifacts = fewtune_home() / "mlartifacts" / experiment
            artifacts.mkdir(parents=True, exist_ok=True)
            location = artifacts.resolve().as_uri()
        try:
            found = mlflow.get_experiment(mlflow.create_experiment(
                experiment,
                artifact_location=location,
                tags={"fewtune.dataset.train": str(cfg.data.train), "fewtune.dataset.eval": str(cfg.data.eval)},
            ))
        except MlflowException:  # another run created it at the same moment
            found = mlflow.get_experiment_by_name(experiment)
            if found is None:
                raise
    mlflow.set_experiment(experiment)
    return experiment, str(found.experiment_id)


def _result(client, uri: str, experiment: str, exp_id: str, version) -> RegisterResult:
    """An existing version as this run's result, after finishing what the run that created it left undone."""
    aliases = versions.finish(client, version.name, str(version.version))
    before = version.tags.get("champion_before", NO_CHAMPION)
    return RegisterResult(
        tracking_uri=uri,
        experiment=experiment,
        experiment_id=exp_id,
        run_id=version.run_id,
        model_name=version.name,
        version=str(version.version),
        model_uri=f"models:/{version.name}/{version.version}",
        promoted=version.tags.get("promoted") == "true",
        decision=version.tags.get("gate", ""),
        aliases=aliases,
        gate=_recorded_gate(version),
        champion_before=None if before == NO_CHAMPION else before,
    )


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
    name = cfg.register_.model_name
    with versions.registration_lock(uri, name):
        experiment, exp_id = _experiment(cfg, uri)
        client = MlflowClient(uri)
        known = versions.all_versions(client, name)
        floor = max((int(v.version) for v in known), default=0)  # copies of this decision are numbered above it
        versions.mark_unfinished(client, name, known)
        decided = decision_key(cfg, evaluation, lineage)
        existing = versions.reusable(client, name, decided) if lineage.get("train_key") else None
        if existing is not None:
            log.info("%s version %s was decided on these exact inputs with the same champion: not registering again",
                     name, existing.version)
            return _result(client, uri, experiment, exp_id, existing)

        key = generation_key(evaluation, lineage.get("data_eval_hash"))
        champion = compare_with_champion(client, cfg, evaluation, eval_records or [], key)
        gate = gate_decision(evaluation, cfg, champion)
        code = code_version()
        with mlflow.start_run(run_name=run_name) as run:
            params = _flat("", cfg.dump(), {})
            mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
            mlflow.log_metrics(run_metrics(evaluation, gate))
            mlflow.set_tags({f"fewtune.{k}": v for k, v in lineage.items()})
            mlflow.set_tags({"fewtune.gate": gate.decision, "fewtune.promoted": str(gate.promoted).lower(),
                             "fewtune.code_version": code, "fewtune.decision_key": decided})
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
            info = mlflow.pyfunc.log_model(  # logged, not registered: the version is created below with its tags
                name="model",
                python_model=AdapterModel(),
                # the base weights travel with the version only when asked (register.bundle_base)
                artifacts={"adapter": adapter_path, **({"base": base_path} if cfg.register_.bundle_base else {})},
                model_config=served_model_config(cfg, evaluation, base_path, base_spec, system_prompt),
                pip_requirements=["fewtune", "torch", "transformers", "peft", "mlflow"],
            )
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
            **{f"gate.{c.name}": c.status for c in gate.criteria},
        }
        created = versions.create(client, name, info.model_uri, {k: str(v) for k, v in tags.items()})
        winner = versions.settle(client, name, created, floor)
        if str(winner.version) != str(created.version):  # another run registered the same decision at the same time
            client.set_tag(run.info.run_id, "fewtune.duplicate_of", f"{name}/{winner.version}")
            client.delete_run(run.info.run_id)
            return _result(client, uri, experiment, exp_id, winner)
        version = str(created.version)
        aliases = versions.finish(client, name, version)
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
