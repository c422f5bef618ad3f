"""The augment stage's pure parts: key facts, cleaning of generated text, each equivalence rule (accept and reject),
paraphrase rules, and the plan by dataset size.

The filter tests feed hand-written candidates (the kinds a small model writes: good rewrites, rewrites that drop a
price or invent a time, answers instead of questions) straight into the judges, so each rule is hit on purpose.
"""

from __future__ import annotations

import pytest
from augment_support import demo_rows

from tasks.augment import (
    Embedder,
    Generated,
    added_figures,
    clean_generation,
    judge_paraphrase,
    judge_rewrite,
    key_facts,
    missing_facts,
    plan_augmentation,
    spread_order,
)
from tasks.augment.rows import _answer, _question
from tasks.config import AugmentConfig, load_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only cost time


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder()


# ----------------------------------------------------------------------------------------------------------------
# Key facts


def test_key_facts_find_prices_times_dates_and_names():
    facts = key_facts("We're closed on 25 and 26 December; Sunday hours are 11:00 to 16:00 at Kestrel Cycles, €250 deposit.")
    assert {"25", "26", "250", "t:11:00", "t:16:00"} <= set(facts.figures)
    assert {"december", "sunday", "kestrel", "cycles"} <= set(facts.names)
    assert "we're" not in facts.names  # capitalised only for starting the sentence


def test_facts_survive_rewording_and_are_missed_when_dropped():
    gold = "On Sundays we're open from 11:00 to 16:00; a day of e-bike rental costs €45, two working days' notice."
    good = "We open 11 am to 4 pm every Sunday. Renting an e-bike for a day is 45 euros; please give 2 working days' notice."
    assert missing_facts(gold, good) == []
    assert missing_facts(gold, "We open 11 am to 5 pm on Sundays; e-bike rental is €45 a day, two days' notice.") == ["16:00"]
    assert missing_facts(gold, "We open 11:00-16:00 on Saturdays, e-bike rental €45, two days' notice.") == ["Sundays"]
    assert added_figures("Open 11:00 to 16:00, rental €45, or €200 a week.", gold) == ["200"]
    assert added_figures(good, gold) == []


def test_clean_generation_strips_labels_preambles_and_quotes():
    assert clean_generation('Sure! Here is the rewritten answer: "We open at 9."') == "We open at 9."
    assert clean_generation("Rewrite: Is there theft insurance?") == "Is there theft insurance?"
    assert clean_generation("Here is a question that asks the same thing:\n\nWhen do you open?\nWe open at 9.", first_line=True) == "When do you open?"


# ----------------------------------------------------------------------------------------------------------------
# Equivalence rules: each one accepts and rejects


def _rewrite(gold_row, text, embedder, cfg=AugmentConfig(), labels=(), finished=True):
    sim = embedder.similarities([_answer(gold_row)], [text])[0]
    tokens = (len(_answer(gold_row).split()) + 5, len(text.split()) + 5)  # about one token per word, plus punctuation
    return judge_rewrite(gold_row, Generated(text, finished), sim, cfg, labels, tokens)


