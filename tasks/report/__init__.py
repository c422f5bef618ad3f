"""The run report: one self-contained `report.html` per run, and the same summary as Markdown and a table.

The page needs nothing but a browser: CSS is inline and every plot is an inline PNG (matplotlib), so it works offline
and can be mailed or attached to a ticket. It is built from the files of the run folder only (`summary.json`,
`eval_results.json`, `predictions.jsonl`, `train_log.json`), so `fewtune report RUN_DIR` rebuilds it at any time.

Contents: the gate decision and each criterion, task metrics with their intervals, training curves, perplexity
(over-memorization signal) with a per-row histogram, forgetting, memorization, robustness to rephrased prompts,
side-by-side example answers, and links to the Data Docs, the quarantined rows and the MLflow run and model version.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tasks.config import ConfigError
from tasks.common.records import read_jsonl

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
REPORT_FILE = "report.html"
EXAMPLES_IN_REPORT = 12  # side-by-side rows shown; every row is in predictions.jsonl

CRITERIA_LABELS = {
    "task_gain": "Task gain (interval lower end)",
    "forgetting": "Forgetting (probe perplexity rise)",
    "memorization": "Memorization excess",
    "champion": "Beats the current champion",
}


class ReportError(ConfigError):
    """The run folder lacks what the report is built from; the message names the file."""


# ----------------------------------------------------------------------------------------------------------------
# Plots


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.spines.top": False, "axes.spines.right": False})
    return plt


def plot_training(train_log: list[dict[str, Any]]) -> str | None:
    """Training loss and validation loss per step, and validation perplexity on a second axis."""
    train = [(e["step"], e["loss"]) for e in train_log if "loss" in e and "step" in e]
    val = [(e["step"], e["eval_loss"]) for e in train_log if "eval_loss" in e and "step" in e]
    if not train and not val:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.0))
    if train:
        ax.plot(*zip(*train), label="training loss", color="#4c72b0")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", color="#dd8452")
        right = ax.twinx()
        right.plot([s for s, _ in val], [math.exp(v) for _, v in val], ":", color="#8c8c8c", label="validation perplexity")
        right.set_ylabel("validation perplexity")
        right.spines["top"].set_visible(False)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per token)")
    ax.legend(loc="upper right", frameon=False)
    return _png(fig)


def plot_deltas(intervals: dict[str, dict[str, Any]], primary: str, min_gain: float | None) -> str | None:
    """Tuned − baseline for every task metric with its interval (a forest plot)."""
    rows = [(k, v) for k, v in intervals.items() if v.get("higher_is_better", True)]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 0.45 * len(rows) + 0.9))
    for y, (name, iv) in enumerate(rows):
        colour = "#2a9d58" if iv["low"] > 0 else ("#c0392b" if iv["high"] < 0 else "#7f7f7f")
        ax.errorbar(iv["delta"], y, xerr=[[iv["delta"] - iv["low"]], [iv["high"] - iv["delta"]]], fmt="o", color=colour, capsize=4)
    ax.axvline(0, color="#333", lw=0.8)
    if min_gain is not None:
        ax.axvline(min_gain, color="#c0392b", lw=0.8, ls="--", label=f"gate: {primary} lower end > {min_gain:g}")
        ax.legend(loc="lower right", frameon=False)
    ax.set_yticks(range(len(rows)), [f"{k} (gate)" if k == primary else k for k, _ in rows])
    ax.set_xlabel("tuned − baseline (with bootstrap interval)")
    ax.invert_yaxis()
    return _png(fig)


def plot_perplexity(evaluation: dict[str, Any]) -> str | None:
    """Test-answer and probe-answer perplexity, baseline vs tuned."""
    names = [k for k in ("eval_ppl", "probe_ppl") if k in evaluation["baseline"] and k in evaluation["tuned"]]
    if not names:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 2.8))
    width = 0.38
    for i, side in enumerate(("baseline", "tuned")):
        values = [evaluation[side][k] for k in names]
        bars = ax.bar([x + (i - 0.5) * width for x in range(len(names))], values, width, label=side,
                      color="#a6a6a6" if side == "baseline" else "#4c72b0")
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(range(len(names)), ["test answers" if k == "eval_ppl" else "probe answers" for k in names])
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.legend(frameon=False)
    return _png(fig)


def plot_ppl_histogram(predictions: list[dict[str, Any]]) -> str | None:
    """Per-row perplexity of the test answers under both models (log scale)."""
    per = {side: [] for side in ("baseline", "tuned")}
    for row in predictions:
        for side in per:
            nll, n = (row.get("eval_nll") or {}).get(side, (None, 0))
            if n:
                per[side].append(math.exp(nll / n))
    if not per["baseline"]:
        return None
    import numpy as np

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 2.8))
    values = per["baseline"] + per["tuned"]
    bins = np.logspace(np.log10(max(min(values), 1.0)), np.log10(max(values) * 1.05), 30)
    ax.hist(per["baseline"], bins=bins, alpha=0.6, label="baseline", color="#a6a6a6")
    ax.hist(per["tuned"], bins=bins, alpha=0.6, label="tuned", color="#4c72b0")
    ax.set_xscale("log")
    ax.set_xlabel("perplexity of one test answer")
    ax.set_ylabel("rows")
    ax.legend(frameon=False)
    return _png(fig)


def plot_forgetting(forgetting: dict[str, Any] | None, max_forgetting: float | None) -> str | None:
    """Relative change of probe perplexity (and the probe metric's delta) with intervals, against ε."""
    if not forgetting:
        return None
    plt = _pyplot()
    rel = forgetting["relative_increase"]
    fig, ax = plt.subplots(figsize=(6.4, 1.5))
    ax.errorbar(rel["value"] * 100, 0, xerr=[[100 * (rel["value"] - rel["low"])], [100 * (rel["high"] - rel["value"])]],
                fmt="o", color="#4c72b0", capsize=4)
    ax.axvline(0, color="#333", lw=0.8)
    if max_forgetting is not None:
        ax.axvline(max_forgetting * 100, color="#c0392b", ls="--", lw=0.8, label=f"gate: at most +{max_forgetting * 100:g}%")
        ax.legend(loc="lower right", frameon=False)
    ax.set_yticks([0], ["probe perplexity"])
    ax.set_xlabel("tuned vs base, relative change (%)")
    return _png(fig)


def plot_memorization(memorization: dict[str, Any] | None, measure: str) -> str | None:
    """Extraction rates on training rows and held-out rows, baseline vs tuned."""
    if not memorization or "tuned" not in memorization:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 2.8))
    width = 0.38
    groups = [("train", "training rows"), ("control", "held-out rows")]
    for i, side in enumerate(("baseline", "tuned")):
        values = [memorization[side][g][measure] for g, _ in groups]
        bars = ax.bar([x + (i - 0.5) * width for x in range(2)], values, width, label=side,
                      color="#a6a6a6" if side == "baseline" else "#4c72b0")
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(range(2), [label for _, label in groups])
    ax.set_ylim(0, 1.1)
    ax.set_ylabel(f"{measure.replace('_', '-')} extraction rate")
    ax.legend(frameon=False, loc="upper left")
    return _png(fig)


