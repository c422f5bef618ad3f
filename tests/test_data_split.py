"""Tests of the deterministic train/eval split of loaded records."""

from __future__ import annotations

import hashlib
import random

import pytest
from data_helpers import WRITERS, chat

from tasks.common.records import load_records, split_train_eval

# ----------------------------------------------------------------------------------------------------------------
# Train/eval split


def _records(n: int, prefix: str = "r") -> list[dict]:
    return [{"id": f"{prefix}{i}", "messages": chat(f"q{i}", f"a{i}")} for i in range(n)]


def _ids(rows: list[dict]) -> list[str]:
    return [r["id"] for r in rows]


def test_split_is_disjoint_and_covers_every_row():
    records = _records(40)
    train, evals = split_train_eval(records, 0.25, seed=0)
    assert len(evals) == 10 and len(train) == 30
    assert not set(_ids(train)) & set(_ids(evals))
    assert sorted(_ids(train) + _ids(evals)) == sorted(_ids(records))


def test_split_is_deterministic_and_keeps_input_order():
    records = _records(50)
    first = split_train_eval(records, 0.2, seed=7)
    assert split_train_eval(records, 0.2, seed=7) == first
    train, evals = first
    position = {r["id"]: i for i, r in enumerate(records)}
    assert [position[r["id"]] for r in train] == sorted(position[r["id"]] for r in train)
    assert [position[r["id"]] for r in evals] == sorted(position[r["id"]] for r in evals)


def test_split_does_not_depend_on_input_order():
    records = _records(60)
    shuffled = records[:]
    random.Random(3).shuffle(shuffled)
    train_a, eval_a = split_train_eval(records, 0.15, seed=1)
    train_b, eval_b = split_train_eval(shuffled, 0.15, seed=1)
    assert set(_ids(eval_a)) == set(_ids(eval_b))
    assert set(_ids(train_a)) == set(_ids(train_b))


def test_split_keeps_augmented_rows_with_their_parent():
    """Rewrites and paraphrases (`parent_id`) land on their parent's side; rows without one split as before."""
    records = _records(60)
    train, evals = split_train_eval(records, 0.2, seed=5)  # no parents: the seeded hash of each id decides
    ranked = sorted(records, key=lambda r: hashlib.sha256(f"5:{r['id']}".encode()).hexdigest())
    assert set(_ids(evals)) == set(_ids(ranked[:12]))

    derived = [{**r, "id": f"{r['id']}#pp", "parent_id": r["id"]} for r in records[::2]]
    replaced = [{**r, "id": f"{r['id']}#sd", "parent_id": r["id"]} for r in records[1::4]]  # their gold rows leave
    kept = [r for r in records if r["id"] not in {x["parent_id"] for x in replaced}]
    train, evals = split_train_eval(kept + derived + replaced, 0.2, seed=5)
    side = {r["id"]: "train" for r in train} | {r["id"]: "eval" for r in evals}
    family = {}
    for r in kept + derived + replaced:
        family.setdefault(r.get("parent_id") or r["id"], set()).add(side[r["id"]])
    assert all(len(sides) == 1 for sides in family.values())  # no family split across train and eval
    assert 18 <= len(evals) <= 19 and len(train) + len(evals) == 90
    assert any(r in evals for r in derived) and any(r in train for r in derived)


def test_split_holds_out_a_row_even_when_one_family_holds_them_all():
    records = [{"id": "root", "messages": chat("q", "a")}]
    records += [{"id": f"p{i}", "parent_id": "root", "messages": chat(f"q{i}", "a")} for i in range(9)]
    train, evals = split_train_eval(records, 0.2, seed=0)
    assert len(evals) == 2 and len(train) == 8


def test_split_seed_changes_the_eval_rows():
    records = _records(60)
    evals = {seed: set(_ids(split_train_eval(records, 0.2, seed)[1])) for seed in range(3)}
    assert len({frozenset(v) for v in evals.values()}) == 3
    assert all(len(v) == 12 for v in evals.values())


@pytest.mark.parametrize(
    "n, fraction, n_eval",
    [(0, 0.15, 0), (1, 0.15, 0), (2, 0.15, 1), (3, 0.15, 1), (10, 0.15, 2), (20, 0.15, 3), (101, 0.15, 15), (100, 0.5, 50)],
)
def test_split_eval_size_follows_the_fraction(n, fraction, n_eval):
    train, evals = split_train_eval(_records(n), fraction, seed=0)
    assert len(evals) == n_eval
    assert len(train) == n - n_eval


def test_split_always_leaves_a_training_row():
    train, evals = split_train_eval(_records(2), 0.9, seed=0)
    assert len(train) == 1 and len(evals) == 1
    train, evals = split_train_eval(_records(5), 0.95, seed=0)
    assert len(train) == 1 and len(evals) == 4


def test_split_is_the_same_for_the_same_rows_in_any_file_type(tmp_path):
    rows = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(20)]
    splits = set()
    for file_type, writer in WRITERS.items():
        folder = tmp_path / file_type
        folder.mkdir()
        records = load_records(writer(rows, folder)[0]).records
        splits.add(tuple(_ids(split_train_eval(records, 0.2, seed=0)[1])))
    assert len(splits) == 1
