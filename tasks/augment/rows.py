"""Rows and what the generator sees of them: a row's answer and last question, the rewrite and paraphrase
instructions, new rows with provenance (`source`, `parent_id`), and cleaning of generated text."""

from __future__ import annotations

import re
from typing import Any

from tasks.common.records import user_text

GOLD, SELF_DISTILLED, PARAPHRASE = "gold", "self_distilled", "paraphrase"  # `source` of a row


def _answer(record: dict[str, Any]) -> str:
    return record["messages"][-1]["content"]


_question = user_text  # the row's last user message


def _system(record: dict[str, Any]) -> list[dict[str, str]]:
    return [m for m in record["messages"][:1] if m["role"] == "system"]


def rewrite_conversation(record: dict[str, Any], template: str) -> list[dict[str, str]]:
    """What the generator sees for a rewrite: the row's system message and the filled-in instruction."""
    text = template.replace("{question}", _question(record)).replace("{answer}", _answer(record))
    return _system(record) + [{"role": "user", "content": text}]


def paraphrase_conversation(record: dict[str, Any], template: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": template.replace("{question}", _question(record))}]


def with_answer(record: dict[str, Any], answer: str, new_id: str) -> dict[str, Any]:
    messages = [dict(m) for m in record["messages"]]
    messages[-1]["content"] = answer
    return {**record, "id": new_id, "messages": messages, "source": SELF_DISTILLED, "parent_id": record["id"]}


def with_question(record: dict[str, Any], question: str, new_id: str) -> dict[str, Any]:
    messages = [dict(m) for m in record["messages"]]
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    messages[last_user]["content"] = question
    return {**record, "id": new_id, "messages": messages, "source": PARAPHRASE, "parent_id": record["id"]}


_LEAD_LABEL = re.compile(
    r"^\s*(?:(?:sure|certainly|of course)[!,.]?\s*)?(?:here(?:'s| is)[^:\n]{0,60}:|\**(?:the\s+)?(?:rewritten|rephrased|"
    r"paraphrased|new|reworded|reference)?\s*(?:answer|response|question|version|text)\**(?:\s+is)?\s*:|\**(?:rewrite|rephrase|paraphrase|"
    r"rewritten|rephrased|paraphrased|reworded)\**\s*:)\s*",
    re.IGNORECASE,
)
_QUOTES = [('"', '"'), ("'", "'"), ("“", "”"), ("«", "»")]


def clean_generation(text: str, first_line: bool = False) -> str:
    """Strip a leading label ("Rewritten answer:", "Here is ...:") and surrounding quotes; a question keeps its first line.

    A first line that ends with a colon introduces what follows ("Here is a rewritten question ...:") and is dropped.
    """
    text = _LEAD_LABEL.sub("", text.strip(), count=1).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        text = "\n".join(lines[1:])
    if first_line:
        text = next((line.strip() for line in text.splitlines() if line.strip()), "")
    for left, right in _QUOTES:
        if len(text) > 1 and text.startswith(left) and text.endswith(right):
            text = text[1:-1].strip()
    return text
