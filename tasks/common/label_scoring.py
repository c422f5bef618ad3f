"""Label-constrained prediction: the log-probability of each label of a closed set as the assistant's whole answer.

A label's answer tokens are those the chat template writes for an assistant turn holding the label, up to and
including the end-of-turn token (`<|im_end|>` in ChatML): the end token is what tells `transfer` from
`transfer_money`. The prediction is the label with the highest log-probability, so it is always one of the labels.

The work is shared wherever the model allows it:
- prompts are grouped by their shared leading tokens (system prompt, label list, few-shot examples), whose keys and
  values are computed once per group and reused by every prompt of the group;
- each prompt's own tokens run once; the log-probability of every label's first token is read from the prompt's last
  position (labels that start alike share it);
- the rest of the labels run in batches on top of the prompts' keys and values, repeated once per label row, labels
  of similar lengths together; a label whose fed tokens begin another's (`transfer` / `transfer_money`) rides on
  that label's row;
- log-probabilities are computed in float32 for the positions that need them only, in chunks.
Models that manage their own keys and values (prompt-learning adapters such as prefix tuning) and models whose logits
are not head(decoder(x)) use their own full forward on whole prompt+label rows instead. A self-check on the first
batch compares the fast path with that full forward before the fast path scores the rest.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from tasks.common.models import render
from tasks.common.nll import _nll_of, fast_parts, plan_batches

log = logging.getLogger("fewtune.label_scoring")

# The fast path must reproduce the full forward's label log-probabilities within this tolerance (relative, in nats).
# Half precision rounds each matrix product differently for different shapes: two bf16 computations of the same label
# log-probability (about -15 nats) differ by up to 5% with SmolLM2-135M, hence its wider bound; a model whose logits
# are rescaled or soft-capped after the head, or whose keys/values cannot be reused this way, differs by far more.
_SELF_CHECK_TOLERANCE = 1e-3
_SELF_CHECK_TOLERANCE_HALF = 0.1
# Label rows are fed in passes of similar lengths: a pass takes carriers down to this fraction of its longest.
_GROUP_WIDTH_RATIO = 2 / 3


@dataclass
class LabelScores:
    """Log-probability of every label (columns, in `labels` order) as the answer to every prompt (rows)."""

    labels: list[str]
    logprobs: list[list[float]]  # per prompt, per label: log p(label's answer tokens incl. end-of-turn | prompt)

    def probabilities(self) -> list[list[float]]:
        """Softmax over the label set, per prompt (each row sums to 1)."""
        weights = [[math.exp(x - top) for x in row] for row, top in ((r, max(r)) for r in self.logprobs)]
        return [[w / total for w in row] for row, total in ((r, sum(r)) for r in weights)]

    def predictions(self) -> list[str]:
        """The most likely label per prompt (the first of equally likely ones)."""
        return [self.labels[max(range(len(row)), key=row.__getitem__)] for row in self.logprobs]


# ----------------------------------------------------------------------------------------------------------------
# Tokens


def label_token_ids(tokenizer, messages: list[dict[str, str]], label: str, *, prompt_ids: list[int] | None = None) -> list[int]:
    """Tokens of the assistant answer `label` after the conversation prefix `messages` and the generation prompt, up
    to and including the end-of-turn token (eos): the tokens after the prompt's in the rendered conversation.

    `prompt_ids` are the prefix's tokens as `encode_prompt` makes them (not truncated), when already at hand. Where
    the template's text or tokens do not extend the prompt's, the label's own tokens followed by eos are used.
    """
    eos = tokenizer.eos_token_id
    prompt_text = render(tokenizer, messages, add_generation_prompt=True)
    full_text = render(tokenizer, [*messages, {"role": "assistant", "content": label}])
    if full_text.startswith(prompt_text):
        if prompt_ids is None:
            prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
        if full_ids[: len(prompt_ids)] == prompt_ids:
            tail = full_ids[len(prompt_ids) :]
        else:  # a token spans the prompt's end: the answer as tokenized on its own, as generation would produce it
            tail = tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"]
        if eos in tail:
            return tail[: tail.index(eos) + 1]
        while tail and not tokenizer.decode(tail[-1:]).strip():  # an end-of-turn other than eos: drop what follows
            tail = tail[:-1]
        if tail:
            return tail
    return tokenizer(label, add_special_tokens=False)["input_ids"] + [eos]


def encode_label_prompts(
    tokenizer, prompts: list[list[dict[str, str]]], labels: list[str], max_length: int
) -> tuple[list[list[int]], list[list[list[int]]]]:
    """(prompt tokens, answer tokens per label) of each prompt. A prompt keeps its last tokens so that it and its
    longest answer fit `max_length` (at least one prompt token is kept). The answer tokens are derived once and
    shared by all prompts when the first and the last prompt agree on them (templates whose assistant turn does not
    depend on the conversation), else per prompt."""
    texts = [render(tokenizer, p, add_generation_prompt=True) for p in prompts]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    def answers(i: int) -> list[list[int]]:
        return [label_token_ids(tokenizer, prompts[i], label, prompt_ids=ids[i]) for label in labels]

    per_prompt: list[list[list[int]]] = []
    if prompts:
        first = answers(0)
        shared = len(prompts) == 1 or answers(len(prompts) - 1) == first
        per_prompt = [first] * len(prompts) if shared else [answers(i) for i in range(len(prompts))]
    kept = [list(p[-max(1, max_length - max(map(len, conts))) :]) for p, conts in zip(ids, per_prompt)]
    return kept, per_prompt


# ----------------------------------------------------------------------------------------------------------------
# Which positions score which label tokens (pure Python)


@dataclass
class LabelPlan:
    """How the log-probabilities of a label set's answers are read off the model.

    Label l's log-probability is first[first_of[l]] + the sum of pairs[p] for p in pairs_of[l], where `first` are
    the log-probabilities of the distinct first tokens at the prompt's last position and pair (c, j, t) is
    log p(t | prompt, carriers[c][: j + 1]). Carriers are the labels' answers less their last token, keeping only
    those that no other label's extends.
    """

    firsts: list[int]
    first_of: list[int]
    carriers: list[list[int]]
    pairs: list[tuple[int, int, int]]
    pairs_of: list[list[int]]

    def combine(self, first: list[float], pair: list[float]) -> list[float]:
        return [first[f] + sum(pair[p] for p in ps) for f, ps in zip(self.first_of, self.pairs_of)]

    def carrier_groups(self) -> list[tuple[int, int]]:
        """Carriers [lo, hi) fed in one forward pass: similar lengths, so that little of a pass is padding (a group
        ends where a carrier is shorter than `_GROUP_WIDTH_RATIO` of the group's longest)."""
        groups: list[list[int]] = []
        for c, carrier in enumerate(self.carriers):  # longest first
            if groups and len(carrier) >= _GROUP_WIDTH_RATIO * len(self.carriers[groups[-1][0]]):
                groups[-1][1] = c + 1
            else:
                groups.append([c, c + 1])
        return [(lo, hi) for lo, hi in groups]

    def positions_per_prompt(self, prompt_length: int) -> int:
        """Key/value positions one prompt holds in the largest of its label forward passes."""
        return max([(hi - lo) * (prompt_length + len(self.carriers[lo])) for lo, hi in self.carrier_groups()] or [0])


def plan_labels(answers: list[list[int]]) -> LabelPlan:
    """The plan for a label set's answer tokens (each non-empty); independent of the labels' order but for indices."""
    firsts = sorted({a[0] for a in answers})
    fed = {tuple(a[:-1]) for a in answers if len(a) > 1}
    carriers: list[tuple[int, ...]] = []
    for f in sorted(fed, key=lambda f: (-len(f), f)):
        if not any(c[: len(f)] == f for c in carriers):
            carriers.append(f)
    index: dict[tuple[int, int, int], int] = {}  # pair -> its index, in order of first use
    pairs_of = []
    for a in answers:
        c = next((k for k, car in enumerate(carriers) if car[: len(a) - 1] == tuple(a[:-1])), -1)
        pairs_of.append([index.setdefault((c, j - 1, a[j]), len(index)) for j in range(1, len(a))])
    return LabelPlan(firsts, [firsts.index(a[0]) for a in answers], [list(c) for c in carriers], list(index), pairs_of)


# ----------------------------------------------------------------------------------------------------------------
# The two ways to score a batch of prompts: shared keys/values (fast), the model's own forward (reference)


class _FastPathDisagrees(RuntimeError):
    pass


def _cache_kwarg(decoder) -> str:
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _padded(seqs: list[list[int]], pad_id: int, starts: list[int] | None = None):
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


def _prefix_cache(decoder, prefix: list[int], device) -> dict[str, Any]:
    import torch

    out = decoder(input_ids=torch.tensor([prefix], dtype=torch.long, device=device), use_cache=True)
    return {"length": len(prefix), "cache": _cache_of(out)}


def _fast_batch(decoder, head, rows: list[list[int]], state, plan: LabelPlan, pad_id: int, device, chunk: int):
    """(first-token log-probs [B, F], pair log-probs [B, P]) of prompt rows sharing `state`'s leading tokens."""
    import torch

    kw, shared, b = _cache_kwarg(decoder), (state["length"] if state else 0), len(rows)
    ids, mask, positions = _padded([r[shared:] for r in rows], pad_id, [shared] * b)
    prefix_mask = torch.ones((b, shared), dtype=torch.long)
    extra = {}
    if state:
        extra[kw] = copy.deepcopy(state["cache"])
        extra[kw].batch_repeat_interleave(b)
    out = decoder(
        input_ids=ids.to(device), attention_mask=torch.cat([prefix_mask, mask], 1).to(device),
        position_ids=positions.to(device), use_cache=True, **extra,
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
        lids, lmask, lpos = _padded(plan.carriers[lo:hi] * b, pad_id, [len(r) for r in rows for _ in range(n)])
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


def _plain_batch(model, rows: list[list[int]], plan: LabelPlan, pad_id: int, device, batch_size: int, carriers=None):
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
        ids, mask, _ = _padded([rows[r] + (plan.carriers[c] if c is not None else []) for r, c in part], pad_id)
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


def _agrees(fast: list[float], full: list[float], half: bool) -> bool:
    tolerance = _SELF_CHECK_TOLERANCE_HALF if half else _SELF_CHECK_TOLERANCE
    return all(math.isnan(b) or abs(a - b) <= tolerance * (1 + abs(b)) for a, b in zip(fast, full))


# ----------------------------------------------------------------------------------------------------------------
# Entry point


def score_labels(
    model, tokenizer, prompts: list[list[dict[str, str]]], labels: list[str], *, max_length: int, batch_size: int,
    batch_tokens: int | None = 16384, share_prefix: bool = True, min_shared_prefix: int = 8, logits_chunk: int = 512,
    desc: str = "scoring labels",
) -> LabelScores:
    """Log-probability of each label as the assistant's answer to each conversation prefix (the messages
    `generate_answers` receives), and from it the label-constrained prediction.

    `max_length`: prompt + longest answer tokens (a prompt keeps its last tokens). `batch_size`: prompts per forward
    pass. `batch_tokens`: at most this many key/value positions (prompts × label rows × tokens) in one forward pass
    over the labels, which bounds its memory; None for no bound. `share_prefix` / `min_shared_prefix`: reuse the keys
    and values of leading tokens shared by prompts (at least that many). `logits_chunk`: positions per output-head
    product. The model is put in eval mode for the call and restored.
    """
    import torch

    if not labels:
        raise ValueError("score_labels: the label set is empty; give at least one label")
    if len(set(labels)) != len(labels):
        dup = sorted({x for x in labels if labels.count(x) > 1})
        raise ValueError(f"score_labels: labels must be distinct, {dup} appear more than once")
    prompt_ids, answers = encode_label_prompts(tokenizer, prompts, labels, max_length)
    buckets: dict[tuple, list[int]] = {}
    for i, conts in enumerate(answers):
        buckets.setdefault(tuple(map(tuple, conts)), []).append(i)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    opts: dict[str, Any] = {
        "batch_size": batch_size, "batch_tokens": batch_tokens, "share_prefix": share_prefix,
        "min_shared_prefix": min_shared_prefix, "chunk": logits_chunk,
    }
    results: list[list[float]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), tqdm(total=len(prompts), desc=desc, unit="prompt", leave=False) as bar:
            parts = fast_parts(model)
            for attempt in ([parts, None] if parts is not None else [None]):
                try:
                    for n, (key, members) in enumerate(buckets.items()):
                        plan = plan_labels([list(a) for a in key])
                        check = attempt is not None and n == 0
                        _score_bucket(model, attempt, prompt_ids, members, plan, pad_id, device, results, bar,
                                      check=check, **opts)
                    break
                except _FastPathDisagrees:
                    log.warning("%s: the fast label scoring path disagrees with the model's own forward; using the "
                                "latter (slower)", type(model).__name__)
                    bar.reset()
    finally:
        model.train(was_training)
    return LabelScores(labels=list(labels), logprobs=results)


def _batches(order: list[int], cost, batch_size: int, batch_tokens: int | None):
    """Consecutive runs of `order` (longest prompt first) of at most `batch_size` prompts and `batch_tokens` positions."""
    batch: list[int] = []
    for i in order:
        too_big = bool(batch) and batch_tokens is not None and (len(batch) + 1) * cost(batch[0]) > batch_tokens
        if batch and (len(batch) >= batch_size or too_big):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def _score_bucket(model, parts, prompt_ids, members, plan: LabelPlan, pad_id, device, results, bar, *, check: bool,
                  batch_size: int, batch_tokens: int | None, share_prefix: bool, min_shared_prefix: int, chunk: int):
    """Score the prompts `members` (which share their labels' answer tokens) into `results`."""
    if parts is None:
        groups = [(0, sorted(members, key=lambda i: len(prompt_ids[i]), reverse=True))]
    else:  # one token appended: every prompt keeps at least one token of its own after the shared part
        seqs = [prompt_ids[i] + [pad_id] for i in members]
        found = plan_batches(seqs, batch_size=len(seqs) + 1, share_prefix=share_prefix, min_shared_prefix=min_shared_prefix)
        groups = [(len(g.prefix), [members[k] for b in g.batches for k in b]) for g in found]
    weight = getattr(parts[1], "weight", None) if parts else None
    half = weight is not None and weight.dtype.is_floating_point and weight.element_size() < 4
    for shared, order in groups:
        state = _prefix_cache(parts[0], prompt_ids[order[0]][:shared], device) if parts and shared else None
        for batch in _batches(order, lambda i: plan.positions_per_prompt(len(prompt_ids[i])), batch_size, batch_tokens):
            rows = [prompt_ids[k] for k in batch]
            if parts is None:
                per_pass = max(1, len(plan.carriers)) * batch_size
                if batch_tokens is not None:
                    per_pass = max(1, min(per_pass, batch_tokens // (len(rows[0]) + max(map(len, plan.carriers), default=0))))
                first, pair = _plain_batch(model, rows, plan, pad_id, device, per_pass)
            else:
                first, pair = _fast_batch(parts[0], parts[1], rows, state, plan, pad_id, device, chunk)
            if check:  # the shortest prompt of the first batch, through its longest and shortest label rows
                check = False
                probe = sorted({0, len(plan.carriers) - 1}) if plan.carriers else []
                ref_first, ref_pair = _plain_batch(model, rows[-1:], plan, pad_id, device, 2, carriers=probe)
                fast, full = (plan.combine(f[-1].tolist(), p[-1].tolist()) for f, p in ((first, pair), (ref_first, ref_pair)))
                if not _agrees(fast, full, half):  # labels whose rows were not probed are NaN in `full`
                    raise _FastPathDisagrees
            for r, k in enumerate(batch):
                results[k] = plan.combine(first[r].tolist(), pair[r].tolist())
            bar.update(len(batch))