# ----------------------------------------------------------------------------------------------------------------
# Content


def _read_json(path: Path, required: bool = True) -> Any:
    if not path.is_file():
        if required:
            raise ReportError(f"{path} not found: is {path.parent} a fewtune run folder (made by `fewtune run`)?")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path}: not valid JSON ({exc}); re-run `fewtune run` to rewrite it") from None


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return "–" if value is None else str(value)


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
    from tasks.health import assess_run_dir

    try:
        return assess_run_dir(run_dir).to_dict()
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

    criteria = [
        {**c, "label": CRITERIA_LABELS.get(c["name"], c["name"]), "value_text": _fmt(c.get("value")), "threshold_text": _fmt(c.get("threshold"))}
        for c in gate.get("criteria", [])
    ]
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
        "memorization_note": "; ".join(mem.get("skipped_reasons") or []),
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
            "forgetting": plot_forgetting(evaluation.get("forgetting"), reg_cfg.get("max_forgetting")),
            "memorization": plot_memorization(mem, measure),
        },
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


# ----------------------------------------------------------------------------------------------------------------
# The same summary for Prefect artifacts (Markdown and a table)


def summary_rows(evaluation: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per metric: baseline, tuned, delta and its interval."""
    rows = []
    for name, iv in evaluation.get("intervals", {}).items():
        rows.append(
            {
                "metric": f"{name} (gate)" if name == evaluation["primary_metric"] else name,
                "baseline": iv["baseline"],
                "tuned": iv["tuned"],
                "delta": iv["delta"],
                "ci_low": iv["low"],
                "ci_high": iv["high"],
            }
        )
    return rows


def summary_markdown(summary: dict[str, Any], evaluation: dict[str, Any], report_path: str | None = None) -> str:
    """The run's outcome as Markdown: decision, gate criteria, metrics with intervals, where things are."""
    reg = summary.get("register") or {}
    gate = reg.get("gate") or summary.get("gate") or {}
    conf = f"{evaluation.get('bootstrap', {}).get('confidence', 0.95) * 100:.0f}%"
    lines = [f"# fewtune run `{summary['run_name']}`", ""]
    decision = reg.get("decision") or gate.get("decision") or "no promotion decision (registration disabled)"
    lines += [f"**Gate:** {decision}", ""]
    if gate.get("criteria"):
        lines += ["| criterion | passed | value | threshold | detail |", "|---|---|---|---|---|"]
        for c in gate["criteria"]:
            lines.append(
                f"| {CRITERIA_LABELS.get(c['name'], c['name'])} | {'yes' if c['passed'] else '**no**'} | {_fmt(c.get('value'))} | "
                f"{_fmt(c.get('threshold'))} | {c['detail'].replace('|', '/')} |"
            )
        lines.append("")
    lines += [f"| metric | baseline | tuned | delta | {conf} CI |", "|---|---|---|---|---|"]
    for r in summary_rows(evaluation):
        lines.append(f"| {r['metric']} | {r['baseline']:.4f} | {r['tuned']:.4f} | {r['delta']:+.4f} | {r['ci_low']:+.4f} to {r['ci_high']:+.4f} |")
    lines.append("")
    if reg:
        lines.append(f"**Registry:** {reg['model_name']} version {reg['version']} ({', '.join(reg['aliases'])}) at `{reg['tracking_uri']}`")
    lines.append(f"**Run folder:** `{summary['run_dir']}`" + (f" — report: `{report_path}`" if report_path else ""))
    return "\n".join(lines) + "\n"

