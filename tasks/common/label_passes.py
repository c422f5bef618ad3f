"""The forward passes of label scoring (`tasks.common.label_scoring`): three ways to read a batch of prompts' label
log-probabilities off a model, fastest first.

- `packed_batch`: one forward per batch. Each prompt's row holds its own tokens, then every label row of the plan
  (`LabelPlan.carriers`) back to back; a custom attention mask lets each label row see the shared leading tokens,
  its own prompt and its own earlier tokens only, and position ids continue each label row from the end of its
  prompt. The shared leading tokens' keys and values are repeated once per prompt (not once per prompt and label).
  Needs an attention that takes a custom 4-D mask (`sdpa`, `eager`).
- `rows_batch`: the prompts' own tokens in one forward, then the label rows on copies of each prompt's keys and
  values, one copy per prompt and label row (any attention implementation that takes a key/value cache).
- `plain_batch`: the model's own forward on whole prompt+label rows (the reference and the fallback).
All three return (first-token log-probs [B, F], pair log-probs [B, P]) in the plan's layout.
"""

from __future__ import annotations

import copy
import inspect
import math
from typing import Any

from tasks.common.nll import _nll_of

PACKED_ATTENTION = ("sdpa", "eager")  # attention implementations that take a custom 4-D mask as given


def packed_attention(decoder) -> str | None:
    """The decoder's attention implementation when `packed_batch` can use it, else None."""
    impl = getattr(getattr(decoder, "config", None), "_attn_implementation", None)
    return impl if impl in PACKED_ATTENTION else None


def cache_kwarg(decoder) -> str:
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def padded(seqs: list[list[int]], pad_id: int, starts: list[int] | None = None):
    """Right-padded ids, attention mask and position ids (row i's positions count from starts[i])."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    positions = torch.arange(width)[None, :] + torch.tensor(starts or [0] * len(seqs))[:, None]
    return ids, mask, positions


def prefix_cache(decoder, prefix: list[int], device) -> dict[str, Any]:
    import torch

    out = decoder(input_ids=torch.tensor([prefix], dtype=torch.long, device=device), use_cache=True)
    return {"length": len(prefix), "cache": _cache_of(out)}


def _repeated(decoder, state, b: int) -> dict[str, Any]:
    """The shared leading tokens' keys and values, once per prompt of a batch (a copy: the forward extends them)."""
    if not state:
        return {}
    cache = copy.deepcopy(state["cache"])
    cache.batch_repeat_interleave(b)
    return {cache_kwarg(decoder): cache}


def packed_cost(plan, prompt_length: int) -> int:
    """Key/value positions one prompt holds in `packed_batch`: its prompt and every label row."""
    return prompt_length + sum(map(len, plan.carriers))


def packed_batch(decoder, head, rows: list[list[int]], state, plan, pad_id: int, device, chunk: int, attention: str):
    """(first-token log-probs [B, F], pair log-probs [B, P]) of prompt rows sharing `state`'s leading tokens, in one
    forward with every label row packed after its prompt (module docstring)."""
    import torch

    shared, b = (state["length"] if state else 0), len(rows)
    own = [r[shared:] for r in rows]
    width = max(map(len, own))
    offsets, carrier_ids, total = [], [], 0  # where each label row starts after the prompts' width
    for carrier in plan.carriers:
        offsets.append(total)
        carrier_ids += carrier
        total += len(carrier)
    length = width + total
    # Inside the label rows: carrier c's token k sees carrier c's tokens up to k (block-diagonal causal).
    block = torch.zeros((total, total), dtype=torch.bool)
    steps = torch.zeros(total, dtype=torch.long)  # a token's index within its label row
    for start, carrier in zip(offsets, plan.carriers):
        n = len(carrier)
        block[start : start + n, start : start + n] = torch.ones((n, n), dtype=torch.bool).tril()
        steps[start : start + n] = torch.arange(n)
    ids = torch.full((b, length), pad_id, dtype=torch.long)
    positions = torch.zeros((b, length), dtype=torch.long)
    sees = torch.zeros((b, length, shared + length), dtype=torch.bool)
    sees[:, :, :shared] = True
    at = torch.arange(length)
    sees[:, at, shared + at] = True  # padding sees itself: no empty attention row, no NaN to leak
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    for i, r in enumerate(own):
        q = len(r)
        ids[i, :q] = torch.tensor(r, dtype=torch.long)
        positions[i, :q] = torch.arange(shared, shared + q)
        sees[i, :q, shared : shared + q] = causal[:q, :q]
        if total:
            ids[i, width:] = torch.tensor(carrier_ids, dtype=torch.long)
            positions[i, width:] = shared + q + steps
            sees[i, width:, shared : shared + q] = True
            sees[i, width:, shared + width :] = block
    if attention == "sdpa":
        mask = sees[:, None]
    else:  # eager attention adds the mask to its scores
        dtype = next((w.dtype for w in decoder.parameters() if w.dtype.is_floating_point), torch.float32)
        mask = torch.zeros(sees.shape, dtype=dtype).masked_fill_(~sees, torch.finfo(dtype).min)[:, None]
    hidden = decoder(
        input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device), use_cache=True,
        **_repeated(decoder, state, b),
    ).last_hidden_state
    rows_at = torch.arange(b, device=device)
    last = hidden[rows_at, torch.tensor([len(r) - 1 for r in own], device=device)]
    first = torch.log_softmax(head(last).float(), dim=-1)[:, plan.firsts].cpu()
    pair = torch.zeros((b, len(plan.pairs)))
    if plan.pairs:
        where = torch.tensor([width + offsets[c] + j for c, j, _ in plan.pairs], device=device)
        tokens = torch.tensor([t for _, _, t in plan.pairs], device=device)
        nll = _nll_of(head, hidden[:, where].reshape(b * len(plan.pairs), -1), tokens.repeat(b), chunk)
        pair = -nll.view(b, len(plan.pairs)).cpu()
    return first, pair


