"""Negative log-likelihood kernels: every token's NLL under a causal LM, fast and exactly.

Rows are grouped by a shared leading part (typically the system prompt), whose keys and values are computed once per
group and reused by every row of the group; inside a group rows are sorted by length and cut into batches by row and
token budgets, right-padded (left padding without position ids skews perplexity); the last token of each row is not
fed (nothing follows it); and log-probabilities are computed from the final hidden states in chunks of positions (in
vocabulary blocks on a CPU), so the full-vocabulary logits of a batch never sit in memory at once. A self-check against
the plain full-model forward guards the fast path. Used by scoring, augmentation (rewrite perplexity) and evaluation.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

log = logging.getLogger("fewtune.nll")

# The full-model path must agree with the fast path within this tolerance (relative, NLL in nats) before the fast path
# is used; half precision rounds each matrix product differently for different shapes, hence its wider bound (models
# whose logits are rescaled or soft-capped after the head differ by whole nats).
_SELF_CHECK_TOLERANCE = 1e-3
_SELF_CHECK_TOLERANCE_HALF = 5e-2


# ----------------------------------------------------------------------------------------------------------------
# Batch planning (pure Python)


@dataclass
class PrefixGroup:
    """Rows that share their first `len(prefix)` tokens, in batches of row indices (longest rows first)."""

    prefix: list[int]
    batches: list[list[int]] = field(default_factory=list)


def _common_prefix_len(a: list[int], b: list[int], limit: int) -> int:
    n = min(limit, len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def plan_batches(
    sequences: list[list[int]],
    *,
    batch_size: int,
    batch_tokens: int | None = None,
    share_prefix: bool = True,
    min_shared_prefix: int = 8,
) -> list[PrefixGroup]:
    """Group rows by a shared leading part and cut each group into length-sorted batches.

    Rows are sorted by their tokens, so rows that start alike sit together; a group grows while every member shares
    at least `min_shared_prefix` leading tokens with the first. The shared part stops at least two tokens before the
    end of the group's shortest row, so every row keeps one token to feed and one to score after it. Inside a group,
    rows are sorted longest first and batched by `batch_size` rows and `batch_tokens` (rows × longest row, after the
    shared part) per forward pass.
    """
    usable = [i for i, s in enumerate(sequences) if len(s) >= 2]
    groups: list[tuple[list[int], int]] = []  # (members, shared length)
    if share_prefix:
        ordered = sorted(usable, key=lambda i: sequences[i])
        for i in ordered:
            if groups:
                members, shared = groups[-1]
                cut = _common_prefix_len(sequences[members[0]], sequences[i], min(shared, len(sequences[i]) - 2))
                if cut >= min_shared_prefix:
                    members.append(i)
                    groups[-1] = (members, cut)
                    continue
            groups.append(([i], len(sequences[i]) - 2))
        # A prefix used by one row saves nothing: such rows are scored together without one.
        singles = [m[0] for m, _ in groups if len(m) == 1]
        groups = [(m, s) for m, s in groups if len(m) > 1]
        if singles:
            groups.append((singles, 0))
    elif usable:
        groups.append((usable, 0))

    plan = []
    for members, shared in groups:
        shared = max(shared, 0) if share_prefix else 0
        group = PrefixGroup(prefix=list(sequences[members[0]][:shared]))
        members = sorted(members, key=lambda i: len(sequences[i]), reverse=True)
        batch: list[int] = []
        for i in members:
            width = len(sequences[batch[0]]) - 1 - shared if batch else len(sequences[i]) - 1 - shared
            too_many = len(batch) >= batch_size
            too_big = batch_tokens is not None and batch and (len(batch) + 1) * width > batch_tokens
            if batch and (too_many or too_big):
                group.batches.append(batch)
                batch = []
            batch.append(i)
        if batch:
            group.batches.append(batch)
        plan.append(group)
    return plan


# ----------------------------------------------------------------------------------------------------------------
# The scoring engine


RESCALED_LOGITS = ("final_logit_softcapping", "logit_scale", "logits_scaling")  # config keys set after the head


def fast_parts(model) -> tuple[Any, Any] | None:
    """(decoder, output head) when the model's logits are head(decoder(...)) (a PEFT model's: its base model's, with
    the adapters active); None for models that need their own forward (prompt-learning adapters such as prefix tuning
    inject keys and values there; soft-capping or logit scales rescale the logits after the head)."""
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        return None
    config = getattr(model, "config", None)
    if any(getattr(config, k, None) not in (None, 1, 1.0) for k in RESCALED_LOGITS):
        return None
    try:
        decoder, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError, ValueError):
        return None
    if decoder is None or head is None or decoder is model:
        return None
    return decoder, head


_VOCAB_BLOCK = 1024  # output-head rows per matrix product on a CPU (a block of logits stays in cache)


def _nll_of(head, hidden, targets, chunk: int):
    """NLL (float32) of `targets` [T] given final hidden states [T, H], `chunk` positions of logits at a time."""
    import torch

    out = torch.empty(targets.shape[0], dtype=torch.float32, device=hidden.device)
    blocked = hidden.device.type == "cpu" and type(head) is torch.nn.Linear and head.weight.dtype.is_floating_point
    for start in range(0, targets.shape[0], chunk):
        h, t = hidden[start : start + chunk], targets[start : start + chunk]
        if blocked:
            out[start : start + chunk] = _blocked_nll(head, h, t)
        else:
            logits = head(h).float()
            # -log softmax(logits)[t] = logsumexp(logits) - logits[t]: one pass, no full log-softmax written out.
            out[start : start + chunk] = torch.logsumexp(logits, dim=-1) - logits.gather(1, t[:, None])[:, 0]
    return out


def _blocked_nll(head, h, t):
    """`_nll_of` for a plain linear head on a CPU: logits one vocabulary block at a time with a running
    log-sum-exp, so the [T, vocab] logits are never written to memory (writing and re-reading them cost as much as
    the product itself). Same numbers as the full product up to float32 summation order."""
    import torch

    weight, bias = head.weight, head.bias
    running_max = torch.full((h.shape[0],), -float("inf"), device=h.device)
    sum_exp = torch.zeros(h.shape[0], device=h.device)
    target_logit = torch.zeros(h.shape[0], device=h.device)
    for v in range(0, weight.shape[0], _VOCAB_BLOCK):
        block = torch.nn.functional.linear(
            h, weight[v : v + _VOCAB_BLOCK], None if bias is None else bias[v : v + _VOCAB_BLOCK]
        ).float()
        new_max = torch.maximum(running_max, block.amax(dim=-1))
        sum_exp = sum_exp * torch.exp(running_max - new_max) + torch.exp(block - new_max[:, None]).sum(dim=-1)
        running_max = new_max
        inside = (t >= v) & (t < v + block.shape[1])
        if inside.any():
            rows = inside.nonzero()[:, 0]
            target_logit[rows] = block[rows, t[rows] - v]
    return running_max + torch.log(sum_exp) - target_logit


def _full_model_nll(model, seqs: list[list[int]], pad_id: int, device) -> list[list[float]]:
    """Reference path: the model's own forward on right-padded rows, logits of every position."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s)
        mask[r, : len(s)] = 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1).to(device), reduction="none"
    ).view(len(seqs), width - 1)
    return [nll[r, : len(s) - 1].cpu().tolist() for r, s in enumerate(seqs)]


