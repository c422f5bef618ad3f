"""Greedy generation with recorded settings, and the base model with an adapter applied.

Every answer a verdict rests on (baseline, tuned, probe, the champion, the served model) is produced by
`generate_answers` with explicit `GenerationSettings`; `settings_from(cfg)` reads them from the `evaluate` and
`model` config sections.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from tasks.common.kv_cache import decoding_cache
from tasks.common.label_passes import cache_kwarg
from tasks.common.models import encode_prompt
from tasks.config import FewtuneConfig

MIN_SHARED_TOKENS = 8  # shorter shared starts are not worth a separate forward
# Rows that ended leave the batch once they are at least 1/COMPACT_SHARE of it: dropping rows copies every layer's
# keys and values (~1/7 of a decoding step for 50 rows), an ended row left in costs 1/rows of a step.
COMPACT_SHARE = 8


@dataclass(frozen=True)
class GenerationSettings:
    """Greedy decoding of at most `max_new_tokens` per prompt; prompts keep their last `max_length` tokens and are
    answered `batch_size` at a time."""

    max_new_tokens: int
    max_length: int
    batch_size: int


def settings_from(cfg: FewtuneConfig) -> GenerationSettings:
    """The generation settings of an evaluation: `evaluate.max_new_tokens`, `model.max_length`, `evaluate.batch_size`."""
    return GenerationSettings(
        max_new_tokens=cfg.evaluate.max_new_tokens,
        max_length=cfg.model.max_length,
        batch_size=cfg.evaluate.batch_size,
    )


def generation_settings(cfg: FewtuneConfig, dtype: str) -> dict[str, Any]:
    """The decoding settings every answer of an evaluation is produced with (recorded with the results)."""
    s = settings_from(cfg)
    return {
        "decoding": "greedy",
        "do_sample": False,
        "max_new_tokens": s.max_new_tokens,
        "prompt_max_tokens": s.max_length,
        "batch_size": s.batch_size,
        "padding": "left",
        "dtype": dtype,
    }


def generate_answers(
    model, tokenizer, prompts: list[list[dict[str, str]]], settings: GenerationSettings, desc: str
) -> list[str]:
    """Greedy answers to each conversation prefix, batched over length-sorted, left-padded prompts.

    Decoder-only models are decoded by `greedy_tokens`: the answers `model.generate` gives, with the prompts' shared
    leading tokens run once per call and each row leaving the batch once it has ended. Models that put their own
    keys and values in front of the prompt (prompt learning) go through `model.generate`."""
    import torch

    device = next(model.parameters()).device
    encoded = [encode_prompt(tokenizer, p, settings.max_length) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)
    answers: list[str] = [""] * len(prompts)
    bs = settings.batch_size
    own_loop = _decodes_itself(model)
    model.eval()  # before the shared prefix runs: no dropout in any part of an answer
    prefix = prefix_state(model, encoded, device) if own_loop else None
    eos = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    with torch.inference_mode(), tqdm(total=len(prompts), desc=desc, unit="prompt", leave=False) as bar:
        for start in range(0, len(order), bs):
            idx = order[start : start + bs]
            if own_loop:
                said = greedy_tokens(model, [encoded[i] for i in idx], prefix, settings.max_new_tokens, eos,
                                     tokenizer.pad_token_id, device)
            else:
                said = _hf_generate(model, tokenizer, [encoded[i] for i in idx], settings.max_new_tokens, device)
            for i, tokens in zip(idx, said):
                answers[i] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
            bar.update(len(idx))
    return answers


def _decodes_itself(model) -> bool:
    """True for a causal LM whose forward takes `logits_to_keep` (merged, LoRA-style or not adapted); False for a PEFT
    prompt-learning model (its virtual tokens' keys and values come first) and older model classes."""
    import inspect

    config = getattr(model, "peft_config", None)
    if config and config["default"].is_prompt_learning:
        return False
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def _hf_generate(model, tokenizer, rows: list[list[int]], max_new_tokens: int, device) -> list[list[int]]:
    from transformers import GenerationConfig

    gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=tokenizer.eos_token_id)
    ids, mask = left_padded(rows, tokenizer.pad_token_id)
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen_cfg)
    return [out[row, ids.shape[1] :].tolist() for row in range(len(rows))]