def _row(question, answer, label=None):
    return {"id": "r1", "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}], "label": label}


def test_short_factual_answer_keeps_every_fact(embedder):
    gold = _row("How much is a day of e-bike rental?", "A day of e-bike rental costs €45, helmet and lock included.")
    kept = _rewrite(gold, "Renting an e-bike for one day costs €45, and the helmet and lock are included.", embedder)
    assert kept.kept and kept.rule == "key_facts"
    lost = _rewrite(gold, "Renting an e-bike for one day is cheap, and the helmet and lock are included.", embedder)
    assert not lost.kept and lost.rule == "key_facts" and "'45'" in lost.reason
    invented = _rewrite(gold, "A day of e-bike rental costs €45, or €200 for a week, helmet and lock included.", embedder)
    assert not invented.kept and invented.rule == "key_facts" and "'200'" in invented.reason


def test_facts_kept_but_meaning_changed_is_caught_by_similarity(embedder):
    gold = _row("How much is a day of e-bike rental?", "A day of e-bike rental costs €45, helmet and lock included.")
    verdict = _rewrite(gold, "I love cycling through the mountains; the view is worth 45 of anything.", embedder)
    assert not verdict.kept and verdict.rule == "similarity"


def test_free_text_needs_similarity(embedder):
    answer = (
        "Our mechanics look at the whole bike: they check the brakes, adjust the gears, true the wheels, tighten "
        "every bolt, lubricate the chain and tell you about anything that will need replacing soon, with a quote "
        "before any extra work is done, so there are never surprises when you come to collect your bike from us."
    )
    gold = _row("What does a service include?", answer)
    assert len(answer.split()) > AugmentConfig().short_answer_words
    good = (
        "Our mechanics check the whole bike: they test the brakes, adjust the gears, true the wheels, tighten every "
        "bolt and lubricate the chain. They tell you about anything that will need replacing soon and quote you "
        "before doing any extra work, so there are no surprises when you collect your bike."
    )
    verdict = _rewrite(gold, good, embedder)
    assert verdict.kept and verdict.rule == "similarity" and verdict.similarity >= AugmentConfig().similarity_threshold
    drifted = _rewrite(gold, "Bicycles were invented in the nineteenth century and became popular in Europe quickly.", embedder)
    assert not drifted.kept and drifted.rule == "similarity"


def test_labelled_rows_keep_their_label(embedder):
    gold = _row("The brakes squeal and the shop never called back.", "negative", label="negative")
    labels = ["negative", "neutral", "positive"]
    assert _rewrite(gold, "Negative.", embedder, labels=labels).kept is False  # same words: nothing new
    kept = _rewrite(gold, "Negative - the customer is unhappy.", embedder, labels=labels)
    assert kept.kept and kept.rule == "label"
    changed = _rewrite(gold, "Positive, mostly.", embedder, labels=labels)
    assert not changed.kept and changed.rule == "label" and "'positive" in changed.reason.lower()


def test_empty_unchanged_cut_off_and_too_long_rewrites_are_rejected(embedder):
    gold = _row("Where is the shop?", "You'll find us at 17 Canal Row, Lindenhaven, next to the Fishmarket tram stop.")
    assert _rewrite(gold, "", embedder).rule == "empty"
    assert _rewrite(gold, "you'll find us at 17 canal row lindenhaven next to the fishmarket tram stop", embedder).rule == "unchanged"
    assert _rewrite(gold, "We are at 17 Canal Row, Lindenhaven", embedder, finished=False).rule == "cut_off"
    verdict = judge_rewrite(gold, Generated("We are at 17 Canal Row. " * 20, True), 0.9, AugmentConfig(), (), (20, 200))
    assert verdict.rule == "too_long"


def _paraphrase(row, text, embedder):
    sq = embedder.similarities([_question(row)], [text])[0]
    sa = embedder.similarities([_answer(row)], [text])[0]
    return judge_paraphrase(row, Generated(text, True), sq, sa, AugmentConfig(), (10, len(text.split()) + 3))


def test_paraphrase_rules(embedder):
    row = _row("How much does it cost to rent an e-bike for a day?", "A day of e-bike rental costs €45, helmet and lock included.")
    kept = _paraphrase(row, "What is the daily price for renting an e-bike?", embedder)
    assert kept.kept, kept.reason
    assert _paraphrase(row, "How much does it cost to rent an e-bike for a day?!", embedder).rule == "unchanged"
    assert _paraphrase(row, "An e-bike costs €45 a day with a helmet and a lock.", embedder).rule == "not_a_question"
    assert _paraphrase(row, "Which museums are open in the city centre?", embedder).rule == "similarity"
    assert _paraphrase(row, "How much does it cost to rent an e-bike for a day, please?", embedder).rule == "near_identical"
    assert _paraphrase(row, "How much does it cost to rent an e-bike for 3 days?", embedder).rule == "key_facts"


def test_plan_by_dataset_size_and_yaml_switches(tmp_path):
    a = AugmentConfig(enabled=True)
    assert (plan_augmentation(demo_rows(50), a).self_distill, plan_augmentation(demo_rows(50), a).paraphrase_n) == ("add", 3)
    big = [dict(r, id=str(i)) for i, r in enumerate(demo_rows() * 8)]  # 2,000 rows
    assert (plan_augmentation(big, a).self_distill, plan_augmentation(big, a).paraphrase_n) == ("replace", 0)
    labelled = [dict(r, label="yes") for r in demo_rows(50)]
    assert plan_augmentation(labelled, a).self_distill == "off"
    assert not plan_augmentation(demo_rows(50), AugmentConfig()).active  # enabled false: pass-through
    path = tmp_path / "c.yaml"
    path.write_text("data: {train: x.jsonl}\naugment: {enabled: true, self_distill: off}\n")
    assert load_config(path).augment.self_distill == "off"  # YAML reads `off` as false
    path.write_text("data: {train: x.jsonl}\naugment: {enabled: true, self_distill: on}\n")
    assert plan_augmentation(big, load_config(path).augment).self_distill == "replace"


def test_spread_order_covers_distinct_answers_first():
    rows = demo_rows(60)
    order = spread_order(rows, first_ids=[rows[5]["id"]])
    assert order[0] == 5
    answers = [rows[i]["messages"][-1]["content"] for i in order]
    distinct = len(set(answers))
    assert len(set(answers[1 : distinct + 1])) == distinct  # after the outlier: one row of every answer, then seconds
