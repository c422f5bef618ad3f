"""The report's plots: each an inline PNG (matplotlib, no display needed), so the page works offline."""

from __future__ import annotations

import base64
import io
import math
from typing import Any


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
    """Test-answer perplexity, baseline vs tuned."""
    names = [k for k in ("eval_ppl",) if k in evaluation["baseline"] and k in evaluation["tuned"]]
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


FORGETTING_SIGNALS = {  # signal -> (label, scale for display, unit, register field of its gate threshold)
    "general_ppl": ("general-text perplexity", 100, "% change", "max_forgetting"),
    "kl_general": ("KL on general prompts", 1, "nats/token", "max_kl_general"),
    "kl_task": ("KL on task prompts", 1, "nats/token", "max_kl_task"),
    "general_flips": ("general questions: accuracy drop", 100, "points", "max_general_accuracy_drop"),
}


def plot_forgetting(forgetting: dict[str, Any] | None, register: dict[str, Any] | float | None) -> str | None:
    """Each forgetting signal with its interval against its gate threshold (one panel per signal: own scale).

    `register`: the register section (thresholds by field name), or only the general-text perplexity threshold."""
    signals = (forgetting or {}).get("signals") or {}
    names = [n for n in FORGETTING_SIGNALS if n in signals]
    if not names:
        return None
    limits = register if isinstance(register, dict) else {"max_forgetting": register}
    plt = _pyplot()
    fig, axes = plt.subplots(len(names), 1, figsize=(6.4, 0.95 * len(names) + 0.4), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        label, scale, unit, field = FORGETTING_SIGNALS[name]
        sig = signals[name]
        v, lo, hi = (sig[k] * scale for k in ("value", "low", "high"))
        limit = limits.get(field)
        bad = limit is not None and hi > limit * scale
        ax.errorbar(v, 0, xerr=[[max(v - lo, 0)], [max(hi - v, 0)]], fmt="o", capsize=4,
                    color="#c0392b" if bad else "#4c72b0")
        ax.axvline(0, color="#333", lw=0.8)
        if limit is not None:
            ax.axvline(limit * scale, color="#c0392b", ls="--", lw=0.8)
        ax.set_yticks([0], [f"{label} ({unit})"])
    axes[-1, 0].set_xlabel("tuned vs base; dashed: the gate's limit on the upper end")
    fig.tight_layout()
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


def plot_confusion(calibration: dict[str, Any] | None) -> str | None:
    """The tuned model's confusion matrix (rows: true label, columns: predicted), counts in the cells."""
    if not calibration or not calibration.get("confusion"):
        return None
    labels, matrix = calibration["labels"], calibration["confusion"]
    plt = _pyplot()
    size = min(9.0, 2.2 + 0.38 * len(labels))
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ticks = range(len(labels))
    ax.set_xticks(ticks, labels, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(ticks, labels, fontsize=7)
    top = max((max(row) for row in matrix), default=0) or 1
    for i, row in enumerate(matrix):
        for j, n in enumerate(row):
            if n:
                ax.text(j, i, str(n), ha="center", va="center", fontsize=7, color="white" if n > top / 2 else "#333")
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    fig.tight_layout()
    return _png(fig)


def plot_reliability(calibration: dict[str, dict[str, Any]] | None) -> str | None:
    """Reliability diagram: accuracy per confidence bin, baseline and tuned; the diagonal is perfect calibration."""
    if not calibration or not any((calibration.get(m) or {}).get("bins") for m in ("baseline", "tuned")):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    ax.plot([0, 1], [0, 1], color="#999", ls="--", lw=0.8)
    for side, colour in (("baseline", "#a6a6a6"), ("tuned", "#4c72b0")):
        bins = [b for b in (calibration.get(side) or {}).get("bins", []) if b.get("count")]
        if bins:
            ece = calibration[side].get("ece")
            ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o-", color=colour,
                    label=f"{side} (ECE {ece:.3f})" if isinstance(ece, float) else side)
    ax.set_xlabel("confidence (probability of the predicted label)")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(frameon=False, loc="upper left", fontsize=8)
    fig.tight_layout()
    return _png(fig)
