"""Greedy generation with recorded settings, and the base model with an adapter applied.

Every answer a verdict rests on (baseline, tuned, probe, the champion, the served model) is produced by
`generate_answers` with explicit `GenerationSettings`; `settings_from(cfg)` reads them from the `evaluate` and
`model` config sections.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from tasks.common.kv_cache import empty_rows_cache, place_rows, rows_cache
from tasks.common.label_passes import cache_kwarg
from tasks.common.models import encode_prompt
from tasks.config import FewtuneConfig

MIN_SHARED_TOKENS = 8  # shorter shared starts are not worth a separate forward
# Rows that ended leave the batch once they are at least 1/COMPACT_SHARE of it: dropping rows copies every layer's
# keys and values (~1/7 of a decoding step for 50 rows), an ended row left in costs 1/rows of a step.
COMPACT_SHARE = 8
# Prompts run into the decoding cache in groups of about this many tokens (rows of alike length): a pooled batch's
# short prompts are not padded to its longest, and the prompts' activations stay small.
PREFILL_TOKENS = 2048


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
    return generate_pooled(model, tokenizer, [(prompts, settings)], desc)[0]


def generate_pooled(
    model, tokenizer, jobs: list[tuple[list[list[dict[str, str]]], GenerationSettings]], desc: str
) -> list[list[str]]:
    """The answers of several sets of prompts to one model, each set under its own settings, decoded together.

    A decoding step costs a fixed part (every weight read, every operation launched: on a 2-core CPU ~45 ms for a
    135M model) plus a part per row (~1.4 ms), so one batch of 160 prompts costs less than three of about 50. Each
    prompt keeps its set's `max_length` and `max_new_tokens` (a greedy answer does not depend on the rows beside it)
    and its set's shared leading tokens, run once; the batches hold the largest `batch_size` of the sets, split
    evenly."""
    import torch

    if not any(prompts for prompts, _ in jobs):
        return [[] for _ in jobs]
    device = next(model.parameters()).device
    own_loop = _decodes_itself(model)
    if not own_loop and len(jobs) > 1:  # `model.generate` of a prompt-learning model: its answers move with the
        return [generate_pooled(model, tokenizer, [job], desc)[0] for job in jobs]  # padding, so each set alone
    model.eval()  # before the shared prefixes run: no dropout in any part of an answer
    encoded: list[list[int]] = []
    limits: list[int] = []
    prefixes: list[dict[str, Any] | None] = []  # each set's shared leading tokens (a system prompt), run once
    known: dict[tuple[int, ...], dict[str, Any]] = {}
    for prompts, s in jobs:
        rows = [encode_prompt(tokenizer, p, s.max_length) for p in prompts]
        prefix = prefix_state(model, rows, device) if own_loop else None
        if prefix:  # sets that start alike (test prompts and their original phrasings) share one
            prefix = known.setdefault(tuple(rows[0][: prefix["length"]]), prefix)
        encoded += rows
        limits += [s.max_new_tokens] * len(rows)
        prefixes += [prefix] * len(rows)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)
    answers: list[str] = [""] * len(encoded)
    bs = max((s.batch_size for _, s in jobs), default=1)
    bs = -(-len(order) // max(1, -(-len(order) // bs)))  # as many batches as `bs` needs, of even sizes
    eos = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    with torch.inference_mode(), tqdm(total=len(encoded), desc=desc, unit="prompt", leave=False) as bar:
        for start in range(0, len(order), bs):
            idx = order[start : start + bs]
            rows, most = [encoded[i] for i in idx], [limits[i] for i in idx]
            if own_loop:
                said = greedy_tokens(model, rows, [prefixes[i] for i in idx], most, eos, tokenizer.pad_token_id, device)
            else:  # one budget per call: the longest, each answer cut to its own (greedy: the same tokens)
                said = _hf_generate(model, tokenizer, rows, max(most), device)
                said = [tokens[:n] for tokens, n in zip(said, most)]
            for i, tokens in zip(idx, said):
                answers[i] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
            bar.update(len(idx))
    out, at = [], 0
    for prompts, _ in jobs:
        out.append(answers[at : at + len(prompts)])
        at += len(prompts)
    return out


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


def greedy_tokens(model, rows: list[list[int]], prefix: dict[str, Any] | list[dict[str, Any] | None] | None,
                  max_new_tokens: int | list[int], eos: set[int], pad_id: int, device) -> list[list[int]]:
    """Greedy continuation of each row (its tokens, an end token included), as `model.generate` decodes left-padded
    rows: positions count each row's own tokens, padding is masked. `prefix`: the leading tokens' keys and values
    (`prefix_state`), one for every row or each row's own (None: none); `max_new_tokens`: one budget for every row, or
    each row's own. The prompts run in groups of alike length (`prefill`); a row that produced an end token (or its
    budget) stops adding tokens and leaves the batch (its keys and values dropped) once ended rows are
    1/`COMPACT_SHARE` of it, so a batch costs about what its unfinished rows need."""
    import torch

    budgets = [max_new_tokens] * len(rows) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    steps = max(budgets)
    prefixes = prefix if isinstance(prefix, list) else [prefix] * len(rows)
    cache, mask, following, chosen = prefill(model, rows, prefixes, steps, pad_id, device)
    name = _cache_name(model)
    alive = list(range(len(rows)))
    ended: set[int] = set()  # rows done (end token or budget); they leave the batch at the next compaction
    said: list[list[int]] = [[] for _ in rows]
    for step in range(steps):
        for row, token in zip(alive, chosen.tolist()):
            if row not in ended:
                said[row].append(token)
                if token in eos or len(said[row]) >= budgets[row]:
                    ended.add(row)
        if len(ended) == len(rows) or step == steps - 1:
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
        chosen = out.logits[:, -1].max(dim=-1).indices  # argmax's first maximum, ~3x faster on bf16 logits
        following = following + 1
    return said


def prefill(model, rows: list[list[int]], prefixes: list[dict[str, Any] | None], steps: int, pad_id: int, device):
    """The prompts run into one decoding cache: (cache, attention mask, next positions, first tokens).

    Every row ends at the same column: its prefix's keys and values (`prefixes[i]`, or none) end at the longest
    prefix's length, its own tokens at the longest row's; the room before each is masked. The rows run in groups of
    about `PREFILL_TOKENS` own tokens, sorted by length, so a pooled batch of short and long prompts does not pad
    every row to the longest (one group: the cache it ran into, with room for `steps` more)."""
    import torch

    lengths = [p["length"] if p else 0 for p in prefixes]
    own = [r[n:] for r, n in zip(rows, lengths)]
    shared, width = max(lengths), max(len(r) for r in own)
    order = sorted(range(len(rows)), key=lambda i: len(own[i]), reverse=True)
    groups: list[list[int]] = [[]]
    for i in order if len(rows) * width > PREFILL_TOKENS else []:
        if groups[-1] and (len(groups[-1]) + 1) * len(own[groups[-1][0]]) > PREFILL_TOKENS:
            groups.append([])
        groups[-1].append(i)
    groups = groups if groups[0] else [list(range(len(rows)))]  # one group: the rows in their order
    mask = torch.zeros((len(rows), shared + width), dtype=torch.long)
    following = torch.zeros(len(rows), dtype=torch.long)
    chosen = torch.zeros(len(rows), dtype=torch.long)
    cache, name = None, _cache_name(model)
    for group in groups:
        g_shared = max(lengths[i] for i in group)
        g_width = max(len(own[i]) for i in group)
        ids = torch.full((len(group), g_width), pad_id, dtype=torch.long)
        g_mask = torch.zeros((len(group), g_shared + g_width), dtype=torch.long)
        positions = torch.ones((len(group), g_width), dtype=torch.long)
        for j, i in enumerate(group):
            r, n = own[i], lengths[i]
            ids[j, g_width - len(r) :] = torch.tensor(r)
            g_mask[j, g_shared - n : g_shared] = 1
            g_mask[j, g_shared + g_width - len(r) :] = 1
            positions[j, g_width - len(r) :] = torch.arange(n, n + len(r))
            mask[i, shared - n : shared] = 1
            mask[i, shared + width - len(r) :] = 1
            following[i] = n + len(r)
        # keys and values written in place, with room for the prompts and every new token (`rows_cache`)
        room = g_shared + g_width + (steps if len(groups) == 1 else 0)
        part = rows_cache([(prefixes[i] or {}).get("cache") for i in group], room)
        out = model(input_ids=ids.to(device), attention_mask=g_mask.to(device), position_ids=positions.to(device),
                    use_cache=True, logits_to_keep=1, **{name: part})
        chosen[group] = out.logits[:, -1].max(dim=-1).indices.cpu()
        if len(groups) == 1:
            cache = part
        else:  # each group's prefix part and own part moved to where the rows of the whole batch have them
            cache = cache or empty_rows_cache(part, len(rows), shared + width + steps, shared + width)
            place_rows(cache, part, torch.tensor(group, device=device),
                       [(0, g_shared, shared - g_shared), (g_shared, g_shared + g_width, shared + width - g_width)])
    return cache, mask.to(device), following.to(device), chosen.to(device)


def load_tuned(model, adapter_path: str):
    """The base model with the adapter applied: merged into the weights when the method allows it."""
    from peft import PeftModel

    tuned = PeftModel.from_pretrained(model, adapter_path)
    if tuned.peft_config["default"].is_prompt_learning:
        return tuned  # prefix tuning adds virtual tokens; nothing to merge
    return tuned.merge_and_unload()
