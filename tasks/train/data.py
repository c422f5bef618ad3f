"""The rows training learns from and the order it sees them in: the validation slice, the replay mix, the chat
encoding (loss on answer tokens only), the padding collator and the resumable length-grouped sampler."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Iterator

from tasks.common.models import EncodingError, encode_chat
from tasks.common.records import split_train_eval, training_split
from tasks.config import FewtuneConfig
from tasks.train.plan import choose_replay_fraction


@dataclass
class TrainingMix:
    """The training rows (validation slice held out), the validation slice, the replay rows mixed in, the replay
    share with its reason, where the replay rows came from, and the probe rows left for measuring forgetting."""

    train_rows: list[dict[str, Any]]
    val_rows: list[dict[str, Any]]
    mixed: list[dict[str, Any]]
    fraction: float
    fraction_why: str
    source: str | None
    probe_eval: list[dict[str, Any]] | None


def training_mix(
    records: list[dict[str, Any]],
    cfg: FewtuneConfig,
    probe: list[dict[str, Any]] | None,
    replay: list[dict[str, Any]] | None,
) -> TrainingMix:
    """Rows: the validation slice (domain rows only), then the replay mix from `replay`, else from part of `probe`."""
    t = cfg.train
    train_rows, val_rows = training_split(records, t.validation_fraction, t.seed)
    if not val_rows or not train_rows:
        raise EncodingError(
            f"{len(records)} training row(s) are too few to hold out a validation slice for early stopping; "
            "add rows (validate.min_rows) or raise train.validation_fraction"
        )
    fraction, fraction_why = choose_replay_fraction(len(records), cfg)
    probe_eval: list[dict[str, Any]] | None = None
    source: str | None = None
    if replay:
        pool, source = replay, "data.replay"
    elif probe and fraction > 0:
        pool, probe_eval = split_probe(probe, cfg)
        source = f"data.probe ({len(pool)} of {len(probe)} rows; forgetting is measured on the other {len(probe_eval)})"
        if not pool:
            probe_eval, source = None, None
    else:
        pool = []
    mixed = replay_rows(pool, fraction, len(train_rows), t.seed)
    if fraction > 0 and not pool:
        fraction_why += "; no replay source (set data.replay or data.probe): no replay rows"
    elif fraction > 0 and len(mixed) < round(len(train_rows) * fraction / (1 - fraction)):
        fraction_why += f"; the pool holds only {len(pool)} rows: all of them are used"
    return TrainingMix(train_rows, val_rows, mixed, fraction, fraction_why, source, probe_eval)


def split_probe(probe: list[dict[str, Any]], cfg: FewtuneConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(replay pool, measurement rows): a seeded hash of the row ids decides; the same probe always splits the same."""
    measure, pool = split_train_eval(probe, cfg.train.replay_probe_share, cfg.train.seed)
    return pool, measure


def replay_rows(pool: list[dict[str, Any]], fraction: float, n_train: int, seed: int) -> list[dict[str, Any]]:
    """`fraction` of the final training mix drawn from `pool` (without repeats, so at most the whole pool)."""
    if fraction <= 0 or not pool:
        return []
    wanted = round(n_train * fraction / (1 - fraction))
    ranked = sorted(pool, key=lambda r: hashlib.sha256(f"{seed}:{r['id']}".encode()).hexdigest())  # any file order
    return [{**r, "id": f"replay-{r['id']}"} for r in ranked[:wanted]]


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
