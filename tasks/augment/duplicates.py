"""Duplicates within the dataset and leakage into eval (the validate stage's rules, applied to new rows).

`data_checks.checks` is imported where it is used: it imports great_expectations, which takes seconds, and only the
leakage re-check (eval rows given) needs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from data_checks.similarity import NearDuplicateIndex, jaccard, normalize, numbers, shingles
from tasks.augment.rows import _answer, _question
from tasks.config import ValidateConfig


class EvalLeakage:
    """The validate stage's leakage rule for new rows: same prompt and answer as an eval row, or nearly so."""

    def __init__(self, eval_records: Sequence[dict[str, Any]], v: ValidateConfig):
        from data_checks.checks import records_frame, where  # heavy (great_expectations): lazy

        self.v = v
        frame = records_frame(list(eval_records), "eval")
        rows = frame.to_dict("records")
        self.where = [where(r) for r in rows]
        self.exact = {}
        for key, w in zip(frame["leak_key"], self.where):
            self.exact.setdefault(key, w)
        self.index = None
        if v.near_duplicates and rows:
            self.index = NearDuplicateIndex(v.near_dup_threshold, v.shingle_size, v.minhash_permutations)
            self.index.add_all(frame["prompt"].tolist(), frame["answer"].tolist())

    def reasons(self, rows: Sequence[dict[str, Any]]) -> list[str | None]:
        """For each row, why it leaks into eval (None: it does not)."""
        from data_checks.checks import records_frame  # heavy (great_expectations): lazy

        if not rows:
            return []
        frame = records_frame(list(rows), "train")
        out: list[str | None] = [
            f"same prompt and answer as eval {self.exact[k]}" if k in self.exact else None for k in frame["leak_key"]
        ]
        if self.index is not None:
            for pos, matches in enumerate(self.index.matches(frame["prompt"].tolist(), frame["answer"].tolist())):
                if out[pos] is None and matches:
                    m = matches[0]
                    out[pos] = (
                        f"nearly repeats eval {self.where[m.other]} (prompt similarity {m.prompt_similarity:.2f}, answer "
                        f"{m.answer_similarity:.2f}; validate.near_dup_threshold={self.v.near_dup_threshold})"
                    )
        return out


class DatasetDuplicates:
    """Near-duplicates of new rows among the training rows and the new rows kept so far (validate's rule)."""

    def __init__(self, records: Sequence[dict[str, Any]], v: ValidateConfig):
        self.v = v
        self.records = list(records)
        self.questions: dict[str, str] = {}
        for r in self.records:
            self.questions.setdefault(normalize(_question(r)), r["id"])
        self.index = None
        if v.near_duplicates and self.records:
            self.index = NearDuplicateIndex(v.near_dup_threshold, v.shingle_size, v.minhash_permutations)
            self.index.add_all([_question(r) for r in self.records], [_answer(r) for r in self.records])
        self.kept: dict[str, list[tuple[frozenset[str], tuple[str, ...], str]]] = {}

    def reason(self, row: dict[str, Any], new_question: bool) -> str | None:
        """Why `row` repeats the dataset (None: it does not). `new_question`: its prompt must also be new."""
        q, a = _question(row), _answer(row)
        if new_question and normalize(q) in self.questions:
            return f"asks the same as row {self.questions[normalize(q)]}"
        if self.index is not None:
            found = self.index.matches([q], [a])[0]
            if found:
                m = found[0]
                return (
                    f"nearly repeats row {self.records[m.other]['id']} (prompt similarity {m.prompt_similarity:.2f}, "
                    f"answer {m.answer_similarity:.2f}; validate.near_dup_threshold={self.v.near_dup_threshold})"
                )
        figures = numbers(q) + ("|",) + numbers(a)
        sh = shingles(q, self.v.shingle_size)
        for other_sh, other_figures, other_id in self.kept.get(normalize(a), []):
            if other_figures == figures and jaccard(sh, other_sh) >= self.v.near_dup_threshold:
                return f"nearly repeats the new row {other_id}"
        return None

    def add(self, row: dict[str, Any]) -> None:
        q, a = _question(row), _answer(row)
        self.questions.setdefault(normalize(q), row["id"])
        self.kept.setdefault(normalize(a), []).append(
            (shingles(q, self.v.shingle_size), numbers(q) + ("|",) + numbers(a), row["id"])
        )