def left_padded(rows: list[list[int]], pad_id: int):
    """Token rows as one left-padded batch for `model.generate`: (input ids, attention mask), both [rows, width]."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, r in enumerate(rows):
        ids[row, width - len(r) :] = torch.tensor(r)
        mask[row, width - len(r) :] = 1
    return ids, mask


def shared_length(rows: list[list[int]], min_tokens: int = MIN_SHARED_TOKENS) -> int:
    """Leading tokens every row starts with (each row keeps at least one of its own); 0 below `min_tokens`."""
    if len(rows) < 2:
        return 0
    first, most = rows[0], min(len(r) for r in rows) - 1
    n = 0
    while n < most and all(r[n] == first[n] for r in rows):
        n += 1
    return n if n >= min_tokens else 0


def prefix_state(model, rows: list[list[int]], device) -> dict[str, Any] | None:
    """The keys and values of the leading tokens all `rows` share (a system prompt), computed once."""
    import torch

    n = shared_length(rows)
    if not n:
        return None
    cache = _new_cache()
    with torch.inference_mode():
        model(input_ids=torch.tensor([rows[0][:n]], device=device), use_cache=True, logits_to_keep=1,
              **{_cache_name(model): cache})
    return {"length": n, "cache": cache}


def _new_cache():
    from transformers import DynamicCache

    return DynamicCache()


def _cache_name(model) -> str:
    """The keyword a causal LM's forward takes its key/value cache by (`cache`; `past_key_values` before it)."""
    return cache_kwarg(model.get_base_model() if hasattr(model, "get_base_model") else model)


def greedy_tokens(model, rows: list[list[int]], prefix: dict[str, Any] | None, max_new_tokens: int,
                  eos: set[int], pad_id: int, device) -> list[list[int]]:
    """Greedy continuation of each row (its tokens, an end token included), as `model.generate` decodes left-padded
    rows: positions count each row's own tokens, padding is masked. A row that produced an end token stops adding
    tokens and leaves the batch (its keys and values dropped) once ended rows are 1/`COMPACT_SHARE` of it, so a batch
    costs about what its unfinished rows need."""
    import torch

    shared = prefix["length"] if prefix else 0
    own = [r[shared:] for r in rows]
    width = max(len(r) for r in own)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), shared + width), dtype=torch.long)
    mask[:, :shared] = 1
    positions = torch.ones((len(rows), width), dtype=torch.long)
    for row, r in enumerate(own):
        ids[row, width - len(r) :] = torch.tensor(r)
        mask[row, shared + width - len(r) :] = 1
        positions[row, width - len(r) :] = torch.arange(shared, shared + len(r))
    # keys and values written in place, with room for the prompts and every new token (`decoding_cache`)
    cache = decoding_cache(prefix["cache"] if prefix else None, len(rows), shared + width + max_new_tokens)
    name = _cache_name(model)
    ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                **{name: cache})
    following = positions[:, -1] + 1
    alive = list(range(len(rows)))
    ended: set[int] = set()  # rows that produced an end token; they leave the batch at the next compaction
    said: list[list[int]] = [[] for _ in rows]
    for step in range(max_new_tokens):
        chosen = out.logits[:, -1].max(dim=-1).indices  # argmax's first maximum, ~3x faster on bf16 logits
        for row, token in zip(alive, chosen.tolist()):
            if row not in ended:
                said[row].append(token)
                if token in eos:
                    ended.add(row)
        if len(ended) == len(rows) or step == max_new_tokens - 1:
            break
        present = sum(row in ended for row in alive)
        if present * COMPACT_SHARE >= len(alive):  # ended rows cost more per step than dropping them once
            keep = [j for j, row in enumerate(alive) if row not in ended]
            sel = torch.tensor(keep, device=device)
            cache.batch_select_indices(sel)
            mask, chosen, following = mask[sel], chosen[sel], following[sel]
            alive = [alive[j] for j in keep]
        mask = torch.cat([mask, mask.new_ones((len(alive), 1))], dim=1)
        out = model(input_ids=chosen[:, None], attention_mask=mask, position_ids=following[:, None],
                    use_cache=True, logits_to_keep=1, **{name: cache})
        following = following + 1
    return said


def load_tuned(model, adapter_path: str):
    """The base model with the adapter applied: merged into the weights when the method allows it."""
    from peft import PeftModel

    tuned = PeftModel.from_pretrained(model, adapter_path)
    if tuned.peft_config["default"].is_prompt_learning:
        return tuned  # prefix tuning adds virtual tokens; nothing to merge
    return tuned.merge_and_unload()
