"""The promotion gate on hand-built evaluations: every status on hand-checkable numbers, the rows that would decide an
insufficient criterion, nothing unmeasured ever passing, and how the criteria are shown (CLI, report, Markdown)."""

from __future__ import annotations

import json
import re

import pytest
from gate_helpers import NAN, config, evaluation, forgetting, interval, memorization, statuses

from tasks.register import GateDecision, gate_decision, rows_needed
from tasks.register.gate import FORGETTING

ALL = ["task_gain", *FORGETTING, "memorization", "beat_baselines", "champion"]
NA = {"beat_baselines": "not_applicable", "champion": "not_applicable"}


def _one(gate: GateDecision, name: str):
    return next(c for c in gate.criteria if c.name == name)


# ---------------------------------------------------------------------------------------------------------------
# Statuses


def test_everything_fine_is_promoted_and_each_criterion_says_so() -> None:
    gate = gate_decision(evaluation(), config(), None)
    assert [c.name for c in gate.criteria] == ALL
    assert statuses(gate) == {**dict.fromkeys(ALL, "pass"), **NA}
    assert gate.promoted and gate.decision.startswith("promoted: 6 of 8 criteria pass (beat_baselines n/a, champion n/a)")
    gain = _one(gate, "task_gain")
    assert (gain.value, gain.low, gain.high, gain.threshold, gain.direction) == (0.2, 0.1, 0.3, 0.0, "higher_is_better")
    assert gain.detail == "fact_accuracy 0.4000 -> 0.6000, gain +0.2000; 95% CI +0.1 to +0.3, the lower end must exceed +0"
    ppl = _one(gate, "forgetting_ppl")
    assert (ppl.value, ppl.high, ppl.threshold, ppl.direction) == (0.05, 0.08, 0.2, "lower_is_better")
    assert "general-text perplexity 12.000 -> 12.600, +5.0%" in ppl.detail and "the upper end must be at most +0.2" in ppl.detail


@pytest.mark.parametrize(
    ("ppl", "status"),
    [
        ((0.10, 0.05, 0.15), "pass"),  # the whole interval at or below +20%
        ((0.15, 0.10, 0.20), "pass"),  # the upper end exactly at the threshold still passes
        ((0.30, 0.25, 0.35), "fail"),  # the whole interval above
        ((0.18, 0.10, 0.26), "insufficient"),  # straddles
        ((0.25, 0.20, 0.30), "insufficient"),  # the lower end exactly at the threshold: not wholly above it
    ],
)
def test_lower_is_better_signal_is_read_on_the_upper_end(ppl, status) -> None:
    gate = gate_decision(evaluation(forgetting=forgetting(ppl=ppl)), config(max_forgetting=0.2), None)
    assert statuses(gate)["forgetting_ppl"] == status
    assert gate.promoted is (status == "pass")


@pytest.mark.parametrize(
    ("delta", "status"),
    [
        ((0.05, 0.01, 0.09), "pass"),
        ((0.05, 0.0, 0.09), "insufficient"),  # the lower end must exceed the minimum, not touch it
        ((-0.05, -0.10, 0.0), "fail"),  # the upper end at the minimum: no gain
        ((-0.05, -0.10, -0.01), "fail"),
        ((0.02, -0.03, 0.07), "insufficient"),
    ],
)
def test_task_gain_is_read_on_the_lower_end(delta, status) -> None:
    gate = gate_decision(evaluation(delta=delta), config(), None)
    assert statuses(gate)["task_gain"] == status and gate.promoted is (status == "pass")


def test_each_forgetting_signal_has_its_own_threshold() -> None:
    fg = forgetting(kl_general=(0.3, 0.25, 0.35), kl_task=(0.9, 0.6, 1.2), flips=(0.2, 0.12, 0.28))
    gate = gate_decision(evaluation(forgetting=fg), config(), None)
    assert statuses(gate) == {**dict.fromkeys(ALL, "pass"), **NA, "forgetting_kl_general": "fail",
                              "forgetting_kl_task": "insufficient", "forgetting_flips": "fail"}
    assert not gate.promoted
    assert gate.decision.startswith("not promoted: failed forgetting_kl_general, forgetting_flips; insufficient evidence on "
                                    "forgetting_kl_task (about ")
    loose = config(max_kl_general=0.4, max_kl_task=1.5, max_general_accuracy_drop=0.3)
    assert gate_decision(evaluation(forgetting=fg), loose, None).promoted
    flips = _one(gate, "forgetting_flips")
    assert "general questions right 0.600 -> 0.400 (4 right->wrong, 3 wrong->right)" in flips.detail


