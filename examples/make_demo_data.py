"""Generate fewtune's embedded demo dataset (deterministic, standard library only).

Run:  python examples/make_demo_data.py

(Re)writes, next to this script:
  support/train.jsonl   chat-format support Q&A for the fictional shop "Kestrel Cycles" (5 phrasings per fact)
  support/test.jsonl    one further, differently worded question per fact, same canonical answer
  helpdesk/train.jsonl  the same questions grounded: each system message carries the fact's knowledge-base entry, as
                        the support desk passes it, with counterfactual figures in entry and answer alike (the model
                        learns to read the entry, not to recall the shop's figures)
  helpdesk/test.jsonl   the rephrased test questions with the real entry and the real answer
  probe/general.jsonl   50 general-knowledge prompt/completion pairs (forgetting probe)

Everything about Kestrel Cycles is invented. The output is byte-identical on every run:
fixed seed, fixed ordering, json.dumps(ensure_ascii=False), "\\n" line endings.

The content lives in `demo_data/` next to this script: the facts by topic (visit_and_rent, repair_and_delivery,
buying_and_extras) and the probe (probe). This script checks it and writes the files.
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

SEED = 20240611
SYSTEM = "You are the customer support assistant of Kestrel Cycles."
MAX_ANSWER_WORDS = 25

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # also when this file is loaded by path (importlib), not run as a script
    sys.path.insert(0, str(HERE))

from demo_data import FACTS, PROBE  # noqa: E402
from demo_data.grounding import GROUNDED_SYSTEM, counterfactual, knowledge_base  # noqa: E402


def _norm(text: str) -> str:
    """Lower-case, drop punctuation, collapse spaces: used to catch near-identical questions."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def validate() -> None:
    keys = [f["key"] for f in FACTS]
    assert len(keys) == len(set(keys)), "duplicate fact key"
    seen: dict[str, str] = {}
    for f in FACTS:
        assert len(f["train"]) == 5, f["key"]
        assert len(f["answer"].split()) <= MAX_ANSWER_WORDS, (f["key"], len(f["answer"].split()))
        for q in [*f["train"], f["test"]]:
            n = _norm(q)
            assert n not in seen, f"duplicate question {q!r} ({seen.get(n)} / {f['key']})"
            seen[n] = f["key"]
    assert len(PROBE) == 50, len(PROBE)
    assert len({_norm(p) for p, _ in PROBE}) == len(PROBE), "duplicate probe prompt"


def _chat(row_id: str, question: str, answer: str, system: str = SYSTEM) -> dict:
    return {
        "id": row_id,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ],
    }


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(text)


def helpdesk_rows(pairs: list[tuple[str, int]]) -> tuple[list[dict], list[dict]]:
    """The grounded rows: training rows (the same questions in the same order) with the fact's entry and answer
    given counterfactual figures, test rows with the real entry and answer."""
    entries = knowledge_base(FACTS)
    cf_rng = random.Random(SEED + 1)
    train = []
    for i, (q, n) in enumerate(pairs, 1):
        cf_rng.random()  # one draw per row, as when only a share of the rows was made counterfactual
        entry, answer = counterfactual(entries[n], FACTS[n]["answer"], cf_rng)
        train.append(_chat(f"train-{i:04d}", q, answer, GROUNDED_SYSTEM.format(entries=entry)))
    test = [_chat(f"test-{i:04d}", f["test"], f["answer"], GROUNDED_SYSTEM.format(entries=entries[i - 1]))
            for i, f in enumerate(FACTS, 1)]
    return train, test


def main() -> None:
    validate()
    here = HERE

    pairs = [(q, n) for n, f in enumerate(FACTS) for q in f["train"]]
    rng = random.Random(SEED)
    rng.shuffle(pairs)
    # Reshuffle (same seeded generator, so still deterministic) until no two neighbours share a fact.
    while any(a[1] == b[1] for a, b in zip(pairs, pairs[1:])):
        rng.shuffle(pairs)
    train = [_chat(f"train-{i:04d}", q, FACTS[n]["answer"]) for i, (q, n) in enumerate(pairs, 1)]
    test = [_chat(f"test-{i:04d}", f["test"], f["answer"]) for i, f in enumerate(FACTS, 1)]
    desk_train, desk_test = helpdesk_rows(pairs)
    probe = [{"id": f"probe-{i:03d}", "prompt": p, "completion": c} for i, (p, c) in enumerate(PROBE, 1)]

    outputs = {
        here / "support" / "train.jsonl": train,
        here / "support" / "test.jsonl": test,
        here / "helpdesk" / "train.jsonl": desk_train,
        here / "helpdesk" / "test.jsonl": desk_test,
        here / "probe" / "general.jsonl": probe,
    }
    for path, rows in outputs.items():
        _write_jsonl(path, rows)
        print(f"wrote {len(rows):4d} rows -> {path.relative_to(here.parent)}")


if __name__ == "__main__":
    main()