def batch_tensors(seqs: list[list[int]], shared: int, pad_id: int, device):
    """(ids, targets, mask) of one batch, right-padded: tokens shared..n-2 fed (the last predicts nothing), tokens
    shared+1..n-1 scored."""
    import torch

    rows, width = len(seqs), max(len(s) - 1 - shared for s in seqs)
    ids = torch.full((rows, width), pad_id, dtype=torch.long)
    targets = torch.zeros((rows, width), dtype=torch.long)
    mask = torch.zeros((rows, width), dtype=torch.long)
    for r, s in enumerate(seqs):
        n = len(s) - 1 - shared
        ids[r, :n] = torch.tensor(s[shared : len(s) - 1])
        targets[r, :n] = torch.tensor(s[shared + 1 :])
        mask[r, :n] = 1
    return ids.to(device), targets.to(device), mask.to(device)


def prefix_cache_kwargs(cache, length: int, mask, key: str = "past_key_values") -> dict[str, Any]:
    """The decoder's keyword arguments for a batch that continues a prefix of `length` tokens: its own copy of the
    prefix's keys and values `cache` (under `key`), the mask over prefix and batch (no cache: the batch's mask)."""
    import torch

    if cache is None:
        return {"attention_mask": mask, "use_cache": False}
    rows, cache = mask.shape[0], copy.deepcopy(cache)
    cache.batch_repeat_interleave(rows)
    ones = torch.ones((rows, length), dtype=mask.dtype, device=mask.device)
    return {"attention_mask": torch.cat([ones, mask], dim=1), key: cache, "use_cache": True}


