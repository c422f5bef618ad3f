"""Shared helpers of the score stage tests (tests/test_score_*.py): demo rows and reference NLLs."""

from __future__ import annotations

from pathlib import Path

from tasks.common.records import load_records

REPO = Path(__file__).resolve().parent.parent


def demo_rows(n: int) -> list[dict]:
    return load_records(REPO / "examples/support/train.jsonl").records[:n]


def reference_nlls(model, ids: list[int]) -> list[float]:
    """One sequence alone through the model's own forward: -log_softmax(logits)[next token] at every position."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    return (-logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]).tolist()
