"""Key-fact accuracy: hand-checkable answers against references, the metric module, and `primary_metric: auto`.

Each case is one reference and an answer whose verdict a reader can check: every fact of the reference present
(times in 12h or 24h, prices with or without the currency word, phone numbers with a country code, number words)
and no other fact of a kind the reference states (another time, number, phone, e-mail, weekday).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402

from metrics import load_metric  # noqa: E402
from tasks.common.facts import fact_check, key_facts  # noqa: E402
from tasks.common.measure import (  # noqa: E402
    TASK_METRICS,
    check_primary_metric,
    metric_aggregator,
    paired_delta,
    resolve_primary_metric,
    score_answers,
    task_type,
)
from tasks.common.records import load_records, prompt_and_response  # noqa: E402
from tasks.config import ConfigError, FewtuneConfig  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SUNDAY = "On Sundays we're open from 11:00 to 16:00 for rentals and sales only; the workshop is closed."


def _cfg(**evaluate) -> FewtuneConfig:
    return FewtuneConfig(data={"train": "-"}, evaluate={"bootstrap_samples": 200, **evaluate})


@pytest.fixture(scope="module")
def metric():
    return load_metric("fact_accuracy")


@pytest.mark.parametrize(
    ("reference", "answer", "correct"),
    [
        # the sample: the tuned model said the shop is closed on Sundays
        (SUNDAY, "We're closed on Sundays.", False),
        (SUNDAY, "Sunday hours are 11 am to 4 pm.", True),
        (SUNDAY, "On Sunday we open at 11.00am and close at 4pm.", True),
        (SUNDAY, "On Sundays we're open from 11:00 to 17:00.", False),  # 16:00 missing, 17:00 contradicts
        (SUNDAY, "Sundays 11:00-16:00, Saturdays too.", False),  # another weekday
        ("Monday to Friday we're open from 8:30 to 18:30.", "Weekdays, Monday-Friday: 8.30am to 6.30pm.", True),
        ("Monday to Friday we're open from 8:30 to 18:30.", "Monday to Friday, 8:30 to 6:30.", False),  # 6:30 is not 18:30
        # prices: the currency is not compared, the amount is
        ("Our city bike rentals cost €4 per hour or €18 per day.", "4 euros an hour, 18 euros a day.", True),
        ("Our city bike rentals cost €4 per hour or €18 per day.", "€4 per hour or €20 per day.", False),
        ("Standard delivery costs €5.95, and it's free on orders over €75.", "Delivery is €5.95; free above €75.", True),
        ("We offer finance on bikes costing more than €1,200.", "Finance is offered above 1200 euros.", True),
        # a contradicting extra number where every reference number is present
        ("Our city bike rentals cost €4 per hour or €18 per day.", "€4 per hour, €18 per day or €60 per week.", False),
        # phone numbers: groups, country code and trunk zero agree; another number is wrong
        ("You can call us on 041 555 2873.", "Call +44 41 555 2873.", True),
        ("You can call us on 041 555 2873.", "Our number is 041-555-2873.", True),
        ("You can call us on 041 555 2873.", "Call 041 555 2874.", False),
        ("You can call us on 041 555 2873.", "Just give us a call.", False),
        # e-mail addresses: exact (case aside); another address contradicts
        ("Email us at help@kestrelcycles.example.", "Write to HELP@kestrelcycles.example please.", True),
        ("Email us at help@kestrelcycles.example.", "Write to help@kestrelcycles.example or sales@kestrelcycles.example.", False),
        ("Email us at help@kestrelcycles.example.", "Send us an email.", False),
        # number words agree with digits, both ways
        ("We have six free customer parking spaces behind the shop.", "There are 6 free spaces behind the shop.", True),
        ("Each carries up to 2 children.", "It carries up to two children.", True),
        ("Each carries up to 2 children.", "It carries up to three children.", False),
        # names of the reference must be there; an extra name of another kind is not a contradiction
        ("Frames bought from Kestrel Cycles come with a 7-year warranty.", "Our frames carry a 7-year warranty.", False),
        ("We ship to Belgium and Germany for €14.95.", "Shipping to Belgium and Germany costs €14.95 with DHL.", True),
        # dates: day numbers and months; another month contradicts
        ("We're closed on 25 and 26 December and 1 January.", "Closed December 25, 26 and January 1st.", True),
        ("We're closed on 25 and 26 December and 1 January.", "Closed 25 and 26 December and 1 February.", False),
    ],
)
def test_fact_check_verdicts(reference: str, answer: str, correct: bool) -> None:
    check = fact_check(answer, reference)
    assert check["applicable"] is True
    assert check["correct"] is correct, check


def test_fact_check_names_what_is_missing_and_what_contradicts() -> None:
    check = fact_check("On Sundays we're open from 11:00 to 17:00.", SUNDAY)
    assert check["facts"] == ["11:00", "16:00", "Sundays"]
    assert check["missing"] == ["16:00"] and check["contradicting"] == ["17:00"]
    # a number word "one" in the answer is not a number (too often a pronoun), so it contradicts nothing
    prices = "Our city bike rentals cost €4 per hour or €18 per day."
    assert fact_check("Renting one costs €4 per hour or €18 per day.", prices)["correct"] is True
    assert fact_check("Renting two costs €4 per hour or €18 per day.", prices)["contradicting"] == ["two"]


def test_a_reference_without_facts_is_not_applicable(metric) -> None:
    ref = "Every rental includes a helmet and a lock at no extra cost."
    assert not key_facts(ref)
    assert fact_check("Helmets cost €5.", ref) == {
        "applicable": False, "correct": None, "facts": [], "missing": [], "contradicting": []
    }
    out = metric.compute(predictions=["Helmets cost €5.", "We're closed."], references=[ref, SUNDAY], per_example=True)
    assert out["fact_accuracy_per_example"] == [None, 0.0]
    assert out["fact_accuracy"] == 0.0  # one applicable row, wrong
    nothing = metric.compute(predictions=["Helmets cost €5."], references=[ref])
    assert math.isnan(nothing["fact_accuracy"])


def test_metric_value_and_aggregate_over_applicable_rows(metric) -> None:
    predictions = ["Sunday hours are 11 am to 4 pm.", "We're closed on Sundays.", "Sure!", "Call 041 555 2873."]
    references = [SUNDAY, SUNDAY, "Every rental includes a helmet.", "You can call us on 041 555 2873."]
    out = metric.compute(predictions=predictions, references=references, per_example=True)
    assert out["fact_accuracy_per_example"] == [1.0, 0.0, None, 1.0]
    assert out["fact_accuracy"] == pytest.approx(2 / 3)
    aggregate = metric_aggregator("generation", "fact_accuracy")
    assert aggregate(out["fact_accuracy_per_example"]) == pytest.approx(2 / 3)
    assert aggregate([1.0, float("nan"), 0.0, 0.0]) == pytest.approx(1 / 3)  # NaN items count as not applicable
    assert math.isnan(aggregate([None, None]))


def test_several_references_one_correct_suffices(metric) -> None:
    out = metric.compute(
        predictions=["We open at 9:00.", "We open at 9:00."],
        references=[["We open at 10:00.", "We open at 9:00."], ["We open at 10:00.", "We're open late."]],
        per_example=True,
    )
    assert out["fact_accuracy_per_example"] == [1.0, 0.0]


def test_score_answers_carries_fact_accuracy_and_its_paired_interval() -> None:
    assert TASK_METRICS["generation"]["fact_accuracy"] == "fact_accuracy"
    refs = [SUNDAY] * 6 + ["Every rental includes a helmet."] * 2
    wrong = ["We're closed on Sundays."] * 8
    right = ["Sunday: 11 am to 4 pm."] * 8
    base = score_answers("generation", wrong, refs)["fact_accuracy"]
    tuned = score_answers("generation", right, refs)["fact_accuracy"]
    assert (base.value, tuned.value) == (0.0, 1.0)
    assert base.items[-2:] == [None, None] and tuned.on([0, 6, 7]) == 1.0
    delta = paired_delta(base, tuned, _cfg())
    assert delta.value == 1.0 and delta.low == 1.0  # every applicable row went from wrong to right


def test_every_demo_reference_states_its_own_facts() -> None:
    """On the demo's test set: 48 of 50 references carry key facts, and each one, as an answer, is correct."""
    refs = [prompt_and_response(r)[1] for r in load_records(REPO / "examples/support/test.jsonl").records]
    checks = [fact_check(ref, ref) for ref in refs]
    assert sum(c["applicable"] for c in checks) == 48
    assert all(c["correct"] for c in checks if c["applicable"])


