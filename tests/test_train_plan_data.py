"""Training, part 1: auto choices (method, learning rate, epochs, replay, micro-batch after out-of-memory) and the
data (assistant-only and STM masks reach the loss, rows without a trainable token, length-grouped batches, replay).
Part 2: tests/test_train_runs.py."""

from __future__ import annotations

import pytest
from train_helpers import GiB, demo_rows, history, make_cfg

from tasks.common.models import EncodingError, load_model, load_tokenizer
from tasks.common.records import training_split
from tasks.common.stm import masking_collator
from tasks.config import ConfigError, FewtuneConfig
from tasks.score import finish_scores, score_records
from tasks.train import (
    LengthGroupedSampler,
    TrainingError,
    _encode_all,
    choose_epochs,
    choose_learning_rate,
    choose_method,
    choose_replay_fraction,
    make_collator,
    next_micro_batch,
    replay_rows,
    train_adapter,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only cost time


# ----------------------------------------------------------------------------------------------------------------
# Auto choices


@pytest.mark.parametrize(
    ("rows", "gpu_gib", "params", "method", "why"),
    [
        (250, None, 135e6, "lora", "under 1,000 rows"),
        (5_000, None, 135e6, "lora", "1,000-10,000 rows"),
        (50_000, None, 135e6, "lora", "10,000-100,000 rows"),
        (200_000, None, 135e6, "full", "over 100,000 rows"),
        (200_000, 80, 1e9, "full", "over 100,000 rows"),  # 16 GB for full fine-tuning fits in 80 GiB
        (200_000, 24, 7e9, "qlora", "full fine-tuning needs"),  # neither full (112 GB) nor bf16 LoRA (14 GB) fits
        (500, 24, 7e9, "qlora", "QLoRA"),  # bf16 weights: 14 GB > half of 24 GiB
        (500, 80, 7e9, "lora", "under 1,000 rows"),  # fits in bf16
    ],
)
def test_method_auto_selection_table(rows, gpu_gib, params, method, why):
    chosen, reason = choose_method(rows, int(params), int(gpu_gib * GiB) if gpu_gib else None, make_cfg())
    assert chosen == method
    assert why in reason


def test_auto_hyperparameters_follow_the_data_size():
    cfg = make_cfg()
    assert choose_epochs(250, cfg)[0] == 12  # 3,000 examples / 250 rows
    assert choose_epochs(60, cfg)[0] == 25  # capped at epochs_max
    assert choose_epochs(5_000, cfg)[0] == 2  # at least epochs_min
    assert choose_epochs(250, make_cfg(epochs=3))[0] == 3
    assert choose_learning_rate("lora", False, cfg)[0] == 2e-4
    assert choose_learning_rate("full", False, cfg)[0] == 2e-5
    lr, why = choose_learning_rate("full", True, cfg)
    assert lr == pytest.approx(2e-6) and "incremental" in why  # inside the 1e-6..5e-6 range for updates
    assert choose_learning_rate("lora", True, make_cfg(learning_rate=1e-3))[0] == 1e-3
    assert choose_replay_fraction(250, cfg)[0] == 0.1
    assert choose_replay_fraction(50_000, cfg)[0] == 0.0
    assert choose_replay_fraction(250, make_cfg(replay_fraction=0))[0] == 0.0


def test_out_of_memory_schedule_keeps_the_effective_batch():
    steps = [(8, 1)]
    while steps[-1][0] > 1:
        steps.append(next_micro_batch(*steps[-1]))
    assert steps == [(8, 1), (4, 2), (2, 4), (1, 8)]
    with pytest.raises(TrainingError, match="micro-batch 1"):
        next_micro_batch(1, 8)


def test_qlora_without_cuda_is_a_clear_error(tiny_model_dir, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available: QLoRA runs (see test_qlora_trains_on_cuda)")
    with pytest.raises(ConfigError, match="qlora needs a CUDA GPU.*use train.method lora"):
        train_adapter(demo_rows(20), make_cfg(method="qlora"), str(tiny_model_dir), tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# Data: masks, empty rows, batching, replay


def test_assistant_only_masks_reach_the_loss(tiny_model_dir):
    import torch

    tok = load_tokenizer(str(tiny_model_dir))
    rows = demo_rows(4)
    encoded = _encode_all(tok, rows, 96)
    for row, enc in zip(rows, encoded):
        labelled = tok.decode([t for t in enc["labels"] if t != -100])
        assert labelled == row["messages"][-1]["content"] + "<|im_end|>\n"  # the answer and nothing else
    batch = make_collator(tok)([{k: e[k] for k in ("input_ids", "attention_mask", "labels")} for e in encoded])
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()  # padding carries no loss
    model = load_model(str(tiny_model_dir))
    with torch.no_grad():
        out = model(**batch)
    # The loss the Trainer minimises is the cross-entropy over the answer tokens only.
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    keep = labels != -100
    manual = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
    assert out.loss.item() == pytest.approx(manual.item(), rel=1e-5)
    everything = torch.nn.functional.cross_entropy(logits[batch["attention_mask"][:, 1:] == 1], batch["input_ids"][:, 1:][batch["attention_mask"][:, 1:] == 1])
    assert abs(everything.item() - manual.item()) > 1e-3  # the mask changes the loss


def test_assistant_and_stm_masks_reach_the_trainers_loss(tiny_model_dir, tmp_path):
    """End to end through `train_adapter`: the loss the Trainer logs at step 1 (a fresh LoRA adapter leaves the
    model unchanged) equals the cross-entropy of the base model over the first batch's answer tokens, less the
    tokens Selective Token Masking removed."""
    import torch

    rows = demo_rows(24)
    cfg = FewtuneConfig(
        data={"train": "-"},
        model={"max_length": 64},
        score={"token_masking": {"enabled": True, "threshold": 20.0, "max_masked_fraction": 0.5}},
        train={"method": "lora", "max_steps": 1, "batch_size": 4, "evals_per_epoch": 20, "replay_fraction": 0},
    )
    tok = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir))
    scored = score_records(rows, model, tok, max_length=64, batch_size=8, outlier_z=3.5, out_path=tmp_path / "s" / "scores.parquet")
    masks_path = finish_scores(scored, rows, cfg.score, tmp_path / "s")["token_masks_path"]

    masked = train_adapter(rows, cfg, str(tiny_model_dir), tmp_path / "masked", token_masks=masks_path)
    plain = train_adapter(rows, cfg, str(tiny_model_dir), tmp_path / "plain")

    train_rows, _ = training_split(rows, cfg.train.validation_fraction, cfg.train.seed)
    encoded = _encode_all(tok, train_rows, 64)
    first = LengthGroupedSampler([e["length"] for e in encoded], 4, cfg.train.length_group_batches, cfg.train.seed).indices()[:4]
    features = [{k: encoded[i][k] for k in ("input_ids", "attention_mask", "labels")} for i in first]

    def expected(collate) -> float:
        batch = collate([dict(f) for f in features])
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        keep = labels != -100
        return torch.nn.functional.cross_entropy(logits[:, :-1][keep], labels[keep]).item()

    with_stm = expected(masking_collator(make_collator(tok), masks_path))
    without = expected(make_collator(tok))
    assert abs(with_stm - without) > 1e-3  # STM removed tokens from this batch
    logged = {name: next(h["loss"] for h in history(r) if "loss" in h) for name, r in (("masked", masked), ("plain", plain))}
    assert logged["masked"] == pytest.approx(with_stm, rel=1e-4)
    assert logged["plain"] == pytest.approx(without, rel=1e-4)


def test_row_without_trainable_token_is_a_clear_error(tiny_model_dir, tmp_path):
    rows = demo_rows(20)
    long_prompt = "Please read this carefully. " * 40
    rows[7] = {**rows[7], "id": "too-long-7", "messages": [{"role": "user", "content": long_prompt}, rows[7]["messages"][-1]]}
    with pytest.raises(EncodingError) as info:
        train_adapter(rows, make_cfg(replay_fraction=0), str(tiny_model_dir), tmp_path)
    assert "too-long-7" in str(info.value) and "model.max_length" in str(info.value)


def test_length_grouped_sampler_is_a_seeded_permutation_with_little_padding():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(10, 200) for _ in range(400)]
    s = LengthGroupedSampler(lengths, batch_size=8, group_batches=50, seed=3)
    s.set_epoch(1)
    first = s.indices()
    assert sorted(first) == list(range(400))
    assert LengthGroupedSampler(lengths, 8, 50, seed=3).indices() != first  # epoch 0 differs from epoch 1
    again = LengthGroupedSampler(lengths, 8, 50, seed=3)
    again.set_epoch(1)
    assert again.indices() == first  # depends only on (seed, epoch): a resumed run sees the same batches

    def padded(order):
        return sum(max(lengths[i] for i in order[k : k + 8]) * len(order[k : k + 8]) for k in range(0, len(order), 8))

    shuffled = list(range(400))
    random.Random(1).shuffle(shuffled)
    assert padded(first) < 0.75 * padded(shuffled)
    assert padded(first) < 1.15 * sum(lengths)