def test_a_check_turned_off_is_shown_as_off_and_does_not_block() -> None:
    fg = forgetting(kl_task=(5.0, 4.0, 6.0))
    assert not gate_decision(evaluation(forgetting=fg), config(), None).promoted
    gate = gate_decision(evaluation(forgetting=fg), config(max_kl_task=None), None)
    assert statuses(gate)["forgetting_kl_task"] == "off" and "register.max_kl_task is null" in _one(gate, "forgetting_kl_task").detail
    assert gate.promoted and "forgetting_kl_task off" in gate.decision


# ---------------------------------------------------------------------------------------------------------------
# Insufficient evidence: how many rows would decide it


def test_rows_needed_formula_on_hand_checkable_numbers() -> None:
    # Symmetric interval: the half facing the threshold is 0.06, the distance 0.05 -> 100 * (0.06 / 0.05)^2 = 144.
    assert rows_needed(100, 0.05, -0.01, 0.11, 0.0) == 144
    # Asymmetric: value 0.15 below the threshold 0.2, so the upper half (0.15) must shrink below 0.05: 50 * 3^2.
    assert rows_needed(50, 0.15, 0.05, 0.30, 0.2) == 450
    assert rows_needed(80, 0.2, 0.1, 0.3, 0.2) is None  # the point estimate on the threshold: no number of rows decides
    assert rows_needed(None, 0.05, -0.01, 0.11, 0.0) is None


def test_style_up_facts_wrong_is_insufficient_not_promoted() -> None:
    """The demo's model: ROUGE-L up a lot, fact accuracy +0.05 with an interval -0.01..+0.11 on 100 test rows."""
    ev = evaluation(delta=(0.05, -0.01, 0.11))
    ev["intervals"]["rouge_l"] = interval("rouge_l", 0.087, 0.095, 0.06, 0.13)
    gate = gate_decision(ev, config(), None)
    gain = _one(gate, "task_gain")
    assert gain.status == "insufficient" and gain.rows_needed == 144 and gain.rows == "test rows"
    assert "it straddles +0, about 144 test rows would decide it" in gain.detail
    assert not gate.promoted
    assert gate.decision.startswith("not promoted: insufficient evidence on task_gain (about 144 test rows would decide it)")


def test_fact_accuracy_above_zero_with_forgetting_fine_is_promoted() -> None:
    gate = gate_decision(evaluation(delta=(0.12, 0.04, 0.2)), config(), None)
    assert gate.promoted and statuses(gate)["task_gain"] == "pass"
    assert "tuned fact_accuracy 0.5200 vs baseline 0.4000 (+0.1200, 95% CI +0.0400 to +0.2000)" in gate.decision


# ---------------------------------------------------------------------------------------------------------------
# Nothing unmeasured passes


@pytest.mark.parametrize("part", ["value", "low", "high"])
def test_nan_never_passes(part) -> None:
    fg = forgetting()
    fg["signals"]["kl_general"][part] = NAN
    gate = gate_decision(evaluation(forgetting=fg), config(max_kl_general=100.0), None)
    assert statuses(gate)["forgetting_kl_general"] == "error" and not gate.promoted
    assert "could not measure forgetting_kl_general (could not be computed (NaN)" in gate.decision
    ev = evaluation(delta=(0.2, NAN, 0.3))
    assert statuses(gate_decision(ev, config(min_gain=-1.0), None))["task_gain"] == "error"


