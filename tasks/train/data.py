"""The rows training learns from and the order it sees them in: the validation slice, the replay mix (never from
the general-ability probe), the chat encoding (loss on answer tokens only), the padding collator and the resumable
length-grouped sampler."""

from __future__ import annotations

import hashlib
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterator

from tasks.common.general_probe import GeneralProbe, check_replay_overlap, replay_overlaps, replay_prompts
from tasks.common.generation import GenerationSettings, generate_answers
from tasks.common.models import EncodingError, encode_chat
from tasks.common.records import training_split
from tasks.config import FewtuneConfig
from tasks.train.plan import choose_replay_fraction

log = logging.getLogger("fewtune.train")

ON_POLICY = "on-policy"


@dataclass
class TrainingMix:
    """The training rows (validation slice held out), the validation slice, the replay rows mixed in, the replay
    share with its reason and where the replay rows come from. With on-policy replay, `pending` holds the general
    prompts whose base-model answers become the replay rows (`answer_replay`, once the base model is loaded)."""

    train_rows: list[dict[str, Any]]
    val_rows: list[dict[str, Any]]
    mixed: list[dict[str, Any]]
    fraction: float
    fraction_why: str
    source: str | None
    pending: list[dict[str, Any]] = field(default_factory=list)


def replay_wanted(fraction: float, n_train: int) -> int:
    """Replay rows that make `fraction` of the final mix next to `n_train` training rows."""
    return round(n_train * fraction / (1 - fraction)) if fraction > 0 else 0


def training_mix(
    records: list[dict[str, Any]],
    cfg: FewtuneConfig,
    replay: list[dict[str, Any]] | None,
    general: GeneralProbe,
) -> TrainingMix:
    """Rows: the validation slice (domain rows only), then the replay mix: `replay` (data.replay) rows, else general
    prompts for on-policy replay. Replay never comes from the probe: data.replay rows that nearly repeat a probe row
    stop the run (DataError), and general prompts that nearly repeat a data.probe row are left out."""
    t = cfg.train
    train_rows, val_rows = training_split(records, t.validation_fraction, t.seed)
    if not val_rows or not train_rows:
        raise EncodingError(
            f"{len(records)} training row(s) are too few to hold out a validation slice for early stopping; "
            "add rows (validate.min_rows) or raise train.validation_fraction"
        )
    fraction, fraction_why = choose_replay_fraction(len(records), cfg)
    wanted = replay_wanted(fraction, len(train_rows))
    v = cfg.validate_
    mixed: list[dict[str, Any]] = []
    pending: list[dict[str, Any]] = []
    source: str | None = None
    pool: list[dict[str, Any]] = []
    if replay and wanted:
        where = f"data.replay {cfg.data.replay or ''}".strip()
        check_replay_overlap(replay, general, t.replay_overlap_threshold, source=where, shingle_size=v.shingle_size,
                             num_perm=v.minhash_permutations)
        pool, source = replay, "data.replay"
        mixed = replay_rows(pool, fraction, len(train_rows), t.seed)
    elif wanted:
        pool = replay_prompts()
        clash = replay_overlaps(pool, general, t.replay_overlap_threshold, shingle_size=v.shingle_size,
                                num_perm=v.minhash_permutations)
        if clash:
            log.info("on-policy replay: %d general prompt(s) left out, they nearly repeat probe rows", len(clash))
            pool = [r for i, r in enumerate(pool) if i not in clash]
        pending = pick(pool, wanted, t.seed)
        source = ON_POLICY
    if wanted and len(pool) < wanted:
        fraction_why += f"; the pool holds only {len(pool)} rows: all of them are used"
    return TrainingMix(train_rows, val_rows, mixed, fraction, fraction_why, source, pending)


def pick(pool: list[dict[str, Any]], wanted: int, seed: int) -> list[dict[str, Any]]:
    """`wanted` rows of `pool` (at most all of it) chosen by a seeded hash of their ids: the same for any file order."""
    ranked = sorted(pool, key=lambda r: hashlib.sha256(f"{seed}:{r['id']}".encode()).hexdigest())
    return ranked[:wanted]


def replay_rows(pool: list[dict[str, Any]], fraction: float, n_train: int, seed: int) -> list[dict[str, Any]]:
    """`fraction` of the final training mix drawn from `pool` (without repeats, so at most the whole pool)."""
    if fraction <= 0 or not pool:
        return []
    return [{**r, "id": f"replay-{r['id']}"} for r in pick(pool, replay_wanted(fraction, n_train), seed)]


