"""fewtune's greedy decoding (`tasks.common.generation`) gives the answers `model.generate` gives on left-padded
prompts, while running the prompts' shared leading tokens once per call and dropping rows that have ended."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tasks.common.generation import (
    COMPACT_SHARE,
    GenerationSettings,
    _hf_generate,
    generate_answers,
    generate_pooled,
    greedy_tokens,
    prefix_state,
    shared_length,
)
from tasks.common.models import encode_prompt, load_base

from tiny_model import build_chatty_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only cost time

SYSTEM = {"role": "system", "content": "You answer questions about bicycles, briefly and politely, in English."}
QUESTIONS = ["When do you open?", "Can I bring my bike in on a Sunday morning for a quick check?", "Price?",
             "Do you sell helmets for children, and in which sizes?", "Where is the shop?", "Phone number?",
             "How long does a full service take on a road bike with disc brakes?"]


def _prompts(system: bool = True) -> list[list[dict[str, str]]]:
    return [([SYSTEM] if system else []) + [{"role": "user", "content": q}] for q in QUESTIONS]


@pytest.fixture(scope="module")
def chatty(tiny_model_dir, tmp_path_factory):
    """The tiny model after a few seconds on the demo's chat rows: it answers, and its answers end at different
    lengths."""
    return build_chatty_model(tiny_model_dir, tmp_path_factory.mktemp("chatty"))


def _model(path):
    model, tokenizer = load_base(str(path), "float32")
    return model.eval(), tokenizer


def test_shared_length_leaves_every_row_a_token_of_its_own() -> None:
    assert shared_length([[1] * 10 + [2], [1] * 10 + [3, 4]]) == 10
    assert shared_length([[1] * 10, [1] * 12]) == 9  # the shorter row keeps its last token
    assert shared_length([[1] * 5 + [2], [1] * 5 + [3]]) == 0  # below the minimum: not worth a forward
    assert shared_length([[1] * 20]) == 0


@pytest.mark.parametrize("system", [True, False])
def test_answers_equal_model_generate(chatty, system: bool) -> None:
    model, tokenizer = _model(chatty)
    prompts = _prompts(system)
    encoded = [encode_prompt(tokenizer, p, 128) for p in prompts]
    assert (prefix_state(model, encoded, "cpu") is not None) == system  # the system prompt runs once
    settings = GenerationSettings(max_new_tokens=24, max_length=128, batch_size=3)
    ours = generate_answers(model, tokenizer, prompts, settings, "answers")
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)
    theirs = [""] * len(prompts)
    for start in range(0, len(order), 3):
        idx = order[start : start + 3]
        for i, tokens in zip(idx, _hf_generate(model, tokenizer, [encoded[i] for i in idx], 24, "cpu")):
            theirs[i] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
    assert ours == theirs
    assert all(ours)


def _rows_per_step(lengths: list[int], share: int) -> list[int]:
    """The rows of each forward after the first token: ended rows leave once they are 1/share of the batch."""
    alive, seen = list(range(len(lengths))), []
    for step in range(1, max(lengths)):
        if sum(lengths[r] <= step for r in alive) * share >= len(alive):
            alive = [r for r in alive if lengths[r] > step]
        seen.append(len(alive))
    return seen


@pytest.mark.parametrize("share", [COMPACT_SHARE, 2])
def test_a_row_that_ended_leaves_the_batch(chatty, share: int, monkeypatch) -> None:
    import tasks.common.generation as generation

    monkeypatch.setattr(generation, "COMPACT_SHARE", share)
    model, tokenizer = _model(chatty)
    encoded = [encode_prompt(tokenizer, p, 128) for p in _prompts()]
    end = {tokenizer.eos_token_id}
    with torch.inference_mode():
        free = greedy_tokens(model, encoded, None, 48, set(), tokenizer.pad_token_id, "cpu")  # never stops early
    rows_seen: list[int] = []
    hook = model.register_forward_pre_hook(lambda _m, args, kwargs: rows_seen.append(kwargs["input_ids"].shape[0]),
                                           with_kwargs=True)
    try:
        with torch.inference_mode():
            ours = greedy_tokens(model, encoded, prefix_state(model, encoded, "cpu"), 48, end,
                                 tokenizer.pad_token_id, "cpu")
    finally:
        hook.remove()
    lengths = []
    for row, said in zip(free, ours):  # each row is its free answer cut after its first end token
        cut = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
        assert said == row[:cut]
        lengths.append(cut)
    assert len(set(lengths)) > 1 and min(lengths) < 48  # the rows end at different steps
    assert rows_seen[1] == len(encoded)  # after the shared prefix: all prompts at once
    # one forward per further token; ended rows leave once they are 1/share of the batch
    assert rows_seen[2:] == _rows_per_step(lengths, share)
    at_once = [sum(n > step for n in lengths) for step in range(1, max(lengths))]
    assert (rows_seen[2:] == at_once) == (share == COMPACT_SHARE)  # 7 rows: at once; share 2: the first stay


def _decoding_steps(model) -> tuple[list[int], object]:
    """Rows of each one-token forward of `model` (a decoding step), and the hook to remove."""
    seen: list[int] = []
    hook = model.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(kwargs["input_ids"].shape[0]) if kwargs["input_ids"].shape[1] == 1 else None,
        with_kwargs=True)
    return seen, hook


def test_pooled_sets_answer_as_separate_calls(chatty) -> None:
    """Sets of prompts with different system prompts and token budgets, decoded as one batch, get the answers each
    set gets alone (float32), each within its own budget, in one decoding loop."""
    model, tokenizer = _model(chatty)
    with_system, plain = _prompts(True), _prompts(False)[:5]
    long, short = GenerationSettings(24, 128, 64), GenerationSettings(6, 128, 64)
    alone = [generate_answers(model, tokenizer, with_system, replace(long, batch_size=3), "alone"),
             generate_answers(model, tokenizer, plain, replace(short, batch_size=2), "alone")]
    steps, hook = _decoding_steps(model)
    try:
        pooled = generate_pooled(model, tokenizer, [(with_system, long), (plain, short)], "pooled")
    finally:
        hook.remove()
    assert pooled == alone and all(pooled[0]) and all(pooled[1])
    assert steps[0] == len(with_system) + len(plain) and len(steps) <= 23  # one batch, one step per token
    assert max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in pooled[1]) <= 7
    assert generate_pooled(model, tokenizer, [([], long)], "none") == [[]]


def test_prompts_run_in_groups_as_in_one(chatty, monkeypatch) -> None:
    """The prompts run into the decoding cache in groups of alike length (`PREFILL_TOKENS`), each group's prefix
    and own tokens moved to where the batch has them: the same tokens as one forward over every prompt (float32)."""
    import tasks.common.generation as generation

    model, tokenizer = _model(chatty)
    encoded = [encode_prompt(tokenizer, p, 128) for p in _prompts(True)] + \
        [encode_prompt(tokenizer, p, 128) for p in _prompts(False)]
    half = len(encoded) // 2
    prefixes = [prefix_state(model, encoded[:half], "cpu")] * half + [None] * (len(encoded) - half)
    assert prefixes[0] is not None
    budgets = [20, 5] * half + [12] * (len(encoded) - 2 * half)
    forwards: list[int] = []
    hook = model.register_forward_pre_hook(lambda _m, args, kwargs: forwards.append(kwargs["input_ids"].shape[0]),
                                           with_kwargs=True)
    try:
        with torch.inference_mode():
            whole = greedy_tokens(model, encoded, prefixes, budgets, set(), tokenizer.pad_token_id, "cpu")
            assert forwards[0] == len(encoded)  # one group: every prompt in one forward
            monkeypatch.setattr(generation, "PREFILL_TOKENS", 40)
            forwards.clear()
            grouped = greedy_tokens(model, encoded, prefixes, budgets, set(), tokenizer.pad_token_id, "cpu")
    finally:
        hook.remove()
    assert forwards[0] < len(encoded) and forwards.index(len(encoded)) > 1  # several groups, then the batch
    assert grouped == whole
    assert [len(t) for t in whole] == budgets  # no end token: each row's own budget


def test_rows_cache_ends_every_prefix_at_one_position() -> None:
    """Rows with prefixes of different lengths (or none) have them end at the longest's length, zeros before."""
    from transformers import DynamicCache

    from tasks.common.kv_cache import rows_cache

    torch.manual_seed(0)
    a, b = DynamicCache(), DynamicCache()
    a.update(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), 0)
    b.update(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4), 0)
    cache = rows_cache([a, b, None, a], capacity=8)
    keys = cache.layers[0].keys
    assert keys.shape == (4, 2, 3, 4) and cache.get_seq_length() == 3
    assert torch.equal(keys[0], a.layers[0].keys[0]) and torch.equal(keys[3], a.layers[0].keys[0])
    assert torch.equal(keys[1, :, 2:], b.layers[0].keys[0]) and not keys[1, :, :2].any() and not keys[2].any()
    assert torch.equal(cache.layers[0].values[1, :, 2:], b.layers[0].values[0])


