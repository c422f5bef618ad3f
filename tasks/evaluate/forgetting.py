"""Forgetting, measured as several signals on data training never touched, each with a bootstrap interval.

- **general_ppl**: perplexity of general prose (the probe shipped with fewtune, plus the answers of `data.probe` rows),
  tuned relative to base; a rise means the model lost some of its general language ability.
- **kl_general** and **kl_task**: the mean per-token KL(base || tuned) of the next-token distributions along the base
  model's own answers, to general prompts and to the task's test prompts. Forward KL on the task's inputs predicts
  forgetting (Shenfeld et al., "RL's Razor", arXiv 2509.04259): among fine-tunes that learn the task equally well, the
  one that moved its distribution least forgets least. Computed exactly over the full vocabulary from the tuned model
  and the base model's own copies of the layers the adapter changes (`tasks/common/twin.py`; the layers below run once).
- **general_flips**: general questions with checkable answers; base accuracy minus tuned accuracy, with the counts of
  right->wrong and wrong->right flips.

Every signal is "higher = more forgetting"; the gate reads the upper end of its interval.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

from tasks.common.measure import Scored, bootstrap, paired_delta, ppl_aggregate, ppl_items
from tasks.common.models import encode_chat
from tasks.common.nll import response_positions, token_nlls
from tasks.common.twin import Twin, paired_nlls
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


def paired_ppl(twin: Twin, tokenizer, encoded: list[dict], cfg: FewtuneConfig, desc: str) -> tuple[Scored, Scored] | None:
    """(baseline, tuned) perplexity of the same encoded rows from one pass per batch (the layers below the adapter once,
    `paired_nlls`); None when the twin cannot share them: score each model on its own then."""
    got = paired_nlls(twin, [e["input_ids"] for e in encoded], pad_id=tokenizer.pad_token_id,
                      batch_size=cfg.score.batch_size, desc=desc)
    if got is None:
        return None
    tuned, base = ([[nll[j - 1] for j in response_positions(e["labels"])] for e, nll in zip(encoded, side)] for side in got)
    return tuple(Scored(ppl_aggregate(items), items, ppl_aggregate) for items in (ppl_items(base), ppl_items(tuned)))


def answered(prompts: list[list[dict[str, str]]], answers: list[str], references: list[str]) -> list[dict]:
    """Chat rows made of each prompt and the base model's own answer (on-policy for the base model), or the reference
    answer where the base model gave none."""
    return [
        {"messages": list(p) + [{"role": "assistant", "content": a if a.strip() else r}]}
        for p, a, r in zip(prompts, answers, references)
        if a.strip() or r.strip()
    ]


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