def rows_batch(decoder, head, rows: list[list[int]], state, plan, pad_id: int, device, chunk: int):
    """(first-token log-probs [B, F], pair log-probs [B, P]) of prompt rows sharing `state`'s leading tokens, the
    label rows fed on one copy of the prompt's keys and values each."""
    import torch

    kw, shared, b = cache_kwarg(decoder), (state["length"] if state else 0), len(rows)
    ids, mask, positions = padded([r[shared:] for r in rows], pad_id, [shared] * b)
    prefix_mask = torch.ones((b, shared), dtype=torch.long)
    out = decoder(
        input_ids=ids.to(device), attention_mask=torch.cat([prefix_mask, mask], 1).to(device),
        position_ids=positions.to(device), use_cache=True, **_repeated(decoder, state, b),
    )
    at = torch.arange(b, device=device)
    last = out.last_hidden_state[at, mask.sum(1).to(device) - 1]
    first = torch.log_softmax(head(last).float(), dim=-1)[:, plan.firsts].cpu()
    pair = torch.zeros((b, len(plan.pairs)))
    prompt_cache, groups = _cache_of(out), plan.carrier_groups()
    for g, (lo, hi) in enumerate(groups):
        # Row r * n + k feeds carrier lo + k after prompt r, on a copy of prompt r's keys/values.
        n = hi - lo
        cache = prompt_cache if g == len(groups) - 1 else copy.deepcopy(prompt_cache)
        cache.batch_repeat_interleave(n)
        lids, lmask, lpos = padded(plan.carriers[lo:hi] * b, pad_id, [len(r) for r in rows for _ in range(n)])
        full_mask = torch.cat([prefix_mask, mask], 1).repeat_interleave(n, 0)
        hidden = decoder(
            input_ids=lids.to(device), attention_mask=torch.cat([full_mask, lmask], 1).to(device),
            position_ids=lpos.to(device), use_cache=True, **{kw: cache},
        ).last_hidden_state
        sel = [p for p, (c, _, _) in enumerate(plan.pairs) if lo <= c < hi]
        pc, pj, pt = (torch.tensor(x, device=device) for x in zip(*(plan.pairs[p] for p in sel)))
        pick = (at[:, None] * n + (pc - lo)[None, :]).reshape(-1)
        nll = _nll_of(head, hidden[pick, pj.repeat(b)], pt.repeat(b), chunk)
        pair[:, sel] = -nll.view(b, len(sel)).cpu()
    return first, pair


def _keeps_logits(model) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def plain_batch(model, rows: list[list[int]], plan, pad_id: int, device, batch_size: int, carriers=None):
    """The same log-probabilities from the model's own forward on whole prompt+carrier rows, `batch_size` rows at a
    time (pairs of carriers not in `carriers` are NaN)."""
    import torch

    chosen = list(range(len(plan.carriers)) if carriers is None else carriers) or [None]
    combos = [(r, c) for r in range(len(rows)) for c in chosen]  # a prompt's first row also gives its first tokens
    first = torch.full((len(rows), len(plan.firsts)), math.nan)
    pair = torch.full((len(rows), len(plan.pairs)), math.nan)
    keep = _keeps_logits(model)
    for start in range(0, len(combos), batch_size):
        part = combos[start : start + batch_size]
        ids, mask, _ = padded([rows[r] + (plan.carriers[c] if c is not None else []) for r, c in part], pad_id)
        extra = {"logits_to_keep": ids.shape[1] - min(len(rows[r]) for r, _ in part) + 1} if keep else {}
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, **extra).logits
        base = ids.shape[1] - logits.shape[1]  # input position i is logits column i - base (< 0: virtual tokens)
        where: dict[tuple[int, int], int] = {}  # (row of part, input position) -> index of its log-softmax
        slots: list[tuple[torch.Tensor, int, int, int, int]] = []  # (target table, prompt, column, position, token)
        for i, (r, c) in enumerate(part):
            n = len(rows[r])
            if c == chosen[0]:
                slots += [(first, r, f, where.setdefault((i, n - 1), len(where)), t) for f, t in enumerate(plan.firsts)]
            for p, (pc, j, t) in enumerate(plan.pairs):
                if pc == c:
                    slots.append((pair, r, p, where.setdefault((i, n + j), len(where)), t))
        at = torch.tensor(list(where), device=device).view(-1, 2)
        logp = torch.log_softmax(logits[at[:, 0], at[:, 1] - base].float(), dim=-1)
        values = logp[[s[3] for s in slots], [s[4] for s in slots]].cpu().tolist()
        for (table, r, k, _, _), v in zip(slots, values):
            table[r, k] = v
    return first, pair
