"""Log the run to MLflow and register the tuned model behind a promotion gate.

Every run that reaches this stage becomes a new version of the registered model with alias `challenger`. The alias
`champion` moves to it only when every criterion of the gate passes:

- task gain: the lower end of the bootstrap interval of (tuned − baseline) primary metric exceeds
  `register.min_gain` — the gain is real, not noise of a small test set;
- forgetting: probe perplexity rose by at most `register.max_forgetting` (relative) — general ability kept;
- memorization: the memorization excess (extraction on training rows beyond held-out rows) is at most
  `register.max_memorization`;
- champion: the tuned model beats the current champion on the same test rows by more than
  `register.champion_margin` (recorded row scores when the champion was evaluated on the same rows with the same
  settings, else the champion's registered model answers the test prompts again).

The decision and each criterion's value are recorded (run tags, version tags, `gate.json`) and shown. The
registered model's tag `champion_history` lists every champion in order, so `fewtune models rollback` can move the
alias back.

The logged model is an MLflow pyfunc holding the adapter plus a reference to the base model (logging a PEFT model
with a local base through `mlflow.transformers` silently re-initialises weights), so
`mlflow.pyfunc.load_model("models:/NAME@champion")` answers prompts with the tuned model.

Default store: SQLite at `$FEWTUNE_HOME/mlflow.db`, artifacts under `$FEWTUNE_HOME/mlartifacts/`; set
`register.tracking_uri` for a team server.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tasks.config import ConfigError, FewtuneConfig
from tasks.common.home import fewtune_home
from tasks.common.registry import (
    CHALLENGER,
    CHAMPION,
    HISTORY_TAG,
    RegistryError,
    _quiet_mlflow,
    code_version,
    tracking_uri,
)

log = logging.getLogger("fewtune.register")











# ----------------------------------------------------------------------------------------------------------------
# The registered model


import pandas as pd

try:
    import mlflow.pyfunc as _pyfunc

    _PythonModel = _pyfunc.PythonModel
except ImportError:  # pragma: no cover - mlflow is a dependency
    _PythonModel = object


class AdapterModel(_PythonModel):
    """MLflow pyfunc: base model + adapter. Input: a DataFrame with a `prompt` column (one user message each) or a
    `messages` column (whole conversations, lists of {role, content}); output: the greedy answers."""

    def load_context(self, context) -> None:
        from tasks.common.generation import load_tuned
        from tasks.common.models import load_model, load_tokenizer, pick_dtype

        mc = context.model_config
        self.tokenizer = load_tokenizer(mc["base_path"])
        base = load_model(mc["base_path"], dtype=pick_dtype(mc.get("dtype", "auto")))
        self.model = load_tuned(base, context.artifacts["adapter"])
        self.system_prompt = mc.get("system_prompt")
        self.max_new_tokens = int(mc.get("max_new_tokens", 64))
        self.max_length = int(mc.get("max_length", 256))

    def conversations(self, model_input) -> list[list[dict[str, str]]]:
        if hasattr(model_input, "columns") and "messages" in model_input.columns:
            return [json.loads(m) if isinstance(m, str) else list(m) for m in model_input["messages"]]
        prompts = list(model_input["prompt"]) if hasattr(model_input, "columns") else list(model_input)
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [system + [{"role": "user", "content": str(p)}] for p in prompts]

    def predict(self, context, model_input: pd.DataFrame, params=None) -> list[str]:
        # (typed as a DataFrame so that MLflow does not try to validate it; a list of prompts works too)
        from tasks.config import FewtuneConfig as _Cfg
        from tasks.common.generation import generate_answers

        cfg = _Cfg(
            data={"train": "-"},
            model={"max_length": self.max_length},
            evaluate={"max_new_tokens": self.max_new_tokens},
        )
        return generate_answers(self.model, self.tokenizer, self.conversations(model_input), cfg, desc="answering")


# ----------------------------------------------------------------------------------------------------------------
# The gate


@dataclass
class Criterion:
    name: str  # task_gain | forgetting | memorization | champion
    passed: bool
    value: float | None  # what was compared with the threshold (None: not measured)
    threshold: float | None
    detail: str


@dataclass
class GateDecision:
    promoted: bool
    decision: str
    criteria: list[Criterion] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pct(x: float) -> str:
    return f"{x * 100:+.1f}%"


def gate_decision(evaluation: dict[str, Any], cfg: FewtuneConfig, champion: dict[str, Any] | None) -> GateDecision:
    """Every criterion of the promotion gate, its value and whether it passed; promoted only if all passed."""
    r = cfg.register_
    conf = f"{evaluation.get('bootstrap', {}).get('confidence', 0.95) * 100:.0f}%"
    primary = evaluation["primary_metric"]
    criteria = []

    iv = evaluation["intervals"][primary]
    criteria.append(
        Criterion(
            "task_gain",
            iv["low"] > r.min_gain,
            iv["low"],
            r.min_gain,
            f"{primary} {iv['baseline']:.4f} -> {iv['tuned']:.4f}, delta {iv['delta']:+.4f} ({conf} CI "
            f"{iv['low']:+.4f} to {iv['high']:+.4f}); the lower end must exceed {r.min_gain:+.4f}",
        )
    )

    fg = evaluation.get("forgetting")
    if fg:
        rel = fg["relative_increase"]
        extra = ""
        if fg.get("metric"):
            m = fg["metric"]
            extra = f"; {m['metric']} {m['baseline']:.4f} -> {m['tuned']:.4f} ({m['delta']:+.4f})"  # probe_<metric>
        criteria.append(
            Criterion(
                "forgetting",
                rel["value"] <= r.max_forgetting,
                rel["value"],
                r.max_forgetting,
                f"probe perplexity {fg['baseline_ppl']:.3f} -> {fg['tuned_ppl']:.3f}, {_pct(rel['value'])} ({conf} CI "
                f"{_pct(rel['low'])} to {_pct(rel['high'])}); at most {_pct(r.max_forgetting)} allowed{extra}",
            )
        )
    else:
        criteria.append(Criterion("forgetting", True, None, r.max_forgetting, "not measured: no probe set (data.probe)"))

    mem = evaluation.get("memorization") or {}
    excess = mem.get(f"excess_{r.memorization_measure}")
    if excess:
        t, b = mem["tuned"], mem["baseline"]
        kind = r.memorization_measure.replace("_", "-")
        criteria.append(
            Criterion(
                "memorization",
                excess["value"] <= r.max_memorization,
                excess["value"],
                r.max_memorization,
                f"{kind} extraction on training rows {b['train'][r.memorization_measure]:.2f} -> "
                f"{t['train'][r.memorization_measure]:.2f}, on held-out rows {b['control'][r.memorization_measure]:.2f} "
                f"-> {t['control'][r.memorization_measure]:.2f}; excess {excess['value']:+.3f} ({conf} CI "
                f"{excess['low']:+.3f} to {excess['high']:+.3f}); at most {r.max_memorization:+.3f} allowed",
            )
        )
    else:
        why = "; ".join(mem.get("skipped_reasons") or []) or "no training rows given"
        criteria.append(Criterion("memorization", True, None, r.max_memorization, f"not measured: {why}"))

    if champion is None:
        criteria.append(Criterion("champion", True, None, r.champion_margin, "no champion yet"))
    else:
        criteria.append(
            Criterion(
                "champion",
                champion["delta"] > r.champion_margin,
                champion["delta"],
                r.champion_margin,
                f"{primary} {champion['challenger']:.4f} vs champion version {champion['version']} "
                f"{champion['champion']:.4f} on the same {champion['n']} rows ({champion['how']}), delta "
                f"{champion['delta']:+.4f} ({conf} CI {champion['low']:+.4f} to {champion['high']:+.4f}); must exceed "
                f"{r.champion_margin:+.4f}",
            )
        )

    promoted = all(c.passed for c in criteria)
    failed = [c.name for c in criteria if not c.passed]
    head = f"tuned {primary} {iv['tuned']:.4f} vs baseline {iv['baseline']:.4f} ({iv['delta']:+.4f}, {conf} CI {iv['low']:+.4f} to {iv['high']:+.4f})"
    decision = (
        f"promoted: all {len(criteria)} criteria passed; {head}"
        if promoted
        else f"kept as challenger: failed {', '.join(failed)}; {head}"
    )
    return GateDecision(promoted, decision, criteria)


# ----------------------------------------------------------------------------------------------------------------
# The champion on the same test rows


def generation_key(evaluation: dict[str, Any], eval_hash: str | None) -> str:
    """What must match for two evaluations' row scores to be comparable: rows, task, metric and decoding settings."""
    from tasks.common.cache import hash_text

    return hash_text(eval_hash, evaluation.get("task"), evaluation["primary_metric"], evaluation.get("generation"), evaluation["n_examples"])


