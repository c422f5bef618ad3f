"""The real embedded base model (SmolLM2-135M-Instruct): encoding, scoring, a short LoRA run, baseline vs tuned.

Marked `slow` (about two minutes on two CPU cores); run with `pytest -m slow`.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tasks.common.models import encode_chat, load_model, load_tokenizer
from tasks.common.records import load_records
from tasks.config import FewtuneConfig

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_real_model_scores_trains_and_improves(real_base_model, tmp_path):
    from tasks.evaluate import evaluate_models
    from tasks.score import score_records
    from tasks.train import train_adapter

    train = load_records(REPO / "examples/support/train.jsonl").records[:64]
    test = load_records(REPO / "examples/support/test.jsonl").records[:6]
    tok = load_tokenizer(real_base_model.path)

    enc = encode_chat(tok, train[0], 256)
    labelled = tok.decode([t for t in enc["labels"] if t != -100])
    assert labelled == train[0]["messages"][-1]["content"] + "<|im_end|>\n"

    model = load_model(real_base_model.path)
    scored = score_records(train[:16], model, tok, max_length=160, batch_size=8, outlier_z=3.5, out_path=tmp_path / "s.parquet")
    # A real instruction-tuned model finds shop answers surprising, but not random (vocab 49,152).
    assert 2 < scored.corpus_ppl < 500
    assert all(math.isfinite(r["ppl"]) for r in scored.rows)
    del model

    cfg = FewtuneConfig(
        data={"train": "-"},
        model={"max_length": 160},
        train={"epochs": 2, "lora_top_layers": 4, "learning_rate": 1e-3, "batch_size": 8},
        evaluate={"max_new_tokens": 24, "batch_size": 6, "probe_max_rows": 10, "probe_max_new_tokens": 8},
    )
    trained = train_adapter(train, cfg, real_base_model.path, tmp_path / "train")
    assert trained.best_val_loss is not None and trained.steps >= 14
    result = evaluate_models(test, None, cfg, real_base_model.path, trained.adapter_path, tmp_path / "eval")
    # Two short epochs on the shop's answers makes the reference answers of rephrased questions far less surprising.
    assert result.tuned["eval_ppl"] < 0.75 * result.baseline["eval_ppl"]
    assert all(isinstance(r["tuned"], str) and r["tuned"] for r in result.examples)