_SENTENCE_END = re.compile(r"(?<!\b\d)(?<!\b\d\d)[.!?](?:[\"')\]]*)(?=\s|$)")  # not a list number ("2.")


def whole_sentences(answer: str) -> str:
    """The answer up to its last complete sentence when it stops mid-sentence (cut by the token budget); an answer
    that ends a sentence, or has no complete sentence at all, is kept as it is."""
    text = answer.rstrip()
    if not text or text[-1] in ".!?\"')]":
        return text
    ends = list(_SENTENCE_END.finditer(text))
    return text[: ends[-1].end()] if ends else text


def answer_replay(model, tokenizer, mix: TrainingMix, general: GeneralProbe, cfg: FewtuneConfig) -> list[dict[str, Any]]:
    """On-policy replay rows: the base `model`'s greedy answers (at most train.replay_max_new_tokens tokens) to the
    mix's pending general prompts; blank answers are dropped. Sets `mix.mixed` and returns it."""
    if not mix.pending:
        return mix.mixed
    t, v = cfg.train, cfg.validate_
    settings = GenerationSettings(max_new_tokens=t.replay_max_new_tokens, max_length=cfg.model.max_length,
                                  batch_size=t.batch_size)
    answers = generate_answers(model, tokenizer, [r["messages"] for r in mix.pending], settings, "replay answers")
    answers = [whole_sentences(a) for a in answers]  # an answer cut by the token budget would teach stopping mid-sentence
    rows = [
        {**r, "id": f"replay-{r['id']}", "messages": [*r["messages"], {"role": "assistant", "content": a}],
         "source": "self_distilled"}
        for r, a in zip(mix.pending, answers)
        if a.strip()
    ]
    # A base-model answer that nearly repeats a probe passage or a data.probe answer is dropped (the prompts were
    # checked before): replay never rehearses what forgetting is measured on.
    overlapping = replay_overlaps(rows, general, t.replay_overlap_threshold, shingle_size=v.shingle_size,
                                  num_perm=v.minhash_permutations)
    if overlapping:
        rows = [r for i, r in enumerate(rows) if i not in overlapping]
        mix.fraction_why += f"; {len(overlapping)} base-model answer(s) that nearly repeat probe rows dropped"
    if len(rows) + len(overlapping) < len(answers):
        mix.fraction_why += f"; {len(answers) - len(rows) - len(overlapping)} blank base-model answer(s) dropped"
    mix.source = f"{ON_POLICY}: the base model's greedy answers to {len(rows)} general prompts (never probe rows)"
    log.info("%s", mix.source)
    mix.mixed = rows
    return rows


def _encode_all(tokenizer, records: list[dict[str, Any]], max_length: int) -> list[dict[str, Any]]:
    rows = []
    for r in records:
        enc = encode_chat(tokenizer, r, max_length)  # a row with no answer token left raises EncodingError here
        enc["length"] = len(enc["input_ids"])
        rows.append(enc)
    return rows


def make_collator(tokenizer):
    """Pads each micro-batch to its longest row; padded labels are -100, so only real answer tokens carry loss."""
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)


class LengthGroupedSampler:
    """Shuffled, length-grouped order that depends only on (seed, epoch): a resumed run sees the same batches.

    Each epoch: shuffle the rows, cut them into groups of `group_batches` micro-batches (at least four groups an
    epoch, so the batches still vary between epochs), sort each group by length, cut the whole order into
    micro-batches, shuffle the full batches (the short last one stays last so batch boundaries hold).
    """

    def __init__(self, lengths: list[int], batch_size: int, group_batches: int, seed: int):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        n_batches = math.ceil(len(self.lengths) / batch_size)
        self.group_size = batch_size * max(1, min(group_batches, n_batches // 4))
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def indices(self) -> list[int]:
        import torch

        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        grouped: list[int] = []
        for start in range(0, len(order), self.group_size):
            grouped += sorted(order[start : start + self.group_size], key=lambda i: self.lengths[i], reverse=True)
        batches = [grouped[i : i + self.batch_size] for i in range(0, len(grouped), self.batch_size)]
        tail = batches.pop() if batches and len(batches[-1]) < self.batch_size else None
        perm = torch.randperm(len(batches), generator=g).tolist()
        batches = [batches[i] for i in perm] + ([tail] if tail else [])
        return [i for b in batches for i in b]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices())
