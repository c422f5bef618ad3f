"""Passes over the base and the tuned model in one go, for the KL forgetting signals (kl_task, kl_general): the
adapter switched off and on in the same model, the decoder layers below the adapter run once for both, the rows'
shared leading tokens (a system prompt) once per call, the output head on the scored positions only. `kl_items`
gives per row the summed KL(base || tuned) of the next-token distributions along its answer tokens.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from tqdm.auto import tqdm

from tasks.common.generation import shared_length
from tasks.common.label_passes import cache_kwarg
from tasks.common.models import encode_chat
from tasks.common.nll import fast_parts
from tasks.config import FewtuneConfig

log = logging.getLogger("fewtune.evaluate")


def first_adapted_layer(peft_model) -> int:
    """Index of the lowest decoder layer an adapter changes; every layer below computes the same for the base and
    the tuned model. 0 when unknown (no `layers` list, or adapter modules outside it)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    path = fast_parts(peft_model)
    layers = getattr(path[0], "layers", None) if path else None
    if layers is None:
        return 0
    tuners = sum(isinstance(m, BaseTunerLayer) for m in peft_model.modules())
    inside = [sum(isinstance(m, BaseTunerLayer) for m in layer.modules()) for layer in layers]
    if not tuners or sum(inside) != tuners:
        return 0
    return next(i for i, n in enumerate(inside) if n)


def kl_prefix(peft_model, encoded: list[dict], device) -> dict[str, Any] | None:
    """Keys and values of the leading tokens every row's prompt shares (a system prompt), for the base model and the
    tuned model, so the KL passes run them once per call; None when the rows share too little."""
    import torch
    from transformers import DynamicCache

    parts = fast_parts(peft_model)
    prompts = [e["input_ids"][: next((j for j, t in enumerate(e["labels"]) if t != -100), 0)] for e in encoded]
    n = shared_length(prompts) if parts is not None and all(prompts) else 0
    if not n:
        return None
    decoder, ids = parts[0], torch.tensor([prompts[0][:n]], dtype=torch.long, device=device)
    tuned = {cache_kwarg(decoder): DynamicCache()}
    decoder(input_ids=ids, use_cache=True, **tuned)
    base = {cache_kwarg(decoder): DynamicCache()}
    with peft_model.disable_adapter():
        decoder(input_ids=ids, use_cache=True, **base)
    return {"length": n, "base": next(iter(base.values())), "tuned": next(iter(tuned.values()))}


def _with_prefix(decoder, prefix: dict[str, Any] | None, which: str, rows: int, mask) -> dict[str, Any]:
    """The decoder's keyword arguments for rows that continue `prefix`: a per-row copy of its cache, the full mask."""
    import torch

    if prefix is None:
        return {"attention_mask": mask, "use_cache": False}
    cache = copy.deepcopy(prefix[which])
    cache.batch_repeat_interleave(rows)
    ones = torch.ones((rows, prefix["length"]), dtype=mask.dtype, device=mask.device)
    return {"attention_mask": torch.cat([ones, mask], dim=1), "use_cache": True, cache_kwarg(decoder): cache}