def rows_of(head, hidden, targets, mask, seqs, prefix_state, chunk) -> list[list[float]]:
    """Each row's NLLs from a batch's final hidden states (the prefix's own NLLs in front where there is one)."""
    keep = mask.bool()
    nll = _nll_of(head, hidden[keep], targets[keep], chunk).cpu().tolist()
    shared = prefix_state["length"] if prefix_state else 0
    out, pos = [], 0
    for s in seqs:
        n = len(s) - 1 - shared
        row = nll[pos : pos + n]
        pos += n
        if prefix_state:
            row = prefix_state["nll"] + [prefix_state["first"][s[shared]]] + row
        out.append(row)
    return out


def _fast_nll_batch(decoder, head, seqs, prefix_state, pad_id, device, chunk) -> list[list[float]]:
    """NLL of tokens 1..n-1 of each row of one batch, reusing the group's prefix keys/values when there are some."""
    ids, targets, mask = batch_tensors(seqs, prefix_state["length"] if prefix_state else 0, pad_id, device)
    kwargs = prefix_cache_kwargs(prefix_state["cache"], prefix_state["length"], mask) if prefix_state else \
        prefix_cache_kwargs(None, 0, mask)
    hidden = decoder(input_ids=ids, **kwargs).last_hidden_state
    return rows_of(head, hidden, targets, mask, seqs, prefix_state, chunk)


def prefix_state(decoder, head, prefix: list[int], device, chunk) -> dict[str, Any]:
    """Keys/values of a shared prefix, the NLL of its own tokens, and the log-probabilities of the token after it."""
    import torch

    ids = torch.tensor([prefix], dtype=torch.long, device=device)
    out = decoder(input_ids=ids, use_cache=True)
    hidden = out.last_hidden_state[0]
    own = _nll_of(head, hidden[:-1], ids[0, 1:], chunk).cpu().tolist() if len(prefix) > 1 else []
    first = (-torch.log_softmax(head(hidden[-1:]).float(), dim=-1))[0].cpu()
    return {"length": len(prefix), "cache": out.past_key_values, "nll": own, "first": first.tolist()}


def sequence_nlls(
    model,
    sequences: list[list[int]],
    *,
    pad_id: int,
    batch_size: int,
    batch_tokens: int | None = None,
    share_prefix: bool = True,
    min_shared_prefix: int = 8,
    logits_chunk: int = 512,
    desc: str = "scoring",
) -> list[list[float]]:
    """NLL of tokens 1..n-1 of every sequence (entry j-1 is -log p(token j | tokens < j)), in input order.

    Sequences shorter than two tokens get an empty list. The model is put in eval mode for the call and restored.
    """
    import torch

    device = next(model.parameters()).device
    results: list[list[float]] = [[] for _ in sequences]
    plan = plan_batches(
        sequences,
        batch_size=batch_size,
        batch_tokens=batch_tokens,
        share_prefix=share_prefix,
        min_shared_prefix=min_shared_prefix,
    )
    if not plan:
        return results
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            parts = fast_parts(model)
            if parts is not None and not fast_path_agrees(model, parts, sequences, pad_id, device, logits_chunk):
                log.warning("%s: the model's logits are not head(decoder(x)); using its full forward (slower)", type(model).__name__)
                parts = None
            if parts is None:  # the model's own forward, no prefix reuse
                plan = plan_batches(sequences, batch_size=batch_size, batch_tokens=batch_tokens, share_prefix=False)
            with tqdm(total=sum(len(b) for g in plan for b in g.batches), desc=desc, unit="row", leave=False) as bar:
                for group in plan:
                    state = None
                    if parts is not None and group.prefix:
                        state = prefix_state(*parts, group.prefix, device, logits_chunk)
                    for batch in group.batches:
                        seqs = [sequences[i] for i in batch]
                        if parts is None:
                            scored = _full_model_nll(model, seqs, pad_id, device)
                        else:
                            scored = _fast_nll_batch(*parts, seqs, state, pad_id, device, logits_chunk)
                        for i, row in zip(batch, scored):
                            results[i] = row
                        bar.update(len(batch))
    finally:
        model.train(was_training)
    return results


