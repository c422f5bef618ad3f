"""Token lengths of rows as the train stage encodes them (chat template, no extra special tokens), for the
token-length checks; rendered cheaply through each role sequence's template layout."""

from __future__ import annotations

import re
from typing import Any

from tasks.common.models import render

Records = list[dict[str, Any]]

_SLOT = "\ue000{}\ue001"  # private-use characters around a message index: text no template adds itself
_SLOT_SPLIT = re.compile("\ue000(\\d+)\ue001")


class _Layout:
    """The chat template's text around the messages of one role sequence: rows then render by concatenation.

    Rendering each row through the Jinja template costs ~50 us; filling the template's literal text around the
    contents costs ~1 us. A layout is checked against the real template on the first row it renders, and dropped
    (`usable` false) when they differ, e.g. for templates that strip or rewrite the content.
    """

    def __init__(self, tokenizer: Any, roles: tuple[str, ...], generation_prompt: bool):
        placeholders = [{"role": r, "content": _SLOT.format(i)} for i, r in enumerate(roles)]
        try:
            parts = _SLOT_SPLIT.split(render(tokenizer, placeholders, add_generation_prompt=generation_prompt))
        except Exception:  # noqa: BLE001 - a template that rejects these roles; role_order reports such rows
            parts = []
        self.literals, self.slots = parts[0::2], [int(i) for i in parts[1::2]]
        self.literal_bytes = sum(len(x.encode()) for x in self.literals)
        self.usable = bool(parts)
        self.verified = False
        self.tokenizer, self.generation_prompt = tokenizer, generation_prompt

    def fill(self, messages: list[dict[str, str]]) -> str:
        out = [self.literals[0]]
        for slot, literal in zip(self.slots, self.literals[1:]):
            out += (messages[slot]["content"], literal)
        text = "".join(out)
        if not self.verified:
            self.verified = True
            self.usable = text == render(self.tokenizer, messages, add_generation_prompt=self.generation_prompt)
        if not self.usable:
            return render(self.tokenizer, messages, add_generation_prompt=self.generation_prompt)
        return text


def _token_counts(tokenizer: Any, texts: list[str]) -> list[int]:
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [len(e) for e in backend.encode_batch(texts, add_special_tokens=False)]
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def token_columns(records: Records, tokenizer: Any, max_length: int) -> tuple[list[int | None], list[int | None]]:
    """Tokens of each rendered row, and the token where its first assistant answer starts (None: surely fits).

    Rows are tokenized exactly as the train stage does (chat template, no extra special tokens), but only when a
    safe bound says they might not fit: a token covers at least one byte, so a row has at most as many tokens as
    its rendering has bytes (plus a small margin for tokenizers that add a marker per word boundary).
    """
    layouts: dict[tuple[tuple[str, ...], bool], _Layout] = {}

    def layout(roles: tuple[str, ...], generation_prompt: bool) -> _Layout:
        key = (roles, generation_prompt)
        if key not in layouts:
            layouts[key] = _Layout(tokenizer, roles, generation_prompt)
        return layouts[key]

    full: dict[int, str] = {}
    prompt: dict[int, str] = {}
    for pos, record in enumerate(records):
        try:
            messages = record["messages"]
            roles = tuple(m["role"] for m in messages)
            sizes = [len(m["content"].encode("utf-8", "surrogatepass")) for m in messages]
        except (KeyError, TypeError, AttributeError):
            continue  # not a well-formed conversation: role_order / non_empty_content report it
        margin = len(messages) + 4
        whole = layout(roles, False)
        if whole.usable and whole.literal_bytes + sum(sizes) + margin > max_length:
            full[pos] = whole.fill(messages)
        k = roles.index("assistant") if "assistant" in roles else 0
        head = layout(roles[:k], True) if k else None
        if head is not None and head.usable and head.literal_bytes + sum(sizes[:k]) + margin > max_length:
            prompt[pos] = head.fill(messages[:k])
    tokens = dict(zip(full, _token_counts(tokenizer, list(full.values()))))
    starts = dict(zip(prompt, _token_counts(tokenizer, list(prompt.values()))))
    return [tokens.get(i) for i in range(len(records))], [starts.get(i) for i in range(len(records))]