def test_the_decoding_cache_holds_what_concatenation_holds() -> None:
    """Keys and values written in place (`rows_cache`) equal a `DynamicCache` grown by concatenation, through a
    prefix copied to every row, a buffer outgrown, rows dropped and a crop."""
    from transformers import DynamicCache

    from tasks.common.kv_cache import rows_cache

    torch.manual_seed(0)
    prefix = DynamicCache()
    prefix.update(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), 0)
    grown = DynamicCache()
    grown.update(prefix.layers[0].keys.repeat(3, 1, 1, 1), prefix.layers[0].values.repeat(3, 1, 1, 1), 0)
    ours = rows_cache([prefix] * 3, capacity=5)
    assert ours.get_seq_length() == 3
    for step in range(4):  # past the room for 5 positions: the buffer doubles
        k, v = torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4)
        expected, got = grown.update(k, v, 0), ours.update(k, v, 0)
        assert all(torch.equal(a, b) for a, b in zip(expected, got))
    assert ours.layers[0].key_buffer.shape[2] == 10 and ours.get_seq_length() == 7
    keep = torch.tensor([0, 2])
    grown.batch_select_indices(keep)
    ours.batch_select_indices(keep)
    k, v = torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4)
    assert all(torch.equal(a, b) for a, b in zip(grown.update(k, v, 0), ours.update(k, v, 0)))
    grown.crop(-2)
    ours.crop(-2)
    assert torch.equal(grown.layers[0].keys, ours.layers[0].keys) and ours.get_seq_length() == 6
    beams = torch.tensor([1, 1])  # a beam search's reorder keeps the buffers and the views together
    grown.reorder_cache(beams)
    ours.reorder_cache(beams)
    k, v = torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4)
    assert all(torch.equal(a, b) for a, b in zip(grown.update(k, v, 0), ours.update(k, v, 0)))
    assert torch.equal(ours.update(k, v, 1)[0], k)  # a layer past the prefix's: made on first use
    empty = rows_cache([None, None], capacity=4)  # no prefix: layers made on first use
    k = torch.randn(2, 2, 3, 4)
    assert torch.equal(empty.update(k, k, 1)[0], k) and len(empty.layers) == 2
