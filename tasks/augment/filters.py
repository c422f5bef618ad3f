"""The equivalence filter: whether a rewrite of an answer, or a paraphrase of a prompt, means the same."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from data_checks.similarity import jaccard, normalize, shingles
from tasks.augment.generators import Generated
from tasks.augment.rows import _answer, _question
from tasks.common.facts import added_figures, key_facts, missing_facts
from tasks.common.measure import to_label
from tasks.config import AugmentConfig


@dataclass
class Verdict:
    kept: bool
    rule: str  # the rule that decided: label, key_facts, similarity, ... (for a rejection: the one that failed)
    reason: str
    similarity: float | None = None


def _meta_phrase(text: str, original: str, phrases: Sequence[str]) -> str | None:
    """The first of `phrases` that `text` holds and `original` does not (ignoring case)."""
    low, orig = text.casefold(), original.casefold()
    return next((p for p in phrases if p.casefold() in low and p.casefold() not in orig), None)


def judge_rewrite(
    gold: dict[str, Any],
    rewrite: Generated,
    similarity: float | None,
    cfg: AugmentConfig,
    labels: Sequence[str],
    token_counts: tuple[int, int],
) -> Verdict:
    """Whether a rewrite of `gold`'s answer is equivalent to it (rules in the package docstring, `tasks/augment/__init__.py`)."""
    text, answer = rewrite.text, _answer(gold)
    gold_tokens, new_tokens = token_counts
    limit = math.ceil(gold_tokens * cfg.self_distill_max_length_ratio) + cfg.length_slack_tokens
    if not text:
        return Verdict(False, "empty", "the generator returned no text")
    if not rewrite.finished:
        return Verdict(False, "cut_off", "cut off at the token limit before it ended")
    if normalize(text) == normalize(answer):
        return Verdict(False, "unchanged", "same words as the gold answer")
    if new_tokens > limit:
        return Verdict(False, "too_long", f"{new_tokens} tokens, over {limit} (self_distill_max_length_ratio x gold + slack)")
    if (phrase := _meta_phrase(text, answer, cfg.reject_phrases)) is not None:
        return Verdict(False, "meta", f"talks about the task ({phrase!r}) instead of rewriting the answer")
    label = gold.get("label")
    if label not in (None, ""):
        said = to_label(text, labels)
        if said != label:
            return Verdict(False, "label", f"names label {said[:40]!r}, not {label!r}", similarity)
        return Verdict(True, "label", f"keeps label {label!r}", similarity)
    rule = "similarity"
    facts = key_facts(answer)
    if facts and len(answer.split()) <= cfg.short_answer_words:
        lost = missing_facts(answer, text)
        if lost:
            return Verdict(False, "key_facts", "drops key fact(s) " + ", ".join(repr(x) for x in lost[:5]), similarity)
        invented = added_figures(text, answer, *(m["content"] for m in gold["messages"][:-1]))
        if invented:
            return Verdict(False, "key_facts", "adds figure(s) the gold answer and prompt lack: " + ", ".join(repr(x) for x in invented[:5]), similarity)
        rule = "key_facts"
    if similarity is None or similarity < cfg.similarity_threshold:
        return Verdict(False, "similarity", f"meaning drifted: similarity {similarity} < similarity_threshold {cfg.similarity_threshold}", similarity)
    why = f"similarity {similarity:.2f}" + (f", keeps all {len(facts)} key facts" if rule == "key_facts" else "")
    return Verdict(True, rule, why, similarity)


def judge_paraphrase(
    original: dict[str, Any],
    paraphrase: Generated,
    sim_question: float,
    sim_answer: float,
    cfg: AugmentConfig,
    token_counts: tuple[int, int],
) -> Verdict:
    """Whether a paraphrase of `original`'s prompt asks the same thing in new words."""
    p = cfg.paraphrase
    text, question = paraphrase.text, _question(original)
    old_tokens, new_tokens = token_counts
    limit = math.ceil(old_tokens * p.max_length_ratio) + cfg.length_slack_tokens
    if not text:
        return Verdict(False, "empty", "the generator returned no text")
    if not paraphrase.finished and new_tokens >= limit:
        return Verdict(False, "cut_off", "cut off at the token limit before it ended")
    if normalize(text) == normalize(question):
        return Verdict(False, "unchanged", "same words as the original prompt")
    if question.rstrip().endswith("?") and not text.rstrip().endswith("?"):
        return Verdict(False, "not_a_question", "the original asks a question; this does not end with a question mark")
    if new_tokens > limit:
        return Verdict(False, "too_long", f"{new_tokens} tokens, over {limit} (paraphrase.max_length_ratio x original + slack)")
    if (phrase := _meta_phrase(text, question, cfg.reject_phrases)) is not None:
        return Verdict(False, "meta", f"talks about the task ({phrase!r}) instead of asking the question")
    lost = missing_facts(question, text)
    if lost:
        return Verdict(False, "key_facts", "drops key fact(s) " + ", ".join(repr(x) for x in lost[:5]), sim_question)
    invented = added_figures(text, question)
    if invented:
        return Verdict(False, "key_facts", "adds figure(s) the original lacks: " + ", ".join(repr(x) for x in invented[:5]), sim_question)
    if sim_question < p.min_similarity:
        return Verdict(False, "similarity", f"meaning drifted: similarity {sim_question:.2f} < paraphrase.min_similarity {p.min_similarity}", sim_question)
    if sim_answer > sim_question:
        return Verdict(False, "answer_like", f"closer to the answer ({sim_answer:.2f}) than to the question ({sim_question:.2f}): it answers instead of asking", sim_question)
    overlap = jaccard(shingles(text, 3), shingles(question, 3))
    if sim_question >= p.max_similarity:
        return Verdict(False, "near_identical", f"near-identical: similarity {sim_question:.2f} >= paraphrase.max_similarity {p.max_similarity}", sim_question)
    return Verdict(True, "similarity", f"similarity {sim_question:.2f}, character overlap {overlap:.2f}", sim_question)