def test_a_signal_listed_as_not_measured_is_an_error_with_its_reason() -> None:
    fg = forgetting(not_measured={"general_flips": "no general question fits in model.max_length=64"})
    gate = gate_decision(evaluation(forgetting=fg), config(), None)
    flips = _one(gate, "forgetting_flips")
    assert flips.status == "error" and not flips.passed and not gate.promoted
    assert flips.detail == "not measured: no general question fits in model.max_length=64"
    assert "could not measure forgetting_flips (not measured: no general question fits" in gate.decision


def test_missing_forgetting_or_a_missing_signal_fails_closed() -> None:
    gate = gate_decision(evaluation(forgetting=None), config(), None)
    assert [statuses(gate)[n] for n in FORGETTING] == ["error"] * 4 and not gate.promoted
    assert all(_one(gate, n).detail == "not measured: the evaluation has no forgetting signals" for n in FORGETTING)
    fg = forgetting()
    del fg["signals"]["kl_task"]
    gate = gate_decision(evaluation(forgetting=fg), config(), None)
    assert statuses(gate)["forgetting_kl_task"] == "error" and "no kl_task signal" in _one(gate, "forgetting_kl_task").detail
    assert statuses(gate_decision(evaluation(intervals={}), config(), None))["task_gain"] == "error"


# ---------------------------------------------------------------------------------------------------------------
# Memorization and the champion


@pytest.mark.parametrize("status", ["not_applicable", "off"])
def test_memorization_not_applicable_or_off_passes_through_with_its_reason(status) -> None:
    reason = "label-only answers: nothing to extract" if status == "not_applicable" else "evaluate.memorization_rows is 0"
    gate = gate_decision(evaluation(memorization=memorization(status=status, reason=reason)), config(), None)
    mem = _one(gate, "memorization")
    assert (mem.status, mem.detail, mem.passed) == (status, reason, True) and gate.promoted


@pytest.mark.parametrize(
    ("excess", "status"), [((0.02, -0.05, 0.08), "pass"), ((0.3, 0.2, 0.4), "fail"), ((0.08, 0.01, 0.15), "insufficient")]
)
def test_memorization_excess_on_its_upper_end(excess, status) -> None:
    gate = gate_decision(evaluation(memorization=memorization(excess)), config(max_memorization=0.1), None)
    assert statuses(gate)["memorization"] == status
    if status == "insufficient":  # 64 rows; the upper half 0.07 must shrink below 0.02: 64 * 3.5^2 = 784
        assert _one(gate, "memorization").rows_needed == 784


def test_memorization_measure_is_configurable_and_missing_memorization_is_an_error() -> None:
    ev = evaluation(memorization=memorization((0.3, 0.2, 0.4)))  # near-verbatim excess high, exact excess ~0
    assert not gate_decision(ev, config(), None).promoted
    assert gate_decision(ev, config(memorization_measure="exact"), None).promoted
    gate = gate_decision(evaluation(memorization=None), config(), None)
    assert statuses(gate)["memorization"] == "error" and not gate.promoted


CHAMP = {"version": "3", "how": "recorded row scores", "n": 100, "champion": 0.5, "challenger": 0.55}


@pytest.mark.parametrize(
    ("delta", "status"),
    [((0.05, 0.01, 0.09), "pass"), ((0.05, -0.01, 0.11), "insufficient"), ((-0.02, -0.06, 0.0), "fail")],
)
def test_champion_is_beaten_on_the_lower_end_of_the_paired_interval(delta, status) -> None:
    champ = {**CHAMP, **dict(zip(("delta", "low", "high"), delta))}
    gate = gate_decision(evaluation(), config(), champ)
    assert statuses(gate)["champion"] == status and gate.promoted is (status == "pass")
    assert "vs champion version 3 0.5000 on the same 100 rows (recorded row scores)" in _one(gate, "champion").detail


def test_a_champion_comparison_error_or_registration_off() -> None:
    msg = "could not read the champion of m at sqlite:///x.db: database is locked; fix the registry"
    gate = gate_decision(evaluation(), config(), {"error": msg})
    assert statuses(gate)["champion"] == "error" and not gate.promoted
    assert gate.decision.startswith(f"not promoted: could not measure champion ({msg})")
    off = gate_decision(evaluation(), config(), {"off": "not compared: registration is off"})
    assert statuses(off)["champion"] == "off" and off.promoted


