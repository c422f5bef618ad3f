"""Label-constrained prediction: the log-probability of each label of a closed set as the assistant's whole answer.

A label's answer tokens are those the chat template writes for an assistant turn holding the label, up to and
including the end-of-turn token (`<|im_end|>` in ChatML): the end token is what tells `transfer` from
`transfer_money`. The prediction is the label with the highest log-probability, so it is always one of the labels.

The work is shared wherever the model allows it:
- prompts are grouped by their shared leading tokens (system prompt, label list, few-shot examples), whose keys and
  values are computed once per group and reused by every prompt of the group;
- each prompt's own tokens run once; the log-probability of every label's first token is read from the prompt's last
  position (labels that start alike share it);
- the rest of the labels' tokens run in the same forward, packed after each prompt's own tokens under a custom
  attention mask (each label row sees the prompt and its own earlier tokens only), where the attention takes such a
  mask; elsewhere on copies of the prompts' keys and values, one per label row, labels of similar lengths together
  (`tasks.common.label_passes`); a label whose fed tokens begin another's (`transfer` / `transfer_money`) rides on
  that label's row;
- log-probabilities are computed in float32 for the positions that need them only, in chunks.
Models that manage their own keys and values (prompt-learning adapters such as prefix tuning) and models whose logits
are not head(decoder(x)) use their own full forward on whole prompt+label rows instead. A self-check on the first
batch compares the fast path with that full forward before the fast path scores the rest.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from tasks.common.label_passes import packed_attention, packed_batch, packed_cost, plain_batch, prefix_cache, rows_batch
from tasks.common.models import render
from tasks.common.nll import fast_parts, plan_batches

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


class _FastPathDisagrees(RuntimeError):
    pass


def _agrees(fast: list[float], full: list[float], half: bool) -> bool:
    tolerance = _SELF_CHECK_TOLERANCE_HALF if half else _SELF_CHECK_TOLERANCE
    return all(math.isnan(b) or abs(a - b) <= tolerance * (1 + abs(b)) for a, b in zip(fast, full))


# ----------------------------------------------------------------------------------------------------------------
# Entry point


def score_labels(
    model, tokenizer, prompts: list[list[dict[str, str]]], labels: list[str], *, max_length: int, batch_size: int,
    batch_tokens: int | None = 16384, share_prefix: bool = True, min_shared_prefix: int = 8, logits_chunk: int = 512,
    desc: str = "scoring labels", packed: bool = True,
) -> LabelScores:
    """Log-probability of each label as the assistant's answer to each conversation prefix (the messages
    `generate_answers` receives), and from it the label-constrained prediction.

    `max_length`: prompt + longest answer tokens (a prompt keeps its last tokens). `batch_size`: prompts per forward
    pass. `batch_tokens`: at most this many key/value positions (prompts × label rows × tokens) in one forward pass
    over the labels, which bounds its memory; None for no bound. `share_prefix` / `min_shared_prefix`: reuse the keys
    and values of leading tokens shared by prompts (at least that many). `logits_chunk`: positions per output-head
    product. `packed`: one forward per batch with every label row packed after its prompt under a custom attention
    mask, where the attention takes one (`tasks.common.label_passes`); False: label rows on copies of each prompt's
    keys and values. The model is put in eval mode for the call and restored.
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
            attention = packed_attention(parts[0]) if parts is not None and packed else None
            modes = (["packed"] if attention else []) + (["rows"] if parts is not None else []) + ["plain"]
            for m, mode in enumerate(modes):
                try:
                    for n, (key, members) in enumerate(buckets.items()):
                        plan = plan_labels([list(a) for a in key])
                        _score_bucket(model, parts, mode, attention, prompt_ids, members, plan, pad_id, device, results,
                                      bar, check=mode != "plain" and n == 0, **opts)
                    break
                except _FastPathDisagrees:
                    later = "per-label rows" if modes[m + 1] == "rows" else "the model's own forward (slower)"
                    log.warning("%s: the %s label scoring path disagrees with the model's own forward; using %s",
                                type(model).__name__, mode, later)
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


def _score_bucket(model, parts, mode: str, attention, prompt_ids, members, plan: LabelPlan, pad_id, device, results, bar,
                  *, check: bool, batch_size: int, batch_tokens: int | None, share_prefix: bool, min_shared_prefix: int,
                  chunk: int):
    """Score the prompts `members` (which share their labels' answer tokens) into `results` by `mode` (packed, rows,
    plain); `check`: compare the first batch's shortest prompt with the model's own forward first."""
    if mode == "plain":
        groups = [(0, sorted(members, key=lambda i: len(prompt_ids[i]), reverse=True))]
    else:  # one token appended: every prompt keeps at least one token of its own after the shared part
        seqs = [prompt_ids[i] + [pad_id] for i in members]
        found = plan_batches(seqs, batch_size=len(seqs) + 1, share_prefix=share_prefix, min_shared_prefix=min_shared_prefix)
        groups = [(len(g.prefix), [members[k] for b in g.batches for k in b]) for g in found]
    weight = getattr(parts[1], "weight", None) if parts else None
    half = weight is not None and weight.dtype.is_floating_point and weight.element_size() < 4
    cost = (lambda i: packed_cost(plan, len(prompt_ids[i]))) if mode == "packed" else (
        lambda i: plan.positions_per_prompt(len(prompt_ids[i])))
    for shared, order in groups:
        state = prefix_cache(parts[0], prompt_ids[order[0]][:shared], device) if mode != "plain" and shared else None
        for batch in _batches(order, cost, batch_size, batch_tokens):
            rows = [prompt_ids[k] for k in batch]
            if mode == "plain":
                per_pass = max(1, len(plan.carriers)) * batch_size
                if batch_tokens is not None:
                    per_pass = max(1, min(per_pass, batch_tokens // (len(rows[0]) + max(map(len, plan.carriers), default=0))))
                first, pair = plain_batch(model, rows, plan, pad_id, device, per_pass)
            elif mode == "packed":
                first, pair = packed_batch(parts[0], parts[1], rows, state, plan, pad_id, device, chunk, attention)
            else:
                first, pair = rows_batch(parts[0], parts[1], rows, state, plan, pad_id, device, chunk)
            if check:  # the shortest prompt of the first batch, through its longest and shortest label rows
                check = False
                probe = sorted({0, len(plan.carriers) - 1}) if plan.carriers else []
                ref_first, ref_pair = plain_batch(model, rows[-1:], plan, pad_id, device, 2, carriers=probe)
                fast, full = (plan.combine(f[-1].tolist(), p[-1].tolist()) for f, p in ((first, pair), (ref_first, ref_pair)))
                if not _agrees(fast, full, half):  # labels whose rows were not probed are NaN in `full`
                    raise _FastPathDisagrees
            for r, k in enumerate(batch):
                results[k] = plan.combine(first[r].tolist(), pair[r].tolist())
            bar.update(len(batch))
