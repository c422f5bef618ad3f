"""Local evaluate metrics: loadable by path without the hub, with known values."""

from __future__ import annotations

import math
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
    assert available_metrics() == [
        "accuracy", "bleu", "exact_match", "f1", "fact_accuracy", "precision", "recall", "rouge_l", "token_f1"
    ]


def test_unknown_metric_names_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown metric 'meteor'; available: accuracy, bleu, exact_match, f1, fact_accuracy, "):
        load_metric("meteor")


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


# ---------------------------------------------------------------------------------------------------------------
# Per-example statistics: the aggregate of all rows is the reported value (what the bootstrap relies on)


@pytest.mark.parametrize("name", ["exact_match", "rouge_l", "token_f1", "bleu"])
def test_text_metrics_per_example_aggregate_to_the_score(name: str) -> None:
    metric = load_metric(name)
    predictions = ["the cat sat on the mat", "we open at nine", "closed on sundays", "a b c d e"]
    references = ["the cat is on the mat", "we open at 9:00", "open on sundays", "a b c d e"]
    out = metric.compute(predictions=predictions, references=references, per_example=True)
    items = out[f"{name}_per_example"]
    assert len(items) == 4
    assert metric.aggregate(items) == pytest.approx(out[name])
    assert metric.compute(predictions=predictions, references=references) == {name: out[name]}


# ---------------------------------------------------------------------------------------------------------------
# Token F1


@pytest.fixture(scope="module")
def token_f1():
    return load_metric("token_f1")


def test_token_f1_hand_computed(token_f1) -> None:
    # "open from 9 to 5" vs "we are open from 9": shared {open, from, 9} = 3; P = 3/5, R = 3/5, F1 = 0.6.
    assert token_f1.compute(predictions=["open from 9 to 5"], references=["we are open from 9"])["token_f1"] == pytest.approx(0.6)
    # Bags of words: a repeated word counts only as often as the reference has it. "the" is an article and dropped.
    # "cat cat dog" vs "the cat sat": shared {cat} = 1; P = 1/3, R = 1/2, F1 = 2 * (1/6) / (5/6) = 0.4.
    assert token_f1.compute(predictions=["cat cat dog"], references=["the cat sat"])["token_f1"] == pytest.approx(0.4)


def test_token_f1_identical_disjoint_and_empty(token_f1) -> None:
    assert token_f1.compute(predictions=["Open at 9."], references=["open at 9"])["token_f1"] == 1.0
    assert token_f1.compute(predictions=["closed"], references=["open at 9"])["token_f1"] == 0.0
    # Only articles and punctuation: both normalize to nothing, which counts as a match (SQuAD's rule).
    assert token_f1.compute(predictions=["the."], references=["A!"])["token_f1"] == 1.0
    assert token_f1.compute(predictions=[""], references=["open"])["token_f1"] == 0.0


def test_token_f1_mean_and_best_reference(token_f1) -> None:
    out = token_f1.compute(predictions=["open from 9 to 5", "closed"], references=[["we are open from 9", "open from 9 to 5"], "open"])
    assert out["token_f1"] == pytest.approx((1.0 + 0.0) / 2)


# ---------------------------------------------------------------------------------------------------------------
# BLEU


@pytest.fixture(scope="module")
def bleu():
    return load_metric("bleu")


def test_bleu_identical_is_one_and_disjoint_is_zero(bleu) -> None:
    assert bleu.compute(predictions=["the cat sat on the mat"], references=["the cat sat on the mat"])["bleu"] == pytest.approx(1.0)
    assert bleu.compute(predictions=["dogs bark loudly at night"], references=["the cat sat on the mat"])["bleu"] == 0.0


def test_bleu_hand_computed_with_brevity_penalty(bleu) -> None:
    # "the cat sat on mat" vs "the cat sat on the mat": 1-grams 5/5, 2-grams 3/4 (the cat, cat sat, sat on),
    # 3-grams 2/3, 4-grams 1/2; geometric mean (1 * 3/4 * 2/3 * 1/2) ** (1/4) = 0.25 ** 0.25;
    # prediction 5 words < reference 6 words: BP = exp(1 - 6/5).
    expected = 0.25**0.25 * math.exp(1 - 6 / 5)
    score = bleu.compute(predictions=["the cat sat on mat"], references=["the cat sat on the mat"])["bleu"]
    assert score == pytest.approx(expected)
    assert score == pytest.approx(0.5789, abs=1e-4)


def test_bleu_clips_repeated_ngrams_and_has_no_penalty_for_long_predictions(bleu) -> None:
    # "the the the the" vs "the cat": 1-grams clipped to 1/4, no 2-gram matches: BLEU 0 without smoothing.
    assert bleu.compute(predictions=["the the the the"], references=["the cat"])["bleu"] == 0.0
    # Add-one smoothing: p = (1+1)/(4+1), 1/4, 1/3, 1/2 (orders 1..4); prediction longer than reference: BP = 1.
    smoothed = bleu.compute(predictions=["the the the the"], references=["the cat"], smooth=True)["bleu"]
    assert smoothed == pytest.approx((2 / 5 * 1 / 4 * 1 / 3 * 1 / 2) ** 0.25)


