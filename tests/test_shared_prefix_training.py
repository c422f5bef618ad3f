"""Training micro-batches whose rows share a leading part (the system prompt with a label list) run that part once:
the loss and every LoRA gradient equal the plain forward's, and the train stage uses it on labelled rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tasks.common.labels import label_prompt, label_set, with_label_prompt
from tasks.common.models import encode_chat, load_model, load_tokenizer
from tasks.common.records import load_records
from tasks.config import FewtuneConfig
from tasks.train import train_adapter
from tasks.train.data import make_collator
from tasks.train.loss import selected_loss
from tasks.train.trainer import grouped_loss, prefix_groups, shared_prefix_inputs, shared_prefix_length

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parent.parent


def _labelled_rows(n: int) -> list[dict]:
    cfg = FewtuneConfig(data={"train": "-", "format": "text_label"})
    rows = load_records(REPO / "examples/intents/train.jsonl", "text_label").records[:n]
    labels = label_set(cfg, rows)
    return [with_label_prompt(r, label_prompt(labels, cfg), labels) for r in rows]


def _lora(model_dir: Path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = load_model(str(model_dir), torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                             lora_dropout=0.0, init_lora_weights=False))
    model.train()
    return model


def test_shared_prefix_gives_the_plain_loss_and_gradients(tiny_model_dir) -> None:
    tok = load_tokenizer(str(tiny_model_dir))
    rows = _labelled_rows(6)
    batch = make_collator(tok)([encode_chat(tok, r, 256) for r in rows])
    batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
    n = shared_prefix_length(batch["input_ids"], batch["attention_mask"], batch["labels"], 16)
    system_tokens = len(tok.apply_chat_template(rows[0]["messages"][:1], tokenize=True, return_dict=False))
    assert n >= system_tokens - 2  # the whole system turn with the label list is shared
    assert (batch["labels"][:, : n + 1] == -100).all()  # no trained token inside the prefix or right after it

    model = _lora(tiny_model_dir)
    plain = model(**batch).loss
    plain.backward()
    want = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    shared = shared_prefix_inputs(model, batch, 16)
    assert shared is not None and shared["input_ids"].size(1) == batch["input_ids"].size(1) - n
    loss = model(**shared).loss
    loss.backward()
    assert loss.item() == pytest.approx(plain.item(), rel=1e-5)
    for k, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, want[k], rtol=1e-4, atol=1e-6, msg=k)


def test_a_replay_row_among_labelled_rows_keeps_the_shared_label_list_and_the_plain_loss(tiny_model_dir) -> None:
    """A micro-batch of labelled rows and two replay rows (general text, their own start) shares no prefix as a
    whole; grouped, the labelled rows run their label list once and the replay rows on their own, and the summed
    loss and every LoRA gradient equal the plain forward of the whole batch."""
    tok = load_tokenizer(str(tiny_model_dir))
    replay = [{"id": f"r{i}", "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
              for i, (q, a) in enumerate([("Name a large ocean.", "The Pacific Ocean is the largest ocean."),
                                          ("What do bees make?", "Bees make honey and wax in their hives.")])]
    rows = _labelled_rows(5)
    rows = rows[:2] + replay[:1] + rows[2:] + replay[1:]
    batch = make_collator(tok)([encode_chat(tok, r, 256) for r in rows])
    batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
    assert shared_prefix_length(batch["input_ids"], batch["attention_mask"], batch["labels"], 16) == 0
    groups = prefix_groups(batch, 16)
    assert groups is not None and sorted(sorted(g.tolist()) for g in groups) == [[0, 1, 3, 4, 5], [2], [6]]

    model = _lora(tiny_model_dir)
    plain = model(**batch).loss
    plain.backward()
    want = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    seen: list[int] = []

    def loss_of(m, inputs, count):
        seen.append(inputs["input_ids"].size(1))
        return selected_loss(m, inputs, count)

    count = (batch["labels"][:, 1:] != -100).sum()
    loss = grouped_loss(model, batch, 16, loss_of, count)
    loss.backward()
    assert loss.item() == pytest.approx(plain.item(), rel=1e-5)
    for k, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, want[k], rtol=1e-4, atol=1e-6, msg=k)
    width = batch["input_ids"].size(1)
    assert len(seen) == 3 and max(seen) <= width - 16  # the labelled rows ran without their label list's tokens
    assert grouped_loss(model, batch, 16, loss_of, None) is None  # no batch-wide token count: the plain path


def test_rows_without_a_common_start_are_left_alone(tiny_model_dir) -> None:
    tok = load_tokenizer(str(tiny_model_dir))
    rows = [{"id": str(i), "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "ok"}]}
            for i, q in enumerate(["where is the shop", "can I rent a bike"])]
    batch = make_collator(tok)([encode_chat(tok, r, 64) for r in rows])
    assert shared_prefix_length(batch["input_ids"], batch["attention_mask"], batch["labels"], 16) == 0
    assert shared_prefix_inputs(_lora(tiny_model_dir), dict(batch), 16) is None
    one = {k: v[:1] for k, v in batch.items()}
    assert shared_prefix_length(one["input_ids"], one["attention_mask"], one["labels"], 1) == 0  # one row: nothing


def test_train_stage_shares_the_label_list_and_learns_the_same(tiny_model_dir, tmp_path) -> None:
    rows = _labelled_rows(32)
    results = {}
    for share in (16, 0):
        cfg = FewtuneConfig(data={"train": "-"}, model={"max_length": 256, "dtype": "float32"},
                            train={"method": "lora", "max_steps": 3, "batch_size": 8, "replay_fraction": 0,
                                   "share_prefix_min_tokens": share, "lora_dropout": 0.0, "evals_per_epoch": 1})
        results[share] = train_adapter(rows, cfg, str(tiny_model_dir), tmp_path / f"s{share}")
    logs = {share: [(h["step"], h["loss"]) for h in json.loads((tmp_path / f"s{share}" / "train_log.json").read_text())
                    if "loss" in h] for share in results}
    assert logs[16] and [s for s, _ in logs[16]] == [s for s, _ in logs[0]]
    assert [x for _, x in logs[16]] == pytest.approx([x for _, x in logs[0]], rel=1e-4)
    assert results[16].best_val_loss == pytest.approx(results[0].best_val_loss, rel=1e-4)
