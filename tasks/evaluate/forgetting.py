"""Forgetting, measured as several signals on data training never touched, each with a bootstrap interval.

- **general_ppl**: perplexity of general prose (the probe shipped with fewtune, plus the answers of `data.probe` rows),
  tuned relative to base; a rise means the model lost some of its general language ability.
- **kl_general** and **kl_task**: the mean per-token KL(base || tuned) of the next-token distributions along the base
  model's own answers, to general prompts and to the task's test prompts. Forward KL on the task's inputs predicts
  forgetting (Shenfeld et al., "RL's Razor", arXiv 2509.04259): among fine-tunes that learn the task equally well, the
  one that moved its distribution least forgets least. Computed exactly over the full vocabulary with the adapter
  switched off and on in the same model (no second copy of the weights).
- **general_flips**: general questions with checkable answers; base accuracy minus tuned accuracy, with the counts of
  right->wrong and wrong->right flips.

Every signal is "higher = more forgetting"; the gate reads the upper end of its interval.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from tasks.common.measure import Scored, bootstrap, paired_delta, ppl_aggregate, ppl_items
from tasks.common.models import encode_chat
from tasks.common.nll import fast_parts, token_nlls
from tasks.config import FewtuneConfig

log = logging.getLogger("fewtune.evaluate")


def prose_encoding(tokenizer, text: str, max_length: int) -> dict[str, list[int]]:
    """Plain text, every token after the first scored (no chat template: general prose as it is written)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_length]
    return {"input_ids": ids, "labels": [-100] + ids[1:]}


def general_encodings(tokenizer, prose: list[dict[str, Any]], extra: list[dict[str, Any]], max_length: int) -> list[dict]:
    """The general-text rows whose perplexity is the general_ppl signal: prose passages, then `data.probe` answers."""
    encoded = [prose_encoding(tokenizer, p["text"], max_length) for p in prose]
    encoded += [encode_chat(tokenizer, r, max_length) for r in extra]
    return [e for e in encoded if sum(label != -100 for label in e["labels"])]


def ppl_of(model, tokenizer, encoded: list[dict], cfg: FewtuneConfig, desc: str) -> Scored:
    items = ppl_items(token_nlls(model, tokenizer, encoded, cfg.score.batch_size, desc))
    return Scored(ppl_aggregate(items), items, ppl_aggregate)


def answered(prompts: list[list[dict[str, str]]], answers: list[str], references: list[str]) -> list[dict]:
    """Chat rows made of each prompt and the base model's own answer (on-policy for the base model), or the reference
    answer where the base model gave none."""
    return [
        {"messages": list(p) + [{"role": "assistant", "content": a if a.strip() else r}]}
        for p, a, r in zip(prompts, answers, references)
        if a.strip() or r.strip()
    ]


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