def _rows(answers: list[str], label: bool = False) -> list[dict]:
    return [
        {"id": str(i), "messages": [{"role": "user", "content": "?"}, {"role": "assistant", "content": a}],
         "label": a if label else None}
        for i, a in enumerate(answers)
    ]


def test_auto_resolves_by_the_rows() -> None:
    cfg = _cfg()
    assert cfg.evaluate.primary_metric == "auto"
    labelled = _rows(["positive", "negative", "positive"], label=True)
    assert task_type(labelled, cfg) == "classification"
    assert resolve_primary_metric("classification", labelled, cfg) == "macro_f1"

    demo = load_records(REPO / "examples/support/test.jsonl").records
    assert task_type(demo, cfg) == "generation"
    assert resolve_primary_metric("generation", demo, cfg) == "fact_accuracy"

    plain = _rows(["thanks for asking, happy to help", "please bring the bike in", "we can look at it"])
    assert resolve_primary_metric("generation", plain, cfg) == "rouge_l"
    for task, rows in (("classification", labelled), ("generation", demo), ("generation", plain)):
        check_primary_metric(task, cfg, resolve_primary_metric(task, rows, cfg))


def test_auto_follows_fact_rows_share() -> None:
    rows = _rows(["Open at 9:00.", "Happy to help.", "Happy to help.", "Happy to help."])  # 1 of 4 with facts
    assert resolve_primary_metric("generation", rows, _cfg(fact_rows_share=0.25)) == "fact_accuracy"
    assert resolve_primary_metric("generation", rows, _cfg(fact_rows_share=0.26)) == "rouge_l"
    assert resolve_primary_metric("generation", [], _cfg(fact_rows_share=0.0)) == "rouge_l"


def test_a_configured_metric_is_kept_and_checked() -> None:
    demo = load_records(REPO / "examples/support/test.jsonl").records
    cfg = _cfg(primary_metric="rouge_l")
    assert resolve_primary_metric("generation", demo, cfg) == "rouge_l"
    check_primary_metric("generation", _cfg(primary_metric="fact_accuracy"))
    with pytest.raises(ConfigError, match="primary_metric is 'fact_accuracy', but this is a classification task"):
        check_primary_metric("classification", _cfg(primary_metric="fact_accuracy"))
    with pytest.raises(ConfigError, match="primary_metric is 'rouge_l', but this is a classification task"):
        check_primary_metric("classification", cfg, resolve_primary_metric("classification", demo, cfg))
