"""Training health: each warning sign provoked by a real training run on a tiny model, and a healthy run that raises
none.

The plain tiny model is random and barely learns, so these tests first pre-train it for a few seconds on plain text
(no chat format) of the probe set and half of the demo's shop facts: a stand-in for a pre-trained model that knows
general text and some of the domain. Fine-tuning it then behaves like fine-tuning the real base model: a sensible
learning rate converges, a hundred times that diverges, many epochs on 20 rows over-fit.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest

from tasks.common.generation import load_tuned
from tasks.common.health_checks import assess, check_convergence, check_loss_gap
from tasks.common.models import load_model, load_tokenizer
from tasks.common.records import load_records, prompt_and_response
from tasks.config import FewtuneConfig
from tasks.evaluate import evaluate_models
from tasks.health import assess_train_dir, health_lines, health_markdown
from tasks.train import train_adapter

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only cost time

REPO = Path(__file__).resolve().parent.parent
HEALTHY_LR = 1e-2  # converges on the tiny pre-trained model within 6 epochs
PRETRAIN_STEPS = 120


def facts() -> list[list[dict]]:
    """The demo's training rows grouped by answer (one group per shop fact, five phrasings each), in file order."""
    groups: dict[str, list[dict]] = {}
    for r in load_records(REPO / "examples/support/train.jsonl").records:
        groups.setdefault(prompt_and_response(r)[1], []).append(r)
    return list(groups.values())


def eval_rows_for(groups: list[list[dict]]) -> list[dict]:
    answers = {prompt_and_response(g[0])[1] for g in groups}
    return [r for r in load_records(REPO / "examples/support/test.jsonl").records if prompt_and_response(r)[1] in answers]


def make_cfg(**train) -> FewtuneConfig:
    settings = dict(method="lora", epochs=6, learning_rate=HEALTHY_LR, batch_size=8, evals_per_epoch=1, replay_fraction=0)
    return FewtuneConfig(
        data={"train": "-"},
        model={"max_length": 96, "dtype": "float32"},  # the checks compare losses and scores: the same on every CPU
        train=settings | train,
        evaluate={"max_new_tokens": 24, "bootstrap_samples": 200, "memorization_rows": 0, "robustness_original": False,
                  "primary_metric": "rouge_l", "probe_max_rows": 8, "probe_max_new_tokens": 8},
    )


