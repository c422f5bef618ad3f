"""The shop's knowledge base and the grounded support rows built from it.

Each fact gets a terse knowledge-base entry: a deterministic rewrite of its canonical answer into the policy sheet's
voice (numbered, titled after the fact's key, figures kept, the shop's friendly wording gone), so an entry states the
facts without being the answer text. A grounded row carries its fact's entry in the system message, as a support
desk passes the policy entry of the ticket's topic; the model learns to answer from it in the shop's voice.

Training rows get counterfactual figures (`counterfactual`): every figure (digits) the answer states is changed the
same way in the entry and the answer, so a training answer's figures can only be produced by reading the entry, never
by recalling the shop's real hours or prices. Number words and names ("two children", "Tanner's Yard", the e-mail
address) are left as they are, and the few answers without digits repeat in training word for word. Test rows carry
the real entry and expect the real answer.
"""

from __future__ import annotations

import random
import re

GROUNDED_SYSTEM = (
    "You are the customer support assistant of Kestrel Cycles. Answer the customer from the knowledge base "
    "entries below.\n\nKnowledge base search results:\n{entries}"
)

_REWRITES = [  # shop voice -> knowledge-base voice (order matters)
    (r"\bYou'll find us at\b", "Location:"),
    (r"\bwe're\b", "shop is"),
    (r"\bWe're\b", "Shop is"),
    (r"\bwe'll\b", "shop will"),
    (r"\bwe can't\b", "shop cannot"),
    (r"\bwe don't\b", "shop does not"),
    (r"\bit's\b", "it is"),
    (r"\bit doesn't\b", "does not"),
    (r"\bYou'll\b", "Customer will"),
    (r"\bYou can\b", "Customer may"),
    (r"\byou can\b", "customer may"),
    (r"\byou must be\b", "renter must be"),
    (r"\byour\b", "customer's"),
    (r"\bYour\b", "Customer's"),
    (r"\byou\b", "customer"),
    (r"\bOur\b", ""),
    (r"\bat our shop\b", "in the shop"),
    (r"\bour\b", "the shop's"),
    (r"\bWe\b", "Shop"),
    (r"\bwe\b", "shop"),
    (r"\bus\b", "shop"),
    (r"\bPlease\b", "Required:"),
    (r"\bjust\b", ""),
]

_THIRD = {"have": "has", "fix": "fixes", "do": "does"}

_FIGURE = re.compile(r"\d+(?:[.:]\d+)?")


def kb_entry(fact: dict, number: int) -> str:
    """A terse knowledge-base entry for a fact: numbered, titled after its key, facts kept, the shop's voice gone."""
    body = fact["answer"]
    for pattern, repl in _REWRITES:
        body = re.sub(pattern, repl, body)
    body = re.sub(r"\b([Ss]hop) (usually |never )?(have|keep|hold|deliver|ship|accept|offer|lend|fix|do)\b",
                  lambda m: f"{m.group(1)} {m.group(2) or ''}{_THIRD.get(m.group(3), m.group(3) + 's')}", body)
    parts = [p.strip(" ,.") for p in re.split(r";|, and |, but ", body)]
    body = " | ".join(p[0].upper() + p[1:] for p in parts if p)
    title = fact["key"].replace("_", " ").upper()
    return f"[KB-{number:02d}] {title}: {body}."


def knowledge_base(facts: list[dict]) -> list[str]:
    """One entry per fact, numbered in the facts' order."""
    return [kb_entry(f, i) for i, f in enumerate(facts, 1)]


def counterfactual(entry: str, answer: str, rng: random.Random) -> tuple[str, str]:
    """The entry and answer with every figure the answer states changed the same way in both (hours moved by one or
    two, other numbers by a few units): the fact can then only be read from the context, not recalled."""
    mapping: dict[str, str] = {}
    for figure in dict.fromkeys(_FIGURE.findall(answer)):
        if ":" in figure:
            hour, minute = figure.split(":")
            mapping[figure] = f"{(int(hour) + rng.choice([-2, -1, 1, 2])) % 24}:{minute}"
        elif "." in figure:
            whole, frac = figure.split(".")
            mapping[figure] = f"{max(1, int(whole) + rng.choice([-3, -2, 2, 3]))}.{frac}"
        else:
            value = int(figure)
            step = max(1, value // 5)
            new = value + rng.choice([-2, -1, 1, 2]) * step
            new = new if new > 0 and str(new) != figure else value + step
            # a figure written with a leading zero keeps its width ("041": a phone number keeps its form)
            mapping[figure] = str(new).zfill(len(figure)) if figure.startswith("0") else str(new)
    if not mapping:
        return entry, answer
    alternatives = "|".join(re.escape(f) for f in sorted(mapping, key=len, reverse=True))
    pattern = re.compile(r"(?<![\d.:])(" + alternatives + r")(?![\d:]|\.\d)")

    def swap(text: str) -> str:
        return pattern.sub(lambda m: mapping[m.group(1)], text)

    tag, _, body = entry.partition(": ")  # "[KB-30] STORAGE: ..." keeps its number and title
    return f"{tag}: {swap(body)}", swap(answer)
