"""Learning without forgetting on replay rows (`train.replay_loss: kl`): the replay rows' loss is KL(base || tuned)
toward the frozen base model's full next-token distributions, added to the domain rows' cross-entropy under the same
token count; zero for an adapter that changes nothing, equal to a hand computation otherwise, and the train stage
runs with it."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from test_shared_prefix_training import _lora
from test_trained_token_loss import _batch, _chat_rows

from tasks.common.models import load_tokenizer
from tasks.config import FewtuneConfig
from tasks.train import train_adapter
from tasks.train.data import make_collator
from tasks.train.loss import ReplayMarkingCollator, replay_kl_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def _by_hand(model, batch) -> float:
    keep = batch["labels"][:, 1:] != -100
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        tuned = F.log_softmax(model(**kwargs).logits[:, :-1][keep].float(), -1)
        with model.disable_adapter():
            base = F.log_softmax(model(**kwargs).logits[:, :-1][keep].float(), -1)
    return float((base.exp() * (base - tuned)).sum())


def test_replay_kl_is_zero_without_change_and_matches_a_hand_computation(tiny_model_dir) -> None:
    tok = load_tokenizer(str(tiny_model_dir))
    model = _lora(tiny_model_dir)
    batch = _batch(tok, _chat_rows())
    tokens = int((batch["labels"][:, 1:] != -100).sum())
    got = replay_kl_loss(model, batch, tokens)
    assert float(got) == pytest.approx(_by_hand(model, batch) / tokens, rel=1e-4) and float(got) > 1e-4
    got.backward()  # the gradient reaches the adapter only (the base model's side has none)
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.zero_()  # B = 0: the adapter changes nothing
    assert abs(float(replay_kl_loss(model, batch, tokens))) < 1e-6


def test_the_trainer_adds_the_replay_rows_kl_to_the_domain_rows_loss(tiny_model_dir, tmp_path) -> None:
    from datasets import Dataset
    from transformers import TrainingArguments

    from tasks.common.models import encode_chat
    from tasks.train.trainer import trainer_class

    tok = load_tokenizer(str(tiny_model_dir))
    model = _lora(tiny_model_dir)
    rows = [encode_chat(tok, r, 256) for r in _chat_rows()]
    collate = ReplayMarkingCollator(make_collator(tok), [rows[1]["input_ids"], rows[3]["input_ids"]])
    batch = collate([dict(r) for r in rows])
    assert batch["replay"].tolist() == [False, True, False, True]
    trainer = trainer_class()(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to=[]),
                              train_dataset=Dataset.from_list([{**r, "length": len(r["input_ids"])} for r in rows]),
                              data_collator=collate, group_batches=1)
    n = int((batch["labels"][:, 1:] != -100).sum())
    model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(n))
        domain, replay = (_batch(tok, [_chat_rows()[i] for i in idx]) for idx in ([0, 2], [1, 3]))
        ce = model(**domain).logits[:, :-1].float()
        ce = F.cross_entropy(ce.reshape(-1, ce.size(-1)), domain["labels"][:, 1:].reshape(-1), reduction="sum")
    assert float(loss) == pytest.approx((float(ce) + _by_hand(model, replay)) / n, rel=1e-4)


def test_train_stage_trains_replay_rows_toward_the_base_model(tiny_model_dir, tmp_path, monkeypatch) -> None:
    import tasks.train.trainer as trainer

    calls, kl = [], trainer.replay_kl_loss
    monkeypatch.setattr(trainer, "replay_kl_loss", lambda m, inputs, n: calls.append(len(inputs["labels"])) or kl(m, inputs, n))
    rows = [{**r, "id": f"r{i}-{r['id']}"} for i, r in enumerate(_chat_rows() * 5)]
    replay = [{"id": f"g{i}", "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
              for i, (q, a) in enumerate([("What is the boiling point of water?", "100 degrees Celsius at sea level."),
                                          ("Name a primary colour.", "Red is a primary colour."),
                                          ("How many days are in a week?", "There are seven days in a week.")])]
    cfg = FewtuneConfig(data={"train": "-"}, model={"max_length": 128, "dtype": "float32"},
                        train={"method": "lora", "max_steps": 6, "batch_size": 4, "replay_fraction": 0.2,
                               "replay_loss": "kl", "lora_dropout": 0.0, "evals_per_epoch": 1})
    result = train_adapter(rows, cfg, str(tiny_model_dir), tmp_path / "kl", replay=replay)
    assert result.replay_rows == 3
    assert sum(calls) == 3  # one epoch (6 steps of 4 of the 21 rows): each replay row once, through the KL
    history = json.loads((tmp_path / "kl" / "train_log.json").read_text())
    losses = [h["loss"] for h in history if "loss" in h]
    assert losses and all(x == x and x < 50 for x in losses)  # finite: the KL term and the cross-entropy together
