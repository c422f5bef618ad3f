"""fewtune's greedy decoding (`tasks.common.generation`) gives the answers `model.generate` gives on left-padded
prompts, while running the prompts' shared leading tokens once per call and dropping rows that have ended."""

from __future__ import annotations

import pytest
import torch

from tasks.common.generation import (
    COMPACT_SHARE,
    GenerationSettings,
    _hf_generate,
    generate_answers,
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


def test_the_decoding_cache_holds_what_concatenation_holds() -> None:
    """Keys and values written in place (`decoding_cache`) equal a `DynamicCache` grown by concatenation, through a
    prefix copied to every row, a buffer outgrown, rows dropped and a crop."""
    from transformers import DynamicCache

    from tasks.common.kv_cache import decoding_cache

    torch.manual_seed(0)
    prefix = DynamicCache()
    prefix.update(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), 0)
    grown = DynamicCache()
    grown.update(prefix.layers[0].keys.repeat(3, 1, 1, 1), prefix.layers[0].values.repeat(3, 1, 1, 1), 0)
    ours = decoding_cache(prefix, 3, capacity=5)
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
    empty = decoding_cache(None, 2, capacity=4)  # no prefix: layers made on first use
    k = torch.randn(2, 2, 3, 4)
    assert torch.equal(empty.update(k, k, 1)[0], k) and len(empty.layers) == 2