def fast_path_agrees(model, parts: tuple[Any, Any], sequences, pad_id, device, chunk) -> bool:
    """Score one short row both ways; the fast path is used only when it reproduces the model's own logits."""
    import torch

    probe = min((s for s in sequences if len(s) >= 2), key=len)[:16]
    fast = _fast_nll_batch(*parts, [probe], None, pad_id, device, chunk)[0]
    full = _full_model_nll(model, [probe], pad_id, device)[0]
    half = parts[1].weight.dtype in (torch.float16, torch.bfloat16) if hasattr(parts[1], "weight") else False
    scale = float(model(input_ids=torch.tensor([probe], device=device)).logits.float().abs().max()) if half else 0.0
    return paths_agree(fast, full, half, scale)


def paths_agree(fast: list[float], full: list[float], half: bool, logit_scale: float) -> bool:
    """Whether the fast path's NLLs reproduce the model's own forward's. Half precision keeps 8 significant bits of
    each logit, so -log p = logsumexp - logit moves by up to ~2^-7 of the largest logit between two roundings, however
    small the NLL (a tuned SmolLM2 in bf16: logits up to 37, the paths 0.1-0.25 nats apart on NLLs of 3-10)."""
    if not half:
        return all(abs(a - b) <= _SELF_CHECK_TOLERANCE * (1 + abs(b)) for a, b in zip(fast, full))
    return all(abs(a - b) <= _SELF_CHECK_TOLERANCE_HALF * (1 + abs(b)) + logit_scale * 2**-7 for a, b in zip(fast, full))


def token_nlls(
    model,
    tokenizer,
    encoded: list[dict[str, list[int]]],
    batch_size: int,
    desc: str = "scoring",
    *,
    batch_tokens: int | None = None,
    share_prefix: bool = True,
) -> list[list[float]]:
    """Negative log-likelihood of every labelled token of every encoded example (same order as `encoded`).

    `encoded` items hold input_ids and labels (-100 = not scored), as made by `encode_chat`.
    """
    seq = sequence_nlls(
        model,
        [e["input_ids"] for e in encoded],
        pad_id=tokenizer.pad_token_id,
        batch_size=batch_size,
        batch_tokens=batch_tokens,
        share_prefix=share_prefix,
        desc=desc,
    )
    return [[nll[j - 1] for j in response_positions(e["labels"])] for e, nll in zip(encoded, seq)]


def response_positions(labels: list[int]) -> list[int]:
    """Positions of the scored (labelled) tokens; position 0 has no context and is never scored."""
    return [j for j, label in enumerate(labels) if label != -100 and j > 0]


# ----------------------------------------------------------------------------------------------------------------
# Statistics


def perplexity(nlls: list[list[float]]) -> float:
    """Corpus perplexity: exp of the mean NLL over all scored tokens."""
    total = sum(len(x) for x in nlls)
    return math.exp(sum(sum(x) for x in nlls) / total) if total else float("nan")


def robust_z(values: list[float]) -> list[float]:
    """(x - median) / (1.4826 * MAD): a z-score that a few extreme rows cannot drag along."""
    if not values:
        return []
    median = statistics.median(values)
    mad = statistics.median(abs(v - median) for v in values)
    scale = 1.4826 * mad or 1e-9
    return [(v - median) / scale for v in values]


def ids_hash(input_ids: list[int]) -> str:
    """Fingerprint of a row's token ids: token masks apply only to a row encoded exactly as it was scored."""
    return hashlib.sha256(json.dumps(list(map(int, input_ids))).encode()).hexdigest()[:16]