def test_replay_rows_are_a_seeded_choice_of_the_pool_in_any_order():
    pool = demo_rows(60)
    mixed = replay_rows(pool, 0.1, 90, seed=42)
    assert len(mixed) == 10  # 10 of 100 rows in the mix
    assert all(r["id"].startswith("replay-") for r in mixed)
    assert [r["id"] for r in replay_rows(list(reversed(pool)), 0.1, 90, seed=42)] == [r["id"] for r in mixed]
    assert [r["id"] for r in replay_rows(pool, 0.1, 90, seed=7)] != [r["id"] for r in mixed]
    assert len(replay_rows(pool[:5], 0.1, 90, seed=42)) == 5  # a small pool caps the share
    assert replay_rows(pool, 0.0, 90, seed=42) == []


def test_replay_answers_cut_by_the_token_budget_end_at_their_last_whole_sentence() -> None:
    from tasks.train.data import whole_sentences

    assert whole_sentences("The game is a classic. It is set in a medieval town, with a") == "The game is a classic."
    assert whole_sentences("1. Baking soda cleans ovens. 2. It softens") == "1. Baking soda cleans ovens."  # not "2."
    assert whole_sentences('He said "go." Then he left and') == 'He said "go."'
    assert whole_sentences("Yes, it works!  ") == "Yes, it works!"
    assert whole_sentences("no sentence ends here") == "no sentence ends here"  # nothing better to keep
