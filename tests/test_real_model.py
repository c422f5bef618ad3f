"""The real embedded base model (SmolLM2-135M-Instruct): encoding and scoring. Training and baseline-vs-tuned
evaluation on the real model are held to the demo's fact floor in `test_demo_facts.py`.

Marked `slow` (seconds on two CPU cores); run with `pytest -m slow`.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tasks.common.models import encode_chat, load_model, load_tokenizer
from tasks.common.records import load_records

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_real_model_encodes_and_scores(real_base_model, tmp_path):
    from tasks.score import score_records

    train = load_records(REPO / "examples/support/train.jsonl").records[:64]
    tok = load_tokenizer(real_base_model.path)

    enc = encode_chat(tok, train[0], 256)
    labelled = tok.decode([t for t in enc["labels"] if t != -100])
    assert labelled == train[0]["messages"][-1]["content"] + "<|im_end|>\n"

    model = load_model(real_base_model.path)
    scored = score_records(train[:16], model, tok, max_length=160, batch_size=8, outlier_z=3.5, out_path=tmp_path / "s.parquet")
    # A real instruction-tuned model finds shop answers surprising, but not random (vocab 49,152).
    assert 2 < scored.corpus_ppl < 500
    assert all(math.isfinite(r["ppl"]) for r in scored.rows)
