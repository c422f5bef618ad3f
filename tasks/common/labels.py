"""Labelled data: the label set and the label prompt every labelled row carries.

The base model can only be a fair baseline when it is told which answers exist: every labelled row (train and eval
alike) gets the label list in its system prompt (`data.label_prompt`, optional one-line descriptions from
`data.label_descriptions`). The label set is `data.labels`, or every label of the rows, sorted. Predictions are then
always one of these labels: each label's likelihood is scored (`tasks.common.label_scoring`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tasks.config import ConfigError, FewtuneConfig


def label_set(cfg: FewtuneConfig, *row_sets: Iterable[dict[str, Any]]) -> list[str]:
    """`data.labels`, or the sorted labels of the rows; a row label outside a configured set stops the run."""
    seen = {str(r["label"]) for rows in row_sets for r in rows if r.get("label") not in (None, "")}
    if cfg.data.labels is None:
        return sorted(seen)
    if len(set(cfg.data.labels)) != len(cfg.data.labels):
        raise ConfigError("data.labels lists a label twice; list each label once")
    unknown = sorted(seen - set(cfg.data.labels))
    if unknown:
        raise ConfigError(
            f"data.labels does not list {len(unknown)} label(s) the rows use: {', '.join(unknown[:10])}; add them to "
            "data.labels, or remove data.labels to use every label of the rows"
        )
    return list(cfg.data.labels)


def label_prompt(labels: list[str], cfg: FewtuneConfig) -> str | None:
    """The label list for the system prompt (None when `data.label_prompt` is null or there are no labels)."""
    if cfg.data.label_prompt is None or not labels:
        return None
    unknown = sorted(set(cfg.data.label_descriptions) - set(labels))
    if unknown:
        raise ConfigError(
            f"data.label_descriptions describes label(s) that are not in the label set: {', '.join(unknown[:10])}; "
            "fix the names or drop those entries"
        )
    lines = [cfg.data.label_prompt]
    for label in labels:
        about = cfg.data.label_descriptions.get(label)
        lines.append(f"- {label}: {about}" if about else f"- {label}")
    return "\n".join(lines)


def names_every_label(text: str, labels: list[str]) -> bool:
    return all(label in text for label in labels)


def with_label_prompt(record: dict[str, Any], prompt: str | None, labels: list[str]) -> dict[str, Any]:
    """The row with the label list in its system prompt: added as the system turn, or appended to the row's own
    system prompt unless that already names every label. Rows without a label are returned unchanged."""
    if not prompt or record.get("label") in (None, ""):
        return record
    messages = list(record["messages"])
    if messages and messages[0]["role"] == "system":
        if names_every_label(messages[0]["content"], labels):
            return record
        messages[0] = {"role": "system", "content": f"{messages[0]['content'].rstrip()}\n\n{prompt}"}
    else:
        messages.insert(0, {"role": "system", "content": prompt})
    return {**record, "messages": messages}


def system_prompt_for(cfg: FewtuneConfig, labels: list[str]) -> str | None:
    """The system prompt a labelled row without one ends up with (what the served model must add to a request)."""
    prompt = label_prompt(labels, cfg)
    base = cfg.data.system_prompt
    if not prompt:
        return base
    if base and names_every_label(base, labels):
        return base
    return f"{base.rstrip()}\n\n{prompt}" if base else prompt