def _row_items(rows: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    return {str(r["id"]): r["scores"]["tuned"][metric] for r in rows if metric in r.get("scores", {}).get("tuned", {})}


def compare_with_champion(
    client,
    cfg: FewtuneConfig,
    evaluation: dict[str, Any],
    eval_records: list[dict[str, Any]],
    key: str,
) -> dict[str, Any] | None:
    """The challenger minus the current champion on the same test rows, with a paired bootstrap interval.

    None when there is no champion. Uses the champion's recorded row scores when they were made on the same rows with
    the same settings (`key`), else loads the champion's registered model and answers the test prompts again.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from tasks.common.records import prompt_and_response, read_jsonl
    from tasks.common.measure import Scored, metric_aggregator, paired_delta, score_answers

    name = cfg.register_.model_name
    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    primary = evaluation["primary_metric"]
    mine = _row_items(read_jsonl(evaluation["predictions_path"]), primary)
    labels = sorted({str(r["label"]) for r in eval_records}) if evaluation.get("task") == "classification" else None
    theirs: dict[str, Any] = {}
    how = ""
    if version.tags.get("generation_key") == key:
        try:
            local = mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path="predictions.jsonl")
            theirs = _row_items(read_jsonl(local), primary)
            how = "recorded row scores"
        except (MlflowException, OSError):
            theirs = {}
    if not theirs:
        records = [r for r in eval_records if str(r["id"]) in mine]
        model = mlflow.pyfunc.load_model(f"models:/{name}/{version.version}").unwrap_python_model()
        from tasks.common.generation import generate_answers

        log.info("champion version %s was evaluated on other rows or settings: answering the test prompts again", version.version)
        answers = generate_answers(
            model.model, model.tokenizer, [prompt_and_response(r)[0] for r in records], cfg, "evaluate: champion answers"
        )
        gold = [str(r["label"]) if labels else prompt_and_response(r)[1] for r in records]
        scored = score_answers(evaluation.get("task", "generation"), answers, gold, labels)[primary]
        theirs = {str(r["id"]): item for r, item in zip(records, scored.items)}
        how = "champion re-evaluated on these rows"
        del model
    ids = [i for i in mine if i in theirs]
    if not ids:
        return None
    aggregate = metric_aggregator(evaluation.get("task", "generation"), primary, labels)
    champ = Scored(aggregate([theirs[i] for i in ids]), [theirs[i] for i in ids], aggregate)
    chall = Scored(aggregate([mine[i] for i in ids]), [mine[i] for i in ids], aggregate)
    d = paired_delta(champ, chall, cfg)
    return {
        "version": str(version.version),
        "how": how,
        "n": len(ids),
        "champion": round(champ.value, 4),
        "challenger": round(chall.value, 4),
        "delta": round(d.value, 4),
        "low": round(d.low, 4),
        "high": round(d.high, 4),
    }


# ----------------------------------------------------------------------------------------------------------------
# Champion history (a registered-model tag)


def champion_history(client, name: str) -> list[dict[str, str]]:
    model = client.get_registered_model(name)
    raw = (model.tags or {}).get(HISTORY_TAG)
    try:
        return list(json.loads(raw)) if raw else []
    except json.JSONDecodeError:
        return []


def set_champion(client, name: str, version: str, how: str) -> None:
    """Move the `champion` alias to `version` and append it to the champion history."""
    history = champion_history(client, name)
    client.set_registered_model_alias(name, CHAMPION, str(version))
    if not history or history[-1]["version"] != str(version):
        history.append({"version": str(version), "at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "how": how})
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))


# ----------------------------------------------------------------------------------------------------------------
# Registration


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


def run_metrics(evaluation: dict[str, Any], gate: GateDecision) -> dict[str, float]:
    """The numbers logged as MLflow run metrics (NaN and missing values left out)."""
    out: dict[str, Any] = {f"baseline_{k}": v for k, v in evaluation["baseline"].items()}
    out.update({f"tuned_{k}": v for k, v in evaluation["tuned"].items()})
    out["gain"] = evaluation["gain"]
    for name, iv in evaluation.get("intervals", {}).items():
        out[f"delta_{name}"], out[f"delta_{name}_low"], out[f"delta_{name}_high"] = iv["delta"], iv["low"], iv["high"]
    fg = evaluation.get("forgetting") or {}
    if fg:
        out["forgetting_probe_ppl_rel"] = fg["relative_increase"]["value"]
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
        if c.value is not None:
            out[f"gate_{c.name}_value"] = c.value
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

    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    experiment, exp_id = _experiment(cfg)

    client = MlflowClient(uri)
    name = cfg.register_.model_name
    existing = _existing_version(client, name, lineage.get("train_key"))
    if existing is not None:
        log.info("%s version %s already holds this exact model (same data, config and code): not registering again", name, existing.version)
        aliases = [a for a in (CHALLENGER, CHAMPION) if a in (existing.aliases or [])]
        try:
            gate = json.loads(existing.tags.get("gate_json", "{}"))
        except json.JSONDecodeError:
            gate = {}
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
            model_config={
                "base_path": base_path,
                "base_spec": base_spec,
                "dtype": cfg.model.dtype,
                "max_length": cfg.model.max_length,
                "max_new_tokens": cfg.evaluate.max_new_tokens,
                "system_prompt": system_prompt,
            },
            pip_requirements=["fewtune", "torch", "transformers", "peft", "mlflow"],
            registered_model_name=name,
        )
    version = str(info.registered_model_version)
    criteria = {c.name: ("pass" if c.passed else "fail") for c in gate.criteria}
    tags = {
        **lineage,
        "gate": gate.decision[:4500],
        "gate_json": json.dumps(gate.to_dict())[:4900],
        "promoted": str(gate.promoted).lower(),
        "base_model": base_spec,
        "code_version": code,
        "generation_key": key,
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
        champion_before=champion["version"] if champion else None,
    )


def log_artifacts(cfg: FewtuneConfig, run_id: str, paths: list[str | Path]) -> None:
    """Add files to a logged run (the report is written after registration, since it shows the version)."""
    _quiet_mlflow()
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri(cfg))
    for path in paths:
        if Path(path).is_file():
            client.log_artifact(run_id, str(path))


# ----------------------------------------------------------------------------------------------------------------
# `fewtune models list | promote VERSION | rollback`


def _client(cfg: FewtuneConfig):
    _quiet_mlflow()
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri(cfg))
    try:
        client.get_registered_model(cfg.register_.model_name)
    except MlflowException:
        raise RegistryError(
            f"no registered model {cfg.register_.model_name!r} at {tracking_uri(cfg)}; run `fewtune run` first, or pass "
            "--name / --config for another model"
        ) from None
    return client


def list_versions(cfg: FewtuneConfig) -> list[dict[str, Any]]:
    """Every version of the registered model, newest first, with aliases, gate decision and key metric."""
    client = _client(cfg)
    name = cfg.register_.model_name
    rows = []
    for v in client.search_model_versions(f"name = '{name}'"):
        full = client.get_model_version(name, v.version)
        tags = full.tags or {}
        rows.append(
            {
                "version": str(full.version),
                "aliases": sorted(full.aliases or []),
                "created": datetime.fromtimestamp(full.creation_timestamp / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M"),
                "run_name": tags.get("run_name", ""),
                "primary_metric": tags.get("primary_metric", ""),
                "primary_value": tags.get("primary_value", ""),
                "promoted": tags.get("promoted", ""),
                "gate": tags.get("gate", ""),
                "data_train_hash": tags.get("data_train_hash", "")[:12],
                "code_version": tags.get("code_version", ""),
            }
        )
    return sorted(rows, key=lambda r: int(r["version"]), reverse=True)


def promote(cfg: FewtuneConfig, version: str) -> dict[str, Any]:
    """Make `version` the champion by hand (whatever its gate said); returns the version and the previous champion."""
    from mlflow.exceptions import MlflowException

    client = _client(cfg)
    name = cfg.register_.model_name
    try:
        target = client.get_model_version(name, str(version))
    except MlflowException:
        known = ", ".join(r["version"] for r in list_versions(cfg)) or "none"
        raise RegistryError(f"{name} has no version {version}; versions: {known}") from None
    try:
        before = str(client.get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        before = None
    set_champion(client, name, str(target.version), "promote")
    client.set_model_version_tag(name, str(target.version), "promoted_by_hand", "true")
    return {"version": str(target.version), "previous": before, "gate": (target.tags or {}).get("gate", "")}


def rollback(cfg: FewtuneConfig) -> dict[str, Any]:
    """Move `champion` back to the champion before the current one (from the champion history)."""
    from mlflow.exceptions import MlflowException

    client = _client(cfg)
    name = cfg.register_.model_name
    try:
        current = str(client.get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        raise RegistryError(f"{name} has no champion to roll back") from None
    history = champion_history(client, name)
    while history and history[-1]["version"] == current:
        history.pop()
    if not history:
        raise RegistryError(
            f"{name} version {current} is the first champion: there is no earlier one to roll back to "
            "(use `fewtune models promote VERSION` to pick one)"
        )
    previous = history[-1]["version"]
    client.set_registered_model_alias(name, CHAMPION, previous)
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    return {"from": current, "to": previous}
