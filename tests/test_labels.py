"""Labelled data before any work starts: the label set, the label list in every prompt (train and eval alike), the
gate's metric checked against the task, and the baselines' pieces (k-shot examples, TF-IDF + logistic regression)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.common.labels import label_prompt, label_set, system_prompt_for, with_label_prompt
from tasks.common.records import load_records, read_jsonl
from tasks.config import ConfigError, FewtuneConfig, load_config
from tasks.evaluate.labelled import k_shot_examples, k_shot_prompt, tfidf_lr, worth_it
from tasks.validate import validate_dataset

REPO = Path(__file__).resolve().parent.parent
INTENTS = REPO / "examples/intents"


def _cfg(**data) -> FewtuneConfig:
    return FewtuneConfig(data={"train": str(INTENTS / "train.jsonl"), "format": "text_label", **data},
                         validate={"token_checks": False, "near_duplicates": False})


def test_label_prompt_lists_every_label_with_its_description() -> None:
    cfg = _cfg(label_descriptions={"routing": "the bank's routing number"})
    rows = read_jsonl(INTENTS / "train.jsonl")
    labels = label_set(cfg, rows)
    assert labels == sorted({r["label"] for r in rows}) and len(labels) == 10
    prompt = label_prompt(labels, cfg)
    assert prompt.splitlines()[0] == cfg.data.label_prompt
    assert "- routing: the bank's routing number" in prompt and "- balance" in prompt.splitlines()

    row = {"id": "x", "label": "balance", "messages": [{"role": "user", "content": "how much is in my account"},
                                                       {"role": "assistant", "content": "balance"}]}
    added = with_label_prompt(row, prompt, labels)
    assert added["messages"][0] == {"role": "system", "content": prompt} and added["messages"][1:] == row["messages"]
    own = {**row, "messages": [{"role": "system", "content": "You are the bank's assistant."}, *row["messages"]]}
    appended = with_label_prompt(own, prompt, labels)["messages"][0]["content"]
    assert appended.startswith("You are the bank's assistant.\n\n") and appended.endswith(prompt.splitlines()[-1])
    listed = {**row, "messages": [{"role": "system", "content": "One of: " + ", ".join(labels)}, *row["messages"]]}
    assert with_label_prompt(listed, prompt, labels) == listed  # the user already named every label
    chat = {"id": "c", "label": None, "messages": row["messages"]}
    assert with_label_prompt(chat, prompt, labels) == chat  # unlabelled rows are left alone
    plain = label_prompt(labels, _cfg())
    assert system_prompt_for(_cfg(system_prompt="Be brief."), labels) == "Be brief.\n\n" + plain
    assert system_prompt_for(_cfg(label_prompt=None), labels) is None


def test_configured_labels_must_cover_the_rows_and_descriptions_must_name_labels() -> None:
    rows = read_jsonl(INTENTS / "train.jsonl")
    with pytest.raises(ConfigError, match=r"data.labels does not list 1 label\(s\) the rows use: transfer"):
        label_set(_cfg(labels=sorted({r["label"] for r in rows} - {"transfer"})), rows)
    ordered = ["transfer", "balance", *sorted({r["label"] for r in rows} - {"transfer", "balance"}), "other"]
    assert label_set(_cfg(labels=ordered), rows) == ordered  # the configured order, and labels no row uses yet
    with pytest.raises(ConfigError, match="data.label_descriptions describes label.* not in the label set: wire"):
        label_prompt(ordered, _cfg(label_descriptions={"wire": "a wire transfer"}))


def test_validate_puts_the_label_list_in_train_and_eval_prompts(tmp_path) -> None:
    cfg = _cfg(eval=str(INTENTS / "test.jsonl"))
    train = load_records(INTENTS / "train.jsonl", "text_label")
    evals = load_records(INTENTS / "test.jsonl", "text_label")
    result = validate_dataset(train, evals, cfg, tmp_path / "out")
    labels = result.summary()["labels"]
    assert len(labels) == 10 and result.summary()["system_prompt"] == label_prompt(labels, cfg)
    for row in read_jsonl(result.train_path) + read_jsonl(result.eval_path):
        assert row["messages"][0] == {"role": "system", "content": label_prompt(labels, cfg)}
        assert row["messages"][-1]["content"] == row["label"]


def test_a_metric_that_does_not_fit_the_task_stops_the_run_before_any_work(tmp_path) -> None:
    cfg = _cfg()
    cfg.evaluate.primary_metric = "rouge_l"  # a text metric on labelled rows
    train = load_records(INTENTS / "train.jsonl", "text_label")
    with pytest.raises(ConfigError, match="evaluate.primary_metric is 'rouge_l', but this is a classification task"):
        validate_dataset(train, None, cfg, tmp_path / "out")
    assert not (tmp_path / "out" / "train.jsonl").exists()  # stopped before anything was written
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {train: x.jsonl}\nevaluate: {task: classification, primary_metric: bleu}\n")
    with pytest.raises(ConfigError, match="primary_metric 'bleu' is a generation metric but task is classification"):
        load_config(str(bad))


def test_a_label_list_longer_than_max_length_stops_with_one_message(tmp_path, tiny_model_dir) -> None:
    """The label list goes into every row's system prompt: when it alone fills model.max_length, the run stops before
    any work with one message naming the length and the fix, instead of quarantining every row for the same reason.
    The same data with room to spare validates."""
    from tasks.common.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    train = load_records(INTENTS / "train.jsonl", "text_label")
    cfg = FewtuneConfig(data={"train": str(INTENTS / "train.jsonl"), "format": "text_label"},
                        model={"max_length": 48}, validate={"near_duplicates": False})
    with pytest.raises(ConfigError, match=r"model.max_length=48: the system prompt with the label list \(10 labels"
                                          r".* takes \d+ tokens.*raise model.max_length \(e.g. to \d+\)"):
        validate_dataset(train, None, cfg, tmp_path / "short", tokenizer=tok)
    assert not (tmp_path / "short" / "train.jsonl").exists()
    cfg.model.max_length = 512
    result = validate_dataset(load_records(INTENTS / "train.jsonl", "text_label"), None, cfg, tmp_path / "ok",
                              tokenizer=tok)
    assert result.summary()["quarantined"] == 0


def test_k_shot_examples_cover_every_label_and_come_before_the_query() -> None:
    rows = [{"id": str(i), "label": lab, "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": lab}]}
            for i, lab in enumerate(["a", "a", "a", "b", "b", "c"])]
    shown = k_shot_examples(rows, ["a", "b", "c"], k=2, seed=0)
    assert sorted(r["label"] for r in shown) == ["a", "a", "b", "b", "c"]  # c has only one row
    assert shown == k_shot_examples(rows, ["a", "b", "c"], k=2, seed=0)  # drawn with the seed
    prompt = [{"role": "system", "content": "labels"}, {"role": "user", "content": "the query"}]
    asked = k_shot_prompt(prompt, shown)
    assert asked[0] == prompt[0] and asked[-1] == prompt[-1] and len(asked) == 2 + 2 * len(shown)
    assert [m["role"] for m in asked[1:-1]] == ["user", "assistant"] * len(shown)


def test_tfidf_baseline_learns_real_intents() -> None:
    cfg = _cfg()
    train = [r for r in load_records(INTENTS / "train.jsonl", "text_label").records]
    test = load_records(INTENTS / "test.jsonl", "text_label").records
    labels = label_set(cfg, train, test)
    predicted = tfidf_lr(train, test, labels, c=10.0)
    accuracy = sum(p == r["label"] for p, r in zip(predicted, test)) / len(test)
    assert accuracy > 0.85 and set(predicted) <= set(labels)


def test_worth_it_reads_the_interval_against_the_best_baseline() -> None:
    def table(low, high):
        return {"best": "tfidf_lr", "best_value": 0.9, "tuned_minus_best": {"delta": (low + high) / 2, "low": low, "high": high}}

    assert worth_it(table(0.01, 0.05), 0.93).startswith("yes:")
    assert worth_it(table(-0.08, -0.01), 0.85).startswith("no:")
    assert worth_it(table(-0.02, 0.03), 0.9).startswith("not shown:")
    assert worth_it({"best": None}, 0.9).startswith("no baseline")


def test_labelled_rows_train_with_the_label_settings_the_config_leaves_at_default() -> None:
    from tasks.train.plan import labelled_settings

    rows = [{"id": str(i), "label": "a" if i % 2 else "b"} for i in range(40)]
    cfg = FewtuneConfig(data={"train": "-"}, train={"batch_size": 4})
    from tasks.train.plan import choose_learning_rate

    used, why = labelled_settings(cfg, rows)
    t = used.train
    assert (t.epochs, t.lora_top_layers) == (t.label_epochs, t.label_lora_top_layers)
    assert t.batch_size == 4 and "batch_size" not in why  # set in the config: kept
    assert t.replay_auto_fraction == t.label_replay_auto_fraction != cfg.train.replay_auto_fraction
    from tasks.train.plan import choose_replay_fraction

    assert choose_replay_fraction(len(rows), used)[0] == t.label_replay_auto_fraction  # the mix the train stage builds
    assert why["epochs"] == f"labelled rows: train.label_epochs = {t.label_epochs}"
    assert cfg.train.epochs == "auto"  # the caller's config is not changed
    assert labelled_settings(FewtuneConfig.model_validate(cfg.dump()), rows)[1] == why  # written out and read back
    assert labelled_settings(cfg, [*rows, {"id": "x", "label": None}]) == (cfg, {})  # not every row labelled
    full, why = labelled_settings(FewtuneConfig(data={"train": "-"}, train={"method": "full"}), rows)
    assert full.train.lora_top_layers is None and full.train.epochs == full.train.label_epochs  # top layers: LoRA only
    assert choose_learning_rate("lora", False, cfg, labelled=True)[0] == t.label_learning_rate
    assert choose_learning_rate("lora", True, cfg, labelled=True)[0] == pytest.approx(
        t.label_learning_rate * t.incremental_lr_factor)  # continuing an adapter: the incremental factor still applies
    assert choose_learning_rate("full", False, cfg, labelled=True)[0] == 2e-5  # measured for LoRA only