def test_every_kind_of_blocker_is_named_in_the_decision() -> None:
    ev = evaluation(delta=(-0.1, -0.2, -0.05), forgetting=forgetting(ppl=(0.18, 0.1, 0.26)), memorization=None)
    gate = gate_decision(ev, config(), None)
    assert not gate.promoted
    assert "failed task_gain" in gate.decision and "insufficient evidence on forgetting_ppl (about " in gate.decision
    assert "could not measure memorization (not measured: the evaluation has no memorization result)" in gate.decision


def test_the_recorded_gate_keeps_status_interval_and_passed() -> None:
    recorded = json.loads(json.dumps(gate_decision(evaluation(delta=(0.05, -0.01, 0.11)), config(), None).to_dict()))
    gain = recorded["criteria"][0]
    assert gain["status"] == "insufficient" and gain["passed"] is False and gain["rows_needed"] == 144
    assert (gain["value"], gain["low"], gain["high"], gain["threshold"]) == (0.05, -0.01, 0.11, 0.0)
    assert recorded["criteria"][-1]["passed"] is True  # the champion: not applicable


# ---------------------------------------------------------------------------------------------------------------
# How the criteria are shown


def _shown_gate() -> dict:
    fg = forgetting(kl_general=(0.3, 0.25, 0.35), not_measured={"general_flips": "no general questions"})
    ev = evaluation(delta=(0.05, -0.01, 0.11), forgetting=fg, memorization=memorization(status="not_applicable", reason="labels"))
    return gate_decision(ev, config(max_kl_task=None), None).to_dict()


def test_markdown_summary_shows_each_status_value_interval_threshold_and_rows(tmp_path) -> None:
    from tasks.report import CRITERIA_LABELS, summary_markdown

    gate = _shown_gate()
    md = summary_markdown({"run_name": "r", "run_dir": str(tmp_path), "register": None, "gate": gate}, evaluation())
    lines = md.splitlines()
    rows = {label: next(line for line in lines if line.startswith(f"| {label.replace('|', chr(92) + '|')} |"))
            for label in CRITERIA_LABELS.values() if label != "Forgetting (probe perplexity rise)"}
    assert "| **insufficient** | +0.05 [-0.01, +0.11] | > +0 | about 144 test rows |" in rows["Task gain (primary metric)"]
    assert "| pass | +0.05 [+0.02, +0.08] | <= +0.2 |" in rows["Forgetting: general-text perplexity rise"]
    assert "| **FAIL** | +0.3 [+0.25, +0.35] | <= +0.15 |" in rows["Forgetting: KL(base || tuned) on general prompts"]
    assert "| off |" in rows["Forgetting: KL(base || tuned) on task prompts"]
    assert "| **ERROR** |" in rows["Forgetting: general questions right -> wrong"]
    assert "| n/a |" in rows["Memorization excess"] and "| n/a |" in rows["Beats the current champion"]
    assert f"**Gate:** {gate['decision']}" in md
    assert all(len(re.split(r"(?<!\\)\|", line)) == 8 for line in rows.values())  # 6 cells: no stray `|` in labels or details


def test_cli_prints_each_criterion(capsys, monkeypatch) -> None:
    from flows.cli import common
    from flows.cli.run import print_gate

    monkeypatch.setattr(common.console, "width", 300)
    print_gate(_shown_gate())
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip() and line.startswith("  ") and line.split()[0] in ALL}
    assert "insufficient" in lines["task_gain"] and "+0.05 [-0.01, +0.11]" in lines["task_gain"]
    assert "about 144 test rows would decide it" in lines["task_gain"]
    assert "FAIL" in lines["forgetting_kl_general"] and "threshold <= +0.15" in lines["forgetting_kl_general"]
    assert "ERROR" in lines["forgetting_flips"] and " off " in lines["forgetting_kl_task"]
    assert "n/a" in lines["memorization"] and "n/a" in lines["champion"]
    assert "not measured: no general questions" in out


