"""The general-ability probe that ships with fewtune, the general prompts that replay is made from, and the check that
keeps the two apart.

- The probe (`tasks/common/general/`, see its README): encyclopedic prose (`prose.jsonl`, for perplexity and KL on
  general text) and short general questions with checkable answers (`questions.jsonl`, for right-to-wrong flips).
  It is on in every run; `data.probe` rows are *added* to it (`GeneralProbe.extra`), never replace it.
- Replay prompts (`replay_prompts.jsonl`): general prompts on other topics than the probe. On-policy replay trains on
  the base model's own answers to them; they are never probe rows, so forgetting is measured on text training never
  saw.
- `check_replay_overlap`: replay rows that nearly repeat a probe row (the shipped one or `data.probe`) would let the
  forgetting figure measure memory instead of ability; the run stops and names them.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from tasks.common.records import DataError, load_records, prompt_and_response

GENERAL_DIR = Path(__file__).with_name("general")
PROSE_FILE = GENERAL_DIR / "prose.jsonl"
QUESTIONS_FILE = GENERAL_DIR / "questions.jsonl"
REPLAY_PROMPTS_FILE = GENERAL_DIR / "replay_prompts.jsonl"

# Shown in the overlap error: at most this many overlapping rows are named (the count is always given).
NAMED_ROWS = 5
REPLAY_FIX = (
    "drop these rows from data.replay, or the overlapping rows from data.probe (replay must not teach what the probe "
    "measures); or leave data.replay unset for on-policy replay"
)


@dataclass
class GeneralProbe:
    """What forgetting is measured on: `prose` ({"id", "text", "source"}), `questions` (canonical chat records with
    `answers`, the accepted answer aliases) and `extra` (the user's `data.probe` rows, canonical chat records)."""

    prose: list[dict[str, Any]]
    questions: list[dict[str, Any]]
    extra: list[dict[str, Any]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {"prose_rows": len(self.prose), "question_rows": len(self.questions), "extra_rows": len(self.extra)}


def _shipped_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as exc:
                raise RuntimeError(f"{path}, line {number}: {exc} (a broken fewtune install: reinstall fewtune)") from None
    return rows


@lru_cache(maxsize=1)
def _shipped() -> tuple[tuple[dict[str, Any], ...], tuple[dict[str, Any], ...]]:
    """The shipped prose and questions, read once; a shipped row that does not load is a bug, not a user error."""
    prose = _shipped_rows(PROSE_FILE)
    for row in prose:
        if not (isinstance(row.get("id"), str) and isinstance(row.get("text"), str) and row["text"].strip()):
            raise RuntimeError(f"{PROSE_FILE}: row {row.get('id')!r} needs a string `id` and a non-empty `text`")
    loaded = load_records(QUESTIONS_FILE, "prompt_completion")
    if loaded.rejects:
        first = loaded.rejects[0]
        raise RuntimeError(f"{QUESTIONS_FILE}, line {first.line}: {first.reason}")
    answers = {str(r["id"]): r.get("answers") for r in _shipped_rows(QUESTIONS_FILE)}
    questions = []
    for record in loaded.records:
        aliases = answers.get(record["id"])
        if not (isinstance(aliases, list) and aliases and all(isinstance(a, str) and a.strip() for a in aliases)):
            raise RuntimeError(f"{QUESTIONS_FILE}: question {record['id']!r} needs `answers`, a list of accepted answers")
        questions.append({**record, "answers": list(aliases)})
    return tuple(prose), tuple(questions)


def load_general_probe(user_rows: list[dict[str, Any]] | None = None) -> GeneralProbe:
    """The shipped probe plus the user's `data.probe` rows (canonical records) in `extra`: data.probe adds, never
    replaces."""
    prose, questions = _shipped()
    return GeneralProbe(
        prose=[dict(r) for r in prose],
        questions=[{**r, "messages": [dict(m) for m in r["messages"]], "answers": list(r["answers"])} for r in questions],
        extra=list(user_rows or []),
    )


def replay_prompts() -> list[dict[str, Any]]:
    """The shipped general prompts for on-policy replay, as canonical records with only a user turn (the base model
    writes the answer). Their topics are disjoint from the probe's (tests/test_general_probe.py checks it)."""
    return [
        {"id": str(r["id"]), "messages": [{"role": "user", "content": r["prompt"]}], "label": None, "source": "gold",
         "parent_id": None}
        for r in _shipped_rows(REPLAY_PROMPTS_FILE)
    ]


# ----------------------------------------------------------------------------------------------------------------
# Checking answers to the probe questions

_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")
_NOT_WORD = re.compile(r"[\W_]+")


def _words(text: str) -> list[str]:
    """Case-folded words and numbers; accents, punctuation and thousands separators dropped ("1,000" -> "1000")."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c))
    return _NOT_WORD.sub(" ", _THOUSANDS.sub("", text.casefold())).split()


def answer_is_right(answer: str, aliases: Sequence[str]) -> bool:
    """Whether `answer` contains one of the accepted `aliases` as whole words or numbers (case, accents and
    punctuation ignored): "Paris" is right in "The capital is Paris.", "8" is not right in "18"."""
    words = _words(answer)
    for alias in aliases:
        wanted = _words(alias)
        n = len(wanted)
        if n and any(words[i : i + n] == wanted for i in range(len(words) - n + 1)):
            return True
    return False


# ----------------------------------------------------------------------------------------------------------------
# Replay must not repeat the probe


def _user_text(record: dict[str, Any]) -> str:
    return "\n".join(m["content"] for m in record.get("messages", []) if m.get("role") == "user")


def _answer_text(record: dict[str, Any]) -> str:
    messages = record.get("messages") or []
    return prompt_and_response(record)[1] if messages and messages[-1].get("role") == "assistant" else ""


def replay_overlaps(
    replay_rows: list[dict[str, Any]], probe: GeneralProbe, threshold: float, *, shingle_size: int = 3,
    num_perm: int = 128,
) -> dict[int, list[str]]:
    """Replay rows (by position) that nearly repeat probe rows, with what each repeats (closest first).

    A replay row overlaps when its prompt nearly repeats a probe question's or a `data.probe` row's prompt, or its
    answer nearly repeats a prose passage or a `data.probe` row's answer: Jaccard similarity of character n-grams
    (case and punctuation ignored, data_checks.similarity) of at least `threshold`, with the same numbers.
    """
    from data_checks.similarity import near_copies  # MinHash: imported when replay is checked, not with the probe

    def side(items: Sequence[object]) -> list[str]:
        return [""] * len(items)  # the other side of near_copies' (prompt, answer) pairs: always equal

    prompts = [_user_text(r) for r in replay_rows]
    answers = [_answer_text(r) for r in replay_rows]
    ref_prompts = [(f"question {q['id']}", _user_text(q)) for q in probe.questions]
    ref_prompts += [(f"data.probe row {r['id']}", _user_text(r)) for r in probe.extra]
    ref_texts = [(f"prose passage {p['id']}", p["text"]) for p in probe.prose]
    ref_texts += [(f"data.probe row {r['id']}", _answer_text(r)) for r in probe.extra]
    found: dict[int, list[tuple[float, str]]] = {}
    for queries, refs, what in ((prompts, ref_prompts, "prompt"), (answers, ref_texts, "answer")):
        refs = [(name, text) for name, text in refs if text.strip()]
        asked = [i for i, text in enumerate(queries) if text.strip()]
        if not refs or not asked:
            continue
        texts = [queries[i] for i in asked]
        matches = near_copies(texts, side(texts), [t for _, t in refs], side(refs), threshold=threshold,
                              shingle_size=shingle_size, num_perm=num_perm)
        for pos, hits in matches.items():
            found.setdefault(asked[pos], []).extend(
                (m.prompt_similarity, f"{what} ~ {refs[m.other][0]} (similarity {m.prompt_similarity:.2f})") for m in hits
            )
    # closest first (a stable sort keeps probe order among equals)
    return {pos: [text for _, text in sorted(hits, key=lambda h: -h[0])] for pos, hits in sorted(found.items())}


def check_replay_overlap(
    replay_rows: list[dict[str, Any]], probe: GeneralProbe, threshold: float, *, source: str = "data.replay",
    fix: str = REPLAY_FIX, shingle_size: int = 3, num_perm: int = 128,
) -> None:
    """Raise a DataError naming the replay rows (from `source`) that nearly repeat probe rows (`replay_overlaps`):
    training on them would make the forgetting check measure memory instead of general ability."""
    found = replay_overlaps(replay_rows, probe, threshold, shingle_size=shingle_size, num_perm=num_perm)
    if not found:
        return
    named = "; ".join(
        f"row {replay_rows[pos].get('id')!r}"
        + (f" (line {replay_rows[pos]['line']})" if replay_rows[pos].get("line") else "")
        + f": {', '.join(hits[:2])}"
        for pos, hits in list(found.items())[:NAMED_ROWS]
    )
    more = f" and {len(found) - NAMED_ROWS} more" if len(found) > NAMED_ROWS else ""
    raise DataError(
        source,
        f"{len(found)} replay row(s) nearly repeat rows of the general-ability probe, which forgetting is measured "
        f"on (train.replay_overlap_threshold={threshold:g}): {named}{more}",
        fix=fix,
    )
