"""Make the small intent-classification example from the CLINC150 data (deterministic, standard library only).

Run:  python examples/intents/make_intents.py PATH/TO/clinc150

PATH/TO/clinc150 is a folder holding `data_full.json` as published by the dataset's authors (the `data/` folder
of https://github.com/clinc/oos-eval). The script (re)writes, next to itself:
  train.jsonl   30 training queries for each of 10 banking intents (300 rows), shuffled with a fixed seed
  test.jsonl    20 test queries for each intent (200 rows), from CLINC150's own test split, in intent order
One JSON object per line: {"id": ..., "text": <the user's query>, "label": <the intent>}, i.e. fewtune's
`text_label` format. Queries are taken verbatim; a query too similar to one already taken (character 3-gram
Jaccard similarity of 0.7 or more) is skipped, so no test query nearly repeats a training one. CLINC150 is licensed CC BY 3.0 (see README.md here).
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

SEED = 20250101
# 10 of the 15 banking intents; bill_due, bill_balance, min_payment, spending_history and account_blocked are left
# out as near-synonyms of the ones kept.
INTENTS = [
    "balance",
    "transfer",
    "transactions",
    "freeze_account",
    "pin_change",
    "routing",
    "interest_rate",
    "order_checks",
    "pay_bill",
    "report_fraud",
]
TRAIN_PER_INTENT = 30
TEST_PER_INTENT = 20


MAX_SIMILARITY = 0.7  # below fewtune's near-duplicate threshold (validate.near_dup_threshold 0.8), with a margin


def _shingles(text: str) -> frozenset[str]:
    """Character 3-grams of the case-folded words (punctuation dropped), as fewtune's near-duplicate check uses."""
    norm = " ".join(re.sub(r"[\W_]+", " ", text.casefold()).split())
    return frozenset(norm[i : i + 3] for i in range(max(1, len(norm) - 2)))


def _pick(rows: list[list[str]], intent: str, n: int, rng: random.Random, seen: list[frozenset[str]]) -> list[str]:
    """`n` queries of `intent`, drawn with `rng` from `rows` ([text, intent] pairs), none close to one in `seen`."""
    pool = [text for text, label in rows if label == intent]
    rng.shuffle(pool)
    picked = []
    for text in pool:
        grams = _shingles(text)
        if all(len(grams & other) / len(grams | other) < MAX_SIMILARITY for other in seen):
            seen.append(grams)
            picked.append(text)
        if len(picked) == n:
            return picked
    raise SystemExit(f"{intent}: only {len(picked)} distinct queries, {n} needed")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(text)


def main(source: Path) -> None:
    data = json.loads((source / "data_full.json").read_text(encoding="utf-8"))
    rng = random.Random(SEED)
    seen: list[frozenset[str]] = []
    train = [(text, intent) for intent in INTENTS for text in _pick(data["train"], intent, TRAIN_PER_INTENT, rng, seen)]
    test = [(text, intent) for intent in INTENTS for text in _pick(data["test"], intent, TEST_PER_INTENT, rng, seen)]
    rng.shuffle(train)
    here = Path(__file__).resolve().parent
    outputs = {
        here / "train.jsonl": [{"id": f"train-{i:04d}", "text": t, "label": label} for i, (t, label) in enumerate(train, 1)],
        here / "test.jsonl": [{"id": f"test-{i:04d}", "text": t, "label": label} for i, (t, label) in enumerate(test, 1)],
    }
    for path, rows in outputs.items():
        _write_jsonl(path, rows)
        print(f"wrote {len(rows):4d} rows -> {path}")


if __name__ == "__main__":
    if len(sys.argv) != 2 or not (Path(sys.argv[1]) / "data_full.json").is_file():
        raise SystemExit("usage: python examples/intents/make_intents.py PATH/TO/clinc150  (the folder with data_full.json)")
    main(Path(sys.argv[1]))
