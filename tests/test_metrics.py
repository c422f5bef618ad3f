"""Local evaluate metrics: loadable by path without the hub, with known values."""

from __future__ import annotations

import os

# The metrics load from this repository only; the hub must never be needed.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest

from metrics import METRICS_DIR, available_metrics, load_metric


@pytest.fixture(scope="module")
def exact_match():
    return load_metric("exact_match")


@pytest.fixture(scope="module")
def rouge_l():
    return load_metric("rouge_l")


def test_available_metrics() -> None:
    assert available_metrics() == ["exact_match", "rouge_l"]


def test_unknown_metric_names_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown metric 'bleu'; available: exact_match, rouge_l"):
        load_metric("bleu")


def test_loads_by_absolute_path_offline() -> None:
    import evaluate

    metric = evaluate.load(str(METRICS_DIR / "exact_match"))
    assert metric.compute(predictions=["yes"], references=["yes"]) == {"exact_match": 1.0}


def test_exact_match_identical_and_disjoint(exact_match) -> None:
    assert exact_match.compute(predictions=["open at 9", "closed"], references=["open at 9", "closed"]) == {
        "exact_match": 1.0
    }
    assert exact_match.compute(predictions=["open at 9"], references=["closed on Sunday"]) == {"exact_match": 0.0}


@pytest.mark.parametrize(
    ("prediction", "reference"),
    [
        ("The Cat.", "cat"),
        ("  an   apple!", "Apple"),
        ("don't", "dont"),
        ("Café,", "café"),
        ("«oui»", "oui"),
        ("9:00 to\n17:00", "900 to 1700"),
    ],
)
def test_exact_match_normalizes_like_squad(exact_match, prediction: str, reference: str) -> None:
    assert exact_match.compute(predictions=[prediction], references=[reference])["exact_match"] == 1.0


def test_exact_match_does_not_over_normalize(exact_match) -> None:
    assert exact_match.compute(predictions=["cats"], references=["cat"])["exact_match"] == 0.0
    assert exact_match.compute(predictions=["theatre"], references=["atre"])["exact_match"] == 0.0


@pytest.mark.parametrize(
    ("option", "prediction", "reference"),
    [
        ("ignore_case", "Big cat", "big cat"),
        ("ignore_punctuation", "cat.", "cat"),
        ("ignore_articles", "the cat", "cat"),
    ],
)
def test_exact_match_options_turn_steps_off(exact_match, option: str, prediction: str, reference: str) -> None:
    assert exact_match.compute(predictions=[prediction], references=[reference])["exact_match"] == 1.0
    off = exact_match.compute(predictions=[prediction], references=[reference], **{option: False})
    assert off["exact_match"] == 0.0


def test_exact_match_is_a_mean_and_takes_the_best_reference(exact_match) -> None:
    score = exact_match.compute(predictions=["a", "b", "c"], references=["a", "b", "x"])["exact_match"]
    assert score == pytest.approx(2 / 3)
    multi = exact_match.compute(predictions=["Paris", "Rome"], references=[["paris", "Lyon"], ["Milan"]])
    assert multi["exact_match"] == 0.5


def test_rouge_l_identical_and_disjoint(rouge_l) -> None:
    assert rouge_l.compute(predictions=["we open at nine"], references=["we open at nine"]) == {"rouge_l": 1.0}
    assert rouge_l.compute(predictions=["we open at nine"], references=["closed on sundays"]) == {"rouge_l": 0.0}


def test_rouge_l_partial_overlap_is_the_lcs_f_measure(rouge_l) -> None:
    # LCS("the quick brown fox", "the brown dog") = "the brown": P = 2/4, R = 2/3, F = 2PR/(P+R) = 4/7.
    one = rouge_l.compute(predictions=["the quick brown fox"], references=["the brown dog"])["rouge_l"]
    assert one == pytest.approx(4 / 7)
    # LCS = "the cat on the mat" (5 of 6 words on both sides): F = 5/6. The mean of both pairs is reported.
    both = rouge_l.compute(
        predictions=["the quick brown fox", "the cat sat on the mat"],
        references=["the brown dog", "the cat is on the mat"],
    )["rouge_l"]
    assert both == pytest.approx((4 / 7 + 5 / 6) / 2)


def test_rouge_l_stems_and_ignores_case_and_punctuation(rouge_l) -> None:
    assert rouge_l.compute(predictions=["Running dogs!"], references=["run dog"])["rouge_l"] == pytest.approx(1.0)
    plain = rouge_l.compute(predictions=["Running dogs!"], references=["run dog"], use_stemmer=False)
    assert plain["rouge_l"] == 0.0


def test_rouge_l_takes_the_best_reference(rouge_l) -> None:
    score = rouge_l.compute(predictions=["the brown fox"], references=[["a red car", "the brown fox"]])["rouge_l"]
    assert score == pytest.approx(1.0)