def paired_answer_logits(peft_model, ids, mask, where, shared_layers: int, prefix: dict[str, Any] | None = None):
    """(base, tuned) logits at the positions `where` marks (row-major order). The layers below `shared_layers`,
    identical for both models, run once: the base pass records the input of layer `shared_layers` and the tuned pass
    runs only the layers from there on. The output head runs on the marked positions only. With `prefix` (from
    `kl_prefix`), `ids` continue its tokens."""
    path = fast_parts(peft_model)
    if path is None:
        tuned = peft_model(input_ids=ids, attention_mask=mask).logits[where]
        with peft_model.disable_adapter():
            return peft_model(input_ids=ids, attention_mask=mask).logits[where], tuned
    decoder, head = path
    rows = ids.shape[0]
    if not shared_layers:
        tuned = decoder(input_ids=ids, **_with_prefix(decoder, prefix, "tuned", rows, mask)).last_hidden_state
        with peft_model.disable_adapter():
            base = decoder(input_ids=ids, **_with_prefix(decoder, prefix, "base", rows, mask)).last_hidden_state
        return head(base[where]), head(tuned[where])
    layers, seen = decoder.layers, {}
    hook = layers[shared_layers].register_forward_pre_hook(
        lambda _m, args, kwargs: seen.update(args=args, kwargs=dict(kwargs)), with_kwargs=True)
    base_kwargs = _with_prefix(decoder, prefix, "base", rows, mask)
    try:
        with peft_model.disable_adapter():
            base = decoder(input_ids=ids, **base_kwargs).last_hidden_state
    finally:
        hook.remove()
    args, kwargs = list(seen["args"]), seen["kwargs"]
    if prefix is not None:  # the tuned model's keys and values of the prefix for the layers it runs
        base_cache = base_kwargs[cache_kwarg(decoder)]
        tuned_cache = _with_prefix(decoder, prefix, "tuned", rows, mask)[cache_kwarg(decoder)]
        kwargs = {k: tuned_cache if v is base_cache else v for k, v in kwargs.items()}
    hidden = args.pop(0) if args else kwargs.pop("hidden_states")
    for layer in layers[shared_layers : decoder.config.num_hidden_layers]:
        out = layer(hidden, *args, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
    return head(base[where]), head(decoder.norm(hidden)[where])


def _checked_shortcut(peft_model, one, prefix) -> int:
    """The first adapted layer when running the layers below it once agrees with two whole passes on one row, else 0."""
    shared = first_adapted_layer(peft_model)
    if not shared:
        return 0
    whole = paired_answer_logits(peft_model, *one, 0, prefix)
    try:
        fast = paired_answer_logits(peft_model, *one, shared, prefix)
        gap = max(float((a.float() - b.float()).abs().max()) for a, b in zip(whole, fast))
    except (TypeError, KeyError, IndexError, AttributeError, ValueError) as exc:
        gap = float("inf")  # a layer that cannot be called on its own: whole passes
        log.info("KL: layer shortcut unavailable (%s)", exc)
    if gap > 1e-2 * (1 + float(whole[1].float().abs().max())):
        log.warning("KL: layers below the adapter recomputed for the tuned pass (the shortcut differs by %.2g on this "
                    "model)", gap)
        return 0
    return shared


def kl_items(peft_model, tokenizer, rows: list[dict], cfg: FewtuneConfig, desc: str,
             share_prefix: bool = True) -> list[tuple[float, int]]:
    """Per row: (summed KL(base || tuned) over its answer tokens, answer tokens), from a PEFT model whose adapter is
    switched off for the base distribution. The distribution that predicts answer token j is the one at j - 1.
    `share_prefix`: the rows' shared leading tokens (a system prompt) run once per call (`kl_prefix`)."""
    import torch
    import torch.nn.functional as F

    encoded = [encode_chat(tokenizer, r, cfg.model.max_length) for r in rows]
    device = next(peft_model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["input_ids"]), reverse=True)
    out: list[tuple[float, int]] = [(0.0, 0)] * len(encoded)
    bs = max(1, min(cfg.score.batch_size, 8))  # two full-vocabulary logit tensors per answer token
    shared: int | None = None  # decoder layers below the adapter: run once for both models (checked on row 1)
    peft_model.eval()
    with torch.inference_mode(), tqdm(total=len(order), desc=desc, unit="row", leave=False) as bar:
        prefix = kl_prefix(peft_model, encoded, device) if share_prefix else None
        skip = prefix["length"] if prefix else 0  # the shared leading tokens, run once per call
        for begin in range(0, len(order), bs):
            idx = order[begin : begin + bs]
            width = max(len(encoded[i]["input_ids"]) - skip for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                n = len(encoded[i]["input_ids"]) - skip
                ids[row, :n] = torch.tensor(encoded[i]["input_ids"][skip:])
                mask[row, :n] = 1
            ids, mask = ids.to(device), mask.to(device)
            # the distributions that predict answer tokens only: position j - 1 for every answer token j
            rows_at = [[j - 1 - skip for j, t in enumerate(encoded[i]["labels"]) if t != -100 and j > 0] for i in idx]
            where = torch.zeros(ids.shape, dtype=torch.bool, device=device)
            for row, pos in enumerate(rows_at):
                where[row, pos] = True
            if shared is None:  # the first row checks the shortcut against two whole passes
                shared = _checked_shortcut(peft_model, (ids[:1], mask[:1], where[:1]), prefix)
            base, tuned = paired_answer_logits(peft_model, ids, mask, where, shared, prefix)
            log_b, log_t = F.log_softmax(base.float(), dim=-1), F.log_softmax(tuned.float(), dim=-1)
            kl_all = (log_b.exp() * (log_b - log_t)).sum(dim=-1).clamp_min(0)
            start = 0
            for i, pos in zip(idx, rows_at):  # `where` is row-major: each row's positions in order
                if pos:
                    out[i] = (float(kl_all[start : start + len(pos)].sum()), len(pos))
                start += len(pos)
            bar.update(len(idx))
    return [item for item in out if item[1]]