def test_bleu_is_a_corpus_statistic_not_a_mean(bleu) -> None:
    predictions = ["the cat sat on mat", "the cat sat on the mat"]
    references = ["the cat sat on the mat", "the cat sat on the mat"]
    # Counts pooled over both pairs: 1-grams 11/11, 2-grams 8/9, 3-grams 6/7, 4-grams 4/5; lengths 11 vs 12.
    expected = (1 * 8 / 9 * 6 / 7 * 4 / 5) ** 0.25 * math.exp(1 - 12 / 11)
    assert bleu.compute(predictions=predictions, references=references)["bleu"] == pytest.approx(expected)


def test_bleu_tokenizes_punctuation_and_keeps_case_unless_asked(bleu) -> None:
    assert bleu.compute(predictions=["Open, 9 to 5."], references=["Open , 9 to 5 ."])["bleu"] == pytest.approx(1.0)
    assert bleu.compute(predictions=["OPEN NINE TO FIVE"], references=["open nine to five"])["bleu"] == 0.0
    assert bleu.compute(predictions=["OPEN NINE TO FIVE"], references=["open nine to five"], lowercase=True)["bleu"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------------------------
# Classification: accuracy, precision, recall, F1 (macro by default)

PRED = ["spam", "ham", "spam", "ham", "eggs", "spam"]
GOLD = ["spam", "spam", "spam", "ham", "ham", "eggs"]
# Per label over (pred, gold): spam: tp 2, predicted 3, gold 3 -> P 2/3, R 2/3, F1 2/3
#                             ham:  tp 1, predicted 2, gold 2 -> P 1/2, R 1/2, F1 1/2
#                             eggs: tp 0, predicted 1, gold 1 -> P 0, R 0, F1 0


def test_accuracy_hand_computed() -> None:
    assert load_metric("accuracy").compute(predictions=PRED, references=GOLD)["accuracy"] == pytest.approx(3 / 6)


def test_macro_precision_recall_f1_hand_computed() -> None:
    assert load_metric("precision").compute(predictions=PRED, references=GOLD)["precision"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert load_metric("recall").compute(predictions=PRED, references=GOLD)["recall"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert load_metric("f1").compute(predictions=PRED, references=GOLD)["f1"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)


def test_precision_and_recall_differ_when_a_label_is_over_predicted() -> None:
    pred, gold = ["a", "a", "a", "b"], ["a", "b", "b", "b"]
    # a: tp 1, predicted 3, gold 1 -> P 1/3, R 1; b: tp 1, predicted 1, gold 3 -> P 1, R 1/3; F1 of each = 1/2.
    assert load_metric("precision").compute(predictions=pred, references=gold)["precision"] == pytest.approx(2 / 3)
    assert load_metric("recall").compute(predictions=pred, references=gold)["recall"] == pytest.approx(2 / 3)
    assert load_metric("f1").compute(predictions=pred, references=gold)["f1"] == pytest.approx(0.5)
    assert load_metric("f1").compute(predictions=pred, references=gold, average="micro")["f1"] == pytest.approx(0.5)
    # weighted by gold counts (a: 1, b: 3): F1 0.5 for both.
    assert load_metric("f1").compute(predictions=pred, references=gold, average="weighted")["f1"] == pytest.approx(0.5)


def test_predictions_outside_the_label_set_count_as_wrong() -> None:
    pred, gold = ["yes", "maybe", "no"], ["yes", "no", "no"]
    # labels fixed to {yes, no}: yes P 1 R 1; no: tp 1, predicted 1, gold 2 -> P 1, R 1/2.
    rec = load_metric("recall").compute(predictions=pred, references=gold, labels=["yes", "no"])["recall"]
    prec = load_metric("precision").compute(predictions=pred, references=gold, labels=["yes", "no"])["precision"]
    assert rec == pytest.approx((1 + 0.5) / 2) and prec == pytest.approx(1.0)


def test_unknown_average_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="average='samples'; use one of macro, micro, weighted"):
        load_metric("f1").compute(predictions=["a"], references=["a"], average="samples")


def test_classification_metrics_match_scikit_learn() -> None:
    import random

    from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

    rng = random.Random(7)
    labels = ["billing", "delivery", "repair", "rental"]
    gold = [rng.choice(labels) for _ in range(60)]
    pred = [g if rng.random() < 0.6 else rng.choice(labels + ["unsure"]) for g in gold]
    assert load_metric("accuracy").compute(predictions=pred, references=gold)["accuracy"] == pytest.approx(accuracy_score(gold, pred))
    for average in ("macro", "micro", "weighted"):
        for name, fn in (("precision", precision_score), ("recall", recall_score), ("f1", f1_score)):
            ours = load_metric(name).compute(predictions=pred, references=gold, labels=labels, average=average)[name]
            theirs = fn(gold, pred, labels=labels, average=average, zero_division=0)
            assert ours == pytest.approx(theirs), (name, average)