@pytest.fixture(scope="module")
def knowing_base(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model after PRETRAIN_STEPS steps of plain next-token training on the probe set and facts 1-25 (a few seconds)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rows = [r for g in facts()[:25] for r in g] + load_records(REPO / "examples/probe/general.jsonl").records
    texts = [f"{prompt_and_response(r)[0][-1]['content']} {prompt_and_response(r)[1]}" for r in rows]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:64] for t in texts]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    order = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(PRETRAIN_STEPS):
        batch = [ids[i] for i in torch.randperm(len(ids), generator=order)[:16].tolist()]
        width = max(map(len, batch))
        x = torch.full((len(batch), width), tokenizer.pad_token_id)
        mask = torch.zeros_like(x)
        for row, seq in enumerate(batch):
            x[row, : len(seq)], mask[row, : len(seq)] = torch.tensor(seq), 1
        model(input_ids=x, attention_mask=mask, labels=x.masked_fill(mask == 0, -100)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    out = tmp_path_factory.mktemp("knowing-base")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def train_and_evaluate(rows, test, cfg, base: Path, out: Path, evaluate: bool = True):
    result = train_adapter(rows, cfg, str(base), out / "train")
    evaluation = None
    if evaluate:
        evaluation = evaluate_models(test, None, cfg, str(base), result.adapter_path, out / "evaluate", train_records=rows).to_dict()
    return result, evaluation, assess_train_dir(out / "train", evaluation, cfg)


@pytest.fixture(scope="module")
def healthy(knowing_base, tmp_path_factory):
    """12 known facts, all five phrasings (60 rows), a sensible learning rate; tested on the rephrased test rows."""
    groups = facts()[:12]
    rows = [r for g in groups for r in g]
    return train_and_evaluate(rows, eval_rows_for(groups), make_cfg(), knowing_base, tmp_path_factory.mktemp("healthy"))


def test_healthy_run_raises_no_flag(healthy):
    result, evaluation, report = healthy
    assert report.healthy, health_lines(report.to_dict())
    assert {c.name: c.status for c in report.checks} == dict.fromkeys(
        ["eval_perplexity", "loss_gap", "convergence", "baseline", "trainable_tokens"], "ok"
    )
    assert evaluation["tuned"]["eval_ppl"] < 5 < evaluation["baseline"]["eval_ppl"]
    assert evaluation["tuned"]["rouge_l"] > evaluation["baseline"]["rouge_l"]
    assert result.loss_tokens >= 1000
    assert health_lines(report.to_dict())[0].startswith("no warning signs (5 checks passed")


def test_learning_rate_100x_too_high_flags_oscillation(knowing_base, healthy, tmp_path, caplog):
    groups = facts()[:12]
    rows = [r for g in groups for r in g]
    with caplog.at_level(logging.WARNING, logger="fewtune.health"):
        result, _, report = train_and_evaluate(rows, [], make_cfg(learning_rate=100 * HEALTHY_LR), knowing_base, tmp_path, evaluate=False)
    check = next(c for c in report.checks if c.name == "convergence")
    assert check.status == "flag" and "learning rate is too high" in check.observed
    assert "train.learning_rate (now 1)" in check.advice
    # The same warning appeared in the log during training, at an evaluation, not only afterwards.
    live = [r.getMessage() for r in caplog.records if "Loss convergence" in r.getMessage()]
    assert len(live) == 1 and "fix: lower train.learning_rate" in live[0]
    assert next(c for c in healthy[2].checks if c.name == "convergence").status == "ok"


@pytest.mark.parametrize("guarded", [False, True], ids=["guard-off", "guard-on"])
def test_many_epochs_on_20_rows_flag_growing_gap_and_few_tokens(knowing_base, tmp_path, guarded):
    # One phrasing each of 20 facts the base model never saw: the validation rows ask about facts training lacks.
    rows = [g[0] for g in facts()[25:45]]
    patience = {} if guarded else {"early_stopping_patience": 100, "overmemorization_patience": 100}
    cfg = make_cfg(epochs=30, batch_size=4, **patience)
    result, _, report = train_and_evaluate(rows, [], cfg, knowing_base, tmp_path, evaluate=False)
    flags = {c.name: c for c in report.flags}
    assert set(flags) == {"loss_gap", "trainable_tokens"}, health_lines(report.to_dict())
    assert "over-fitting" in flags["loss_gap"].observed and "train.epochs (now 30)" in flags["loss_gap"].advice
    assert flags["loss_gap"].value > cfg.health.max_loss_gap
    assert result.loss_tokens < cfg.health.min_trainable_tokens and "augment.enabled=true" in flags["trainable_tokens"].advice
    if guarded:  # early stopping ended training; the flag still tells the user to change the settings
        assert result.stop_reason in ("early_stopping", "over_memorization") and "best checkpoint" in flags["loss_gap"].advice


def test_undertrained_model_flags_eval_perplexity(knowing_base, tmp_path):
    groups = facts()[:12]
    rows = [r for g in groups for r in g]
    _, evaluation, report = train_and_evaluate(rows, eval_rows_for(groups), make_cfg(learning_rate=1e-3, epochs=2), knowing_base, tmp_path)
    flag = next(c for c in report.checks if c.name == "eval_perplexity")
    assert flag.status == "flag" and flag.value == evaluation["tuned"]["eval_ppl"] > 5
    assert "raise train.epochs (now 2)" in flag.advice


def test_fine_tuning_on_wrong_answers_flags_metric_below_baseline(knowing_base, healthy, tmp_path):
    # The base model here already answers the 12 facts (the healthy adapter merged in); the training rows then give
    # each question the answer of another fact.
    base = tmp_path / "base"
    load_tuned(load_model(str(knowing_base)), healthy[0].adapter_path).save_pretrained(base)
    load_tokenizer(str(knowing_base)).save_pretrained(base)
    groups = facts()[:12]
    answers = [prompt_and_response(g[0])[1] for g in groups]
    wrong = {a: answers[(i + 1) % len(answers)] for i, a in enumerate(answers)}
    rows = [{**r, "messages": r["messages"][:-1] + [{"role": "assistant", "content": wrong[prompt_and_response(r)[1]]}]}
            for g in groups for r in g]
    _, evaluation, report = train_and_evaluate(rows, eval_rows_for(groups), make_cfg(), base, tmp_path / "run")
    flag = next(c for c in report.checks if c.name == "baseline")
    assert flag.status == "flag" and evaluation["tuned"]["rouge_l"] < evaluation["baseline"]["rouge_l"]
    assert "made the task worse" in flag.observed and "train.learning_rate" in flag.advice


# ----------------------------------------------------------------------------------------------------------------
# Rules on edge cases, the thresholds, and what users read


def _log(losses, evals=()):
    return [{"step": i + 1, "loss": x} for i, x in enumerate(losses)] + [{"step": s, "eval_loss": v} for s, v in evals]


def test_nan_loss_and_a_loss_ending_well_above_its_start_are_flagged_too_short_logs_are_skipped():
    h = make_cfg().health
    assert check_convergence(_log([2.0, 1.5, math.nan]), h).status == "flag"
    assert "diverged" in check_convergence(_log([2.0, 2.2, 2.3, 2.4]), h).observed  # ends 20% above the start
    assert check_convergence(_log([0.50, 0.48, 0.47, 0.52]), h).status == "ok"  # flat and noisy: 4% above
    assert check_convergence(_log([2.0, 1.0]), h).status == "skipped"
    assert check_loss_gap(_log([2.0], [(1, 2.1)]), h).status == "skipped"


def test_thresholds_are_config_fields():
    log = _log([2.0, 1.0, 1.3, 0.9], [(2, 1.0), (4, 1.4)])
    assert check_convergence(log, make_cfg().health).status == "ok"  # rebound 0.3 = 15% of the first loss
    strict = FewtuneConfig(data={"train": "-"}, health={"max_loss_rebound": 0.1, "max_loss_gap": 0.2}).health
    assert check_convergence(log, strict).status == "flag"
    assert check_loss_gap(log, make_cfg().health).status == "ok"  # gap 0.3 at the end: below 0.5 nats
    assert check_loss_gap(log, strict).status == "flag"  # above 0.2 nats and grown since the best validation loss


def test_report_markdown_and_lines_name_each_flag_and_its_fix(healthy):
    _, evaluation, _ = healthy
    worse = {**evaluation, "tuned": {**evaluation["tuned"], "eval_ppl": 9.0, "rouge_l": 0.0}}
    report = assess(_log([2.0, 1.0, 3.0]), worse, make_cfg(), {"loss_tokens": 200, "train_rows": 10}).to_dict()
    assert report["flags"] == ["eval_perplexity", "convergence", "baseline", "trainable_tokens"]
    lines = health_lines(report)
    assert lines[0].startswith("4 warning sign(s)") and sum(line.strip().startswith("fix:") for line in lines) == 4
    md = health_markdown(report, "r1")
    assert md.count("**FLAG**") == 4 and "| Train/validation loss gap | not checked |" in md
    json.dumps(report)  # goes into summary.json as is

