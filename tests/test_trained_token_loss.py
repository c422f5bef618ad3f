"""The loss on trained tokens alone (output head only where the next token is learned): the same loss and LoRA
gradients as the model's own forward, alone and on top of the shared-prefix path; checked once per run, with a
fallback; the train stage learns the same with it on or off."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from test_shared_prefix_training import _labelled_rows, _lora

from tasks.common.models import encode_chat, load_tokenizer
from tasks.config import FewtuneConfig
from tasks.train import train_adapter
from tasks.train.data import make_collator
from tasks.train.loss import SelectedLoss, model_loss_of_one_row, selected_loss
from tasks.train.trainer import _adapters_in_layers, shared_prefix_inputs

pytestmark = pytest.mark.usefixtures("one_thread")


def _chat_rows() -> list[dict]:
    qa = [("When do you open on Sundays?", "We open at 10 and close at 4 on Sundays."),
          ("Can I return a bike after a week?", "Yes, within 30 days with the receipt."),
          ("Where is the shop?", "At 12 Harbour Road, next to the ferry."),
          ("Do you repair e-bikes?", "We do: book a slot by phone.")]
    return [{"id": str(i), "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for i, (q, a) in enumerate(qa)]


def _batch(tok, rows, max_length=256):
    batch = make_collator(tok)([encode_chat(tok, r, max_length) for r in rows])
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}


def _grads(model) -> dict[str, torch.Tensor]:
    out = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return out


@pytest.mark.parametrize("rows", ["chat", "labelled"])
def test_trained_token_loss_equals_the_model_loss_and_gradients(tiny_model_dir, rows) -> None:
    tok = load_tokenizer(str(tiny_model_dir))
    batch = _batch(tok, _chat_rows() if rows == "chat" else _labelled_rows(6))
    trained = int((batch["labels"][:, 1:] != -100).sum())
    assert 0 < trained < batch["labels"][:, 1:].numel() // 2  # the head really runs on fewer positions
    model = _lora(tiny_model_dir)
    plain = model(**batch).loss
    plain.backward()
    want = _grads(model)
    mine = selected_loss(model, batch)
    mine.backward()
    assert mine.item() == pytest.approx(plain.item(), rel=1e-5)
    for k, g in _grads(model).items():
        torch.testing.assert_close(g, want[k], rtol=1e-4, atol=1e-6, msg=k)
    # normalized by the Trainer's token count (gradient accumulation): the sum over trained tokens divided by it
    total = selected_loss(model, batch, num_items_in_batch=torch.tensor(2 * trained))
    assert total.item() == pytest.approx(plain.item() / 2, rel=1e-5)


def test_trained_token_loss_on_a_shared_prefix(tiny_model_dir) -> None:
    tok = load_tokenizer(str(tiny_model_dir))
    batch = _batch(tok, _labelled_rows(6))
    model = _lora(tiny_model_dir)
    plain = model(**batch).loss
    plain.backward()
    want = _grads(model)
    shared = shared_prefix_inputs(model, batch, 16)
    assert shared is not None and "past_key_values" in shared
    mine = selected_loss(model, shared)
    mine.backward()
    assert mine.item() == pytest.approx(plain.item(), rel=1e-5)
    for k, g in _grads(model).items():
        torch.testing.assert_close(g, want[k], rtol=1e-4, atol=1e-6, msg=k)


def test_the_check_compares_one_row_with_the_model_and_falls_back_when_they_differ(tiny_model_dir) -> None:
    tok = load_tokenizer(str(tiny_model_dir))
    batch = _batch(tok, _chat_rows())
    model = _lora(tiny_model_dir)
    theirs, row = model_loss_of_one_row(model, batch)
    assert row["input_ids"].shape[0] == 1 and (row["attention_mask"] == 1).all()  # the first row, padding dropped
    assert theirs.item() == pytest.approx(model(**row).loss.item(), rel=1e-5)

    agreeing = SelectedLoss(True, 1e-4)
    assert agreeing(model, batch, None) is None  # not before the check
    assert agreeing.check(model, batch) and agreeing.checked
    assert agreeing(model, batch, None) is not None
    assert model.training  # the check ran in eval mode (no dropout) and put training mode back

    class Rescaled(torch.nn.Module):  # a head whose logits the model rescales after it: the shortcut must not run
        def __init__(self, head):
            super().__init__()
            self.head = head

        def forward(self, x):
            return self.head(x) * 1.5

    base = model.get_base_model()
    head = base.lm_head
    base.lm_head = Rescaled(head)
    try:
        refused = SelectedLoss(True, 1e-4)
        assert not refused.check(model, batch) and not refused.enabled
        assert refused(model, batch, None) is None
    finally:
        base.lm_head = head
    assert not SelectedLoss(False, 1e-4).check(model, batch)
    # inputs the decoder does not take as they are: not this path
    assert selected_loss(model, {**batch, "pixel_values": torch.zeros(1)}) is None


def test_prompt_learning_runs_the_plain_forward(tiny_model_dir) -> None:
    from peft import PromptTuningConfig, get_peft_model

    from tasks.common.models import load_model

    assert _adapters_in_layers(_lora(tiny_model_dir))
    prompt = get_peft_model(load_model(str(tiny_model_dir), torch.float32),
                            PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    assert not _adapters_in_layers(prompt)
    assert not _adapters_in_layers(load_model(str(tiny_model_dir), torch.float32))


def test_train_stage_learns_the_same_with_and_without_it(tiny_model_dir, tmp_path, caplog) -> None:
    rows = _chat_rows() * 6
    for i, r in enumerate(rows):
        r = r.copy()
        rows[i] = {**r, "id": f"r{i}"}
    logs = {}
    for on in (True, False):
        cfg = FewtuneConfig(data={"train": "-"}, model={"max_length": 128, "dtype": "float32"},
                            train={"method": "lora", "max_steps": 3, "batch_size": 4, "replay_fraction": 0,
                                   "trained_token_loss": on, "lora_dropout": 0.0, "evals_per_epoch": 1})
        with caplog.at_level(logging.INFO, logger="fewtune.train"):
            caplog.clear()
            result = train_adapter(rows, cfg, str(tiny_model_dir), tmp_path / str(on))
            used = "output head on trained tokens only" in caplog.text
        assert used == on
        history = json.loads((tmp_path / str(on) / "train_log.json").read_text())
        logs[on] = ([(h["step"], h["loss"]) for h in history if "loss" in h], result.best_val_loss)
    assert logs[True][0] and [s for s, _ in logs[True][0]] == [s for s, _ in logs[False][0]]
    assert [x for _, x in logs[True][0]] == pytest.approx([x for _, x in logs[False][0]], rel=1e-4)
    assert logs[True][1] == pytest.approx(logs[False][1], rel=1e-4)