def paired_answer_logits(peft_model, ids, mask, where, shared_layers: int):
    """(base, tuned) logits at the positions `where` marks (row-major order). The layers below `shared_layers`,
    identical for both models, run once: the base pass records the input of layer `shared_layers` and the tuned pass
    runs only the layers from there on. The output head runs on the marked positions only."""
    path = fast_parts(peft_model)
    if path is None:
        tuned = peft_model(input_ids=ids, attention_mask=mask).logits[where]
        with peft_model.disable_adapter():
            return peft_model(input_ids=ids, attention_mask=mask).logits[where], tuned
    decoder, head = path
    if not shared_layers:
        tuned = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        with peft_model.disable_adapter():
            base = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        return head(base[where]), head(tuned[where])
    layers, seen = decoder.layers, {}
    hook = layers[shared_layers].register_forward_pre_hook(
        lambda _m, args, kwargs: seen.update(args=args, kwargs=dict(kwargs)), with_kwargs=True)
    try:
        with peft_model.disable_adapter():
            base = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    finally:
        hook.remove()
    args, kwargs = list(seen["args"]), seen["kwargs"]
    hidden = args.pop(0) if args else kwargs.pop("hidden_states")
    for layer in layers[shared_layers : decoder.config.num_hidden_layers]:
        out = layer(hidden, *args, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
    return head(base[where]), head(decoder.norm(hidden)[where])


def kl_items(peft_model, tokenizer, rows: list[dict], cfg: FewtuneConfig, desc: str) -> list[tuple[float, int]]:
    """Per row: (summed KL(base || tuned) over its answer tokens, answer tokens), from a PEFT model whose adapter is
    switched off for the base distribution. The distribution that predicts answer token j is the one at j - 1."""
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
        for begin in range(0, len(order), bs):
            idx = order[begin : begin + bs]
            width = max(len(encoded[i]["input_ids"]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                n = len(encoded[i]["input_ids"])
                ids[row, :n] = torch.tensor(encoded[i]["input_ids"])
                mask[row, :n] = 1
            ids, mask = ids.to(device), mask.to(device)
            # the distributions that predict answer tokens only: position j - 1 for every answer token j
            rows_at = [[j - 1 for j, t in enumerate(encoded[i]["labels"]) if t != -100 and j > 0] for i in idx]
            where = torch.zeros(ids.shape, dtype=torch.bool, device=device)
            for row, pos in enumerate(rows_at):
                where[row, pos] = True
            if shared is None:  # the first row checks the shortcut against two whole passes
                shared = first_adapted_layer(peft_model)
                if shared:
                    one = (ids[:1], mask[:1], where[:1])
                    whole = paired_answer_logits(peft_model, *one, 0)
                    try:
                        fast = paired_answer_logits(peft_model, *one, shared)
                        gap = max(float((a.float() - b.float()).abs().max()) for a, b in zip(whole, fast))
                    except (TypeError, KeyError, IndexError, AttributeError, ValueError) as exc:
                        gap = float("inf")  # a layer that cannot be called on its own: whole passes
                        log.info("KL: layer shortcut unavailable (%s)", exc)
                    if gap > 1e-2 * (1 + float(whole[1].float().abs().max())):
                        log.warning("KL: layers below the adapter recomputed for the tuned pass (the shortcut "
                                    "differs by %.2g on this model)", gap)
                        shared = 0
            base, tuned = paired_answer_logits(peft_model, ids, mask, where, shared)
            log_b, log_t = F.log_softmax(base.float(), dim=-1), F.log_softmax(tuned.float(), dim=-1)
            kl_all = (log_b.exp() * (log_b - log_t)).sum(dim=-1).clamp_min(0)
            start = 0
            for i, pos in zip(idx, rows_at):  # `where` is row-major: each row's positions in order
                if pos:
                    out[i] = (float(kl_all[start : start + len(pos)].sum()), len(pos))
                start += len(pos)
            bar.update(len(idx))
    return [item for item in out if item[1]]


def _ratio(items: list[tuple[float, int]]) -> float:
    tokens = sum(n for _, n in items)
    return sum(s for s, _ in items) / tokens if tokens else float("nan")


def _interval_row(value: float, low: float, high: float, n: int, **extra: Any) -> dict[str, Any]:
    return {"value": round(value, 4), "low": round(low, 4), "high": round(high, 4), "n": n, **extra}


def kl_signal(items: list[tuple[float, int]], cfg: FewtuneConfig) -> dict[str, Any]:
    """Mean KL per answer token over the rows, with a bootstrap interval over rows."""
    e = cfg.evaluate
    iv = bootstrap(lambda idx: _ratio([items[i] for i in idx[0]]), [len(items)], e.bootstrap_samples, e.confidence,
                   e.bootstrap_seed)
    return _interval_row(iv.value, iv.low, iv.high, len(items), tokens=sum(n for _, n in items), unit="nats/token")


def ppl_signal(baseline: Scored, tuned: Scored, cfg: FewtuneConfig) -> dict[str, Any]:
    """Relative rise of general-text perplexity, tuned / base - 1, with a paired interval."""
    iv = paired_delta(baseline, tuned, cfg, relative=True)
    return _interval_row(iv.value, iv.low, iv.high, len(baseline.items), baseline=round(baseline.value, 4),
                         tuned=round(tuned.value, 4), unit="relative")


def flips_signal(base_right: Sequence[bool], tuned_right: Sequence[bool], cfg: FewtuneConfig) -> dict[str, Any]:
    """Base accuracy minus tuned accuracy on general questions (paired interval), and the flips both ways."""
    e = cfg.evaluate
    b = [float(x) for x in base_right]
    t = [float(x) for x in tuned_right]

    def stat(idx: list[Sequence[int]]) -> float:
        rows = idx[0]
        return (sum(b[i] for i in rows) - sum(t[i] for i in rows)) / len(rows) if len(rows) else float("nan")

    iv = bootstrap(stat, [len(b)], e.bootstrap_samples, e.confidence, e.bootstrap_seed)
    n = len(b)
    return _interval_row(
        iv.value, iv.low, iv.high, n,
        baseline_accuracy=round(sum(b) / n, 4) if n else math.nan,
        tuned_accuracy=round(sum(t) / n, 4) if n else math.nan,
        right_to_wrong=sum(1 for x, y in zip(b, t) if x and not y),
        wrong_to_right=sum(1 for x, y in zip(b, t) if y and not x),
        unit="accuracy drop",
    )


def unmerged_tuned(model, adapter_path: str):
    """The base model with the adapter attached but not merged, so it can be switched off (`disable_adapter`)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter_path)


def merged(peft_model):
    """The adapter merged into the weights where the method allows it (faster generation), else the PEFT model."""
    if peft_model.peft_config["default"].is_prompt_learning:
        return peft_model
    return peft_model.merge_and_unload()


def forgetting_result(
    general,
    general_ppl: dict[str, Scored],
    kl: dict[str, list[tuple[float, int]]],
    right: dict[str, list[bool]],
    cfg: FewtuneConfig,
    not_applicable: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Every forgetting signal with its interval, and the ones that could not be measured with why (never a pass).

    `not_applicable`: signals that measure nothing for this task, with why (kl_task for labelled data)."""
    signals: dict[str, Any] = {}
    not_measured: dict[str, str] = {}
    skip = dict(not_applicable or {})
    if general_ppl["baseline"].items:
        signals["general_ppl"] = ppl_signal(general_ppl["baseline"], general_ppl["tuned"], cfg)
    else:
        not_measured["general_ppl"] = "no general prose to measure (the probe has no prose rows left)"
    for name, why in (("general", "general prompts"), ("task", "the test prompts")):
        if f"kl_{name}" in skip:
            continue
        if kl.get(name):
            signals[f"kl_{name}"] = kl_signal(kl[name], cfg)
        else:
            not_measured[f"kl_{name}"] = f"no answers to {why} to measure the KL along"
    if right["baseline"]:
        signals["general_flips"] = flips_signal(right["baseline"], right["tuned"], cfg)
    else:
        not_measured["general_flips"] = "no general questions with checkable answers in the probe"
    return {
        "probe": general.counts(),
        "signals": signals,
        "not_measured": not_measured,
        "not_applicable": skip,
    }
