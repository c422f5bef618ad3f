"""Helpers shared by the train stage's test modules (tests/test_train_*.py)."""

from __future__ import annotations

import json
from pathlib import Path

from tasks.common.records import load_records
from tasks.config import FewtuneConfig

REPO = Path(__file__).resolve().parent.parent
GiB = 2**30


def make_cfg(dtype: str = "float32", **train) -> FewtuneConfig:
    """A train-stage config on the tiny model. `dtype` is pinned (float32 by default): the tests compare losses and
    answers, and `model.dtype: auto` would pick bf16 on CPUs with AVX512-BF16 or AMX and fp32 elsewhere."""
    return FewtuneConfig(data={"train": "-"}, model={"max_length": 64, "dtype": dtype}, train=train)


def demo_rows(n: int) -> list[dict]:
    return load_records(REPO / "examples/support/train.jsonl").records[:n]


def history(result) -> list[dict]:
    return json.loads((Path(result.adapter_path).parent / "train_log.json").read_text())


def curve(log: list[dict]) -> list[tuple]:
    return [(h["step"], h.get("loss"), h.get("eval_loss")) for h in log if "loss" in h or "eval_loss" in h]
