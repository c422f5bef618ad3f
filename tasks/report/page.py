"""The page: `report.html` built from the run folder's files only, so `fewtune report RUN_DIR` rebuilds it."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tasks.common.health_run import assess_run_folder
from tasks.common.records import read_jsonl
from tasks.config import ConfigError
from tasks.report.plots import (
    plot_confusion,
    plot_deltas,
    plot_forgetting,
    plot_memorization,
    plot_perplexity,
    plot_ppl_histogram,
    plot_reliability,
    plot_training,
)
from tasks.report.summary import _fmt, criterion_cells

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
REPORT_FILE = "report.html"
EXAMPLES_IN_REPORT = 12  # side-by-side rows shown; every row is in predictions.jsonl



class ReportError(ConfigError):
    """The run folder lacks what the report is built from; the message names the file."""


def _read_json(path: Path, required: bool = True) -> Any:
    if not path.is_file():
        if required:
            raise ReportError(f"{path} not found: is {path.parent} a fewtune run folder (made by `fewtune run`)?")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path}: not valid JSON ({exc}); re-run `fewtune run` to rewrite it") from None


def _rel_link(run_dir: Path, *candidates: str) -> str | None:
    for c in candidates:
        if (run_dir / c).exists():
            return c
    return None


def mlflow_links(registry: dict[str, Any] | None) -> list[dict[str, str]]:
    """Where the run and the model version live in MLflow: web links for a tracking server, else URIs to open."""
    if not registry:
        return []
    uri = registry["tracking_uri"]
    links = []
    if uri.startswith(("http://", "https://")):
        base = uri.rstrip("/")
        links.append({"label": "MLflow run", "href": f"{base}/#/experiments/{registry.get('experiment_id', '')}/runs/{registry['run_id']}"})
        links.append({"label": f"model {registry['model_name']} version {registry['version']}", "href": f"{base}/#/models/{registry['model_name']}/versions/{registry['version']}"})
    else:
        links.append({"label": f"MLflow run {registry['run_id']} (experiment {registry['experiment']})", "text": f"mlflow ui --backend-store-uri {uri}"})
        links.append({"label": f"model {registry['model_uri']}", "text": f"mlflow.pyfunc.load_model('{registry['model_uri']}')"})
    return links



def _health(run_dir: Path) -> dict[str, Any] | None:
    """Training health of a run folder whose summary predates the health checks (thresholds from its config)."""
    try:
        return assess_run_folder(run_dir).to_dict()
    except (ConfigError, ValueError):  # no train log, or a config this version cannot read
        return None



def report_context(run_dir: Path) -> dict[str, Any]:
    """Everything the page shows, read from the run folder."""
    run_dir = Path(run_dir)
    summary = _read_json(run_dir / "summary.json")
    evaluation = _read_json(run_dir / "eval_results.json")
    config = {}
    if (run_dir / "config.yaml").is_file():
        import yaml

        config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    train_log = _read_json(run_dir / "train_log.json", required=False) or []
    predictions = read_jsonl(run_dir / "predictions.jsonl") if (run_dir / "predictions.jsonl").is_file() else []
    registry = summary.get("register")
    gate = (registry or {}).get("gate") or summary.get("gate") or {}
    reg_cfg = config.get("register", {})
    primary = evaluation["primary_metric"]
    measure = reg_cfg.get("memorization_measure", "near_verbatim")

    links = []
    for label, candidates in (
        ("Data Docs (Great Expectations)", ("data/data_docs/index.html", "data_docs/index.html", "data/data_docs/local_site/index.html")),
        ("validation counts per check", ("data/validation.json",)),
        ("quarantined rows", ("data/quarantine.jsonl",)),
        ("augmented training rows (source, parent_id)", ("data/augmented.jsonl",)),
        ("rejected augmentation candidates with reasons", ("data/augment_rejected.jsonl",)),
        ("augmentation report", ("augment_report.md",)),
        ("every test answer, both models, row scores", ("predictions.jsonl",)),
        ("probe answers", ("probe_predictions.jsonl",)),
        ("evaluation results", ("eval_results.json",)),
        ("run summary", ("summary.json",)),
        ("configuration used", ("config.yaml",)),
        ("training log", ("train_log.json",)),
    ):
        found = _rel_link(run_dir, *candidates)
        if found:
            links.append({"label": label, "href": found})

    criteria = [criterion_cells(c) for c in gate.get("criteria", [])]
    rob = evaluation.get("robustness") or {}
    mem = evaluation.get("memorization") or {}
    return {
        "title": f"fewtune run {summary['run_name']}",
        "summary": summary,
        "evaluation": evaluation,
        "primary": primary,
        "registry": registry,
        "gate": gate,
        "criteria": criteria,
        "decision": (registry or {}).get("decision") or gate.get("decision") or "no promotion decision: registration is disabled (register.enabled=false)",
        "promoted": bool((registry or {}).get("promoted", gate.get("promoted", False))),
        "intervals": list(evaluation.get("intervals", {}).values()),
        "train": summary.get("train") or {},
        "augmentation": _read_json(run_dir / "augment_report.json", required=False),
        "health": summary.get("health") or _health(run_dir),
        "cv": summary.get("cv"),
        "forgetting": evaluation.get("forgetting"),
        "memorization": mem if mem.get("tuned") else None,
        "memorization_note": mem.get("reason") or "; ".join(mem.get("skipped_reasons") or []),
        "memorization_status": {"not_applicable": "Not applicable", "off": "Off"}.get(mem.get("status", ""), "Not measured"),
        "measure": measure,
        "robustness_groups": rob.get("groups", {}),
        "original_vs_rephrased": rob.get("original_vs_rephrased"),
        "overmemorization": evaluation.get("overmemorization") or {},
        "examples": predictions[:EXAMPLES_IN_REPORT] or evaluation.get("examples", []),
        "n_predictions": len(predictions),
        "links": links,
        "mlflow": mlflow_links(registry),
        "generation": evaluation.get("generation", {}),
        "bootstrap": evaluation.get("bootstrap", {}),
        "seconds": evaluation.get("seconds", {}),
        "confidence": f"{evaluation.get('bootstrap', {}).get('confidence', 0.95) * 100:.0f}%",
        "plots": {
            "training": plot_training(train_log),
            "deltas": plot_deltas(evaluation.get("intervals", {}), primary, reg_cfg.get("min_gain")),
            "perplexity": plot_perplexity(evaluation),
            "histogram": plot_ppl_histogram(predictions),
            "forgetting": plot_forgetting(evaluation.get("forgetting"), reg_cfg),
            "memorization": plot_memorization(mem, measure),
            "confusion": plot_confusion((evaluation.get("calibration") or {}).get("tuned")),
            "reliability": plot_reliability(evaluation.get("calibration")),
        },
        "baselines": evaluation.get("baselines"),
        "worth_it": evaluation.get("worth_it"),
        "calibration": evaluation.get("calibration"),
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "fmt": _fmt,
    }


def render_report(run_dir: Path) -> str:
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    env = Environment(loader=FileSystemLoader(TEMPLATE_DIR), autoescape=select_autoescape(["html"]))
    return env.get_template("report.html").render(**report_context(run_dir))


def write_report(run_dir: str | Path) -> Path:
    """Build `RUN_DIR/report.html` from the run folder's files; returns its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is not a folder; pass a run folder such as runs/demo-20261123-101500")
    page = render_report(run_dir)
    path = run_dir / REPORT_FILE
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path
