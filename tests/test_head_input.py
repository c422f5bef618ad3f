"""The output head gets a contiguous input: with frozen weights and `logits_to_keep=1` (generation's first step,
label scoring), a strided last-position view made torch's matmul copy the head's weight once per row (1.8 GB per
call on 32 rows of SmolLM2). The logits are unchanged and no batched product with an expanded weight is run."""

from __future__ import annotations

import torch

from tasks.common.models import contiguous_head_input, load_model


def _ops(model, ids) -> tuple[set[str], torch.Tensor]:
    with torch.inference_mode(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        logits = model(input_ids=ids, logits_to_keep=1).logits
    return {e.key for e in prof.key_averages()}, logits


def test_the_head_never_runs_a_batched_product_on_an_expanded_weight(tiny_model_dir) -> None:
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 100, (6, 12))
    raw = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval().requires_grad_(False)
    raw_ops, raw_logits = _ops(raw, ids)
    assert "aten::bmm" in raw_ops  # the behaviour worked around: the weight expanded per row

    model = load_model(str(tiny_model_dir), torch.float32).eval().requires_grad_(False)
    ops, logits = _ops(model, ids)
    assert "aten::bmm" not in ops
    torch.testing.assert_close(logits, raw_logits)
    contiguous_head_input(model)  # idempotent: one hook
    assert len(model.get_output_embeddings()._forward_pre_hooks) == 1
