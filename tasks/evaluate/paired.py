"""Passes over the base and the tuned model in one go, for the KL forgetting signals (kl_task, kl_general): both
models held as a `Twin` (tasks/common/twin.py: the decoder layers below the adapter run once for both), the rows'
shared leading tokens (a system prompt) once per call, the output head on the scored positions only. `kl_items`
gives per row the summed KL(base || tuned) of the next-token distributions along its answer tokens.
"""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm

from tasks.common.generation import shared_length
from tasks.common.models import encode_chat
from tasks.common.nll import fast_parts
from tasks.common.twin import Twin, prefix_caches
from tasks.config import FewtuneConfig

KL_CHUNK = 256  # answer positions whose full-vocabulary distributions are held at once (~50 MB each in float32)


def kl_prefix(twin: Twin, encoded: list[dict], device) -> dict[str, Any] | None:
    """Keys and values of the leading tokens every row's prompt shares (a system prompt), for the base model and the
    tuned model, so the KL passes run them once per call; None when the rows share too little."""
    prompts = [e["input_ids"][: next((j for j, t in enumerate(e["labels"]) if t != -100), 0)] for e in encoded]
    n = shared_length(prompts) if fast_parts(twin.model) is not None and all(prompts) else 0
    return prefix_caches(twin, prompts[0][:n], device) if n else None


def paired_answer_states(twin: Twin, ids, mask, where, prefix: dict[str, Any] | None = None):
    """(base, tuned, head): the two models' final states at the positions `where` marks (row-major order) and the
    output head that turns them into logits, the layers below the adapter run once (`Twin.hidden`). With `prefix`
    (from `kl_prefix`), `ids` continue its tokens. Models whose logits are not head(decoder) give their logits and
    an identity head."""
    path = fast_parts(twin.model)
    if path is None:
        tuned = twin.model(input_ids=ids, attention_mask=mask).logits[where]
        with twin.base():
            return twin.model(input_ids=ids, attention_mask=mask).logits[where], tuned, lambda x: x
    tuned, base = twin.hidden(ids, mask, prefix)
    return base[where], tuned[where], path[1]


def _kl_per_position(base, tuned, head, chunk: int = KL_CHUNK):
    """KL(base || tuned) of the next-token distributions at each position, the full-vocabulary logits `chunk`
    positions at a time (their float32 copies are what bounds the memory)."""
    import torch
    import torch.nn.functional as F

    out = []
    for start in range(0, base.shape[0], chunk):
        log_b = F.log_softmax(head(base[start : start + chunk]).float(), dim=-1)
        log_t = F.log_softmax(head(tuned[start : start + chunk]).float(), dim=-1)
        # exp(log_b) * (log_b - log_t) in one pass (the three-step form made two full-vocabulary temporaries)
        out.append(F.kl_div(log_t, log_b, reduction="none", log_target=True).sum(dim=-1).clamp_min(0))
    return torch.cat(out) if out else base.new_zeros(0, dtype=torch.float32)


def kl_items(twin: Twin, tokenizer, rows: list[dict], cfg: FewtuneConfig, desc: str,
             share_prefix: bool = True) -> list[tuple[float, int]]:
    """Per row: (summed KL(base || tuned) over its answer tokens, answer tokens), from the tuned model and its base
    model held as a `Twin`. The distribution that predicts answer token j is the one at j - 1.
    `share_prefix`: the rows' shared leading tokens (a system prompt) run once per call (`kl_prefix`)."""
    import torch

    encoded = [encode_chat(tokenizer, r, cfg.model.max_length) for r in rows]
    device = next(twin.model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["input_ids"]), reverse=True)
    out: list[tuple[float, int]] = [(0.0, 0)] * len(encoded)
    bs = cfg.score.batch_size  # the full-vocabulary logits are made in chunks of positions (`_kl_per_position`)
    checked = False  # the twin's shortcut (layers below the adapter once) is checked on the first row
    twin.model.eval()
    with torch.inference_mode(), tqdm(total=len(order), desc=desc, unit="row", leave=False) as bar:
        prefix = kl_prefix(twin, encoded, device) if share_prefix else None
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
            if not checked and fast_parts(twin.model) is not None:
                twin, checked = twin.checked(ids, mask, prefix), True
            kl_all = _kl_per_position(*paired_answer_states(twin, ids, mask, where, prefix))
            start = 0
            for i, pos in zip(idx, rows_at):  # `where` is row-major: each row's positions in order
                if pos:
                    out[i] = (float(kl_all[start : start + len(pos)].sum()), len(pos))
                start += len(pos)
            bar.update(len(idx))
    return [item for item in out if item[1]]