def test_old_recorded_criteria_still_display() -> None:
    from tasks.report.summary import criterion_cells

    old = {"name": "forgetting", "passed": False, "value": 0.25, "threshold": 0.2, "detail": "probe perplexity +25%"}
    cells = criterion_cells(old)
    assert (cells["status_text"], cells["value_text"], cells["threshold_text"]) == ("FAIL", "+0.25", "+0.2")


# ---------------------------------------------------------------------------------------------------------------
# Labelled data: the tuned model must beat the best fair baseline


def _labelled(tuned_minus_best, best="tfidf_lr", others=None, not_measured=None):
    """Baselines as `evaluate_models` writes them: `tuned_minus_best` against `best` (0.9), `others` {name: delta}."""
    systems = {}
    if tuned_minus_best:
        systems[best] = {"metrics": {"macro_f1": 0.9}, "tuned_minus": interval("macro_f1", 0.9, *tuned_minus_best)}
    for name, d in (others or {}).items():
        systems[name] = {"metrics": {"macro_f1": 0.6}, "tuned_minus": interval("macro_f1", 0.6, *d)}
    table = {"primary_metric": "macro_f1", "best": best if systems else None, "systems": systems,
             "not_measured": not_measured or {}}
    return evaluation(primary="macro_f1", task="classification", baselines=table,
                      memorization=memorization(status="not_applicable", reason="labels"))


@pytest.mark.parametrize(
    ("d", "status"),
    [
        ((0.04, 0.01, 0.07), "pass"),
        ((-0.06, -0.10, -0.02), "fail"),  # loses to TF-IDF + logistic regression: never promoted
        ((0.01, -0.02, 0.04), "insufficient"),
    ],
)
def test_a_fine_tune_must_beat_the_best_baseline(d, status) -> None:
    gate = gate_decision(_labelled(d, others={"zero_shot": (0.3, 0.25, 0.35)}), config(), None)
    assert statuses(gate)["beat_baselines"] == status
    assert statuses(gate)["task_gain"] == "pass"  # better than the zero-shot base model is not enough
    assert gate.promoted is (status == "pass")
    c = _one(gate, "beat_baselines")
    assert "vs baseline tfidf_lr 0.9000 (the best baseline)" in c.detail and c.direction == "higher_is_better"


def test_every_baseline_must_be_beaten_not_only_the_best_point_estimate() -> None:
    # k-shot scores below TF-IDF but the tuned model's interval against it reaches lower: it decides
    gate = gate_decision(_labelled((0.04, 0.01, 0.07), others={"k_shot": (0.05, -0.01, 0.11)}), config(), None)
    c = _one(gate, "beat_baselines")
    assert c.status == "insufficient" and "vs baseline k_shot" in c.detail and not gate.promoted


def test_unmeasured_baselines_never_pass_and_the_check_can_be_turned_off() -> None:
    gate = gate_decision(_labelled(None), config(), None)
    assert statuses(gate)["beat_baselines"] == "error" and not gate.promoted
    assert "not measured: the evaluation has no baselines" in _one(gate, "beat_baselines").detail
    # a requested baseline that could not run: the others alone do not pass
    part = gate_decision(_labelled((0.04, 0.01, 0.07), not_measured={"k_shot": "no example fits"}), config(), None)
    assert statuses(part)["beat_baselines"] == "error" and "k_shot: no example fits" in _one(part, "beat_baselines").detail
    off = gate_decision(_labelled((-0.06, -0.10, -0.02)), config(beat_baselines=False), None)
    assert statuses(off)["beat_baselines"] == "off" and off.promoted


def test_a_signal_that_measures_nothing_for_the_task_is_not_applicable_never_pass() -> None:
    fg = forgetting()
    del fg["signals"]["kl_task"]
    fg["not_applicable"] = {"kl_task": "labelled data: moving the label distribution is the task"}
    gate = gate_decision(evaluation(forgetting=fg), config(), None)
    c = _one(gate, "forgetting_kl_task")
    assert c.status == "not_applicable" and c.detail.startswith("labelled data") and gate.promoted
    del fg["not_applicable"]
    assert statuses(gate_decision(evaluation(forgetting=fg), config(), None))["forgetting_kl_task"] == "error"
