"""Memorization on grounded data (`evaluate.memorization_context: drop_system`): the extraction check asks without the
system message that carries the text an answer is read from, and still finds a model that recalls its rows."""

from __future__ import annotations

import pytest

from tasks.common.models import load_model, load_tokenizer
from tasks.config import FewtuneConfig
from tasks.evaluate import extraction_case, extraction_checks

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(**evaluate) -> FewtuneConfig:
    return FewtuneConfig(
        data={"train": "-"},
        model={"max_length": 512},
        evaluate={"max_new_tokens": 8, "batch_size": 8, "bootstrap_samples": 400, "memorization_min_suffix_tokens": 2,
                  **evaluate},
        score={"batch_size": 8},
    )


def test_extraction_case_asks_grounded_rows_without_the_text_they_are_read_from(tiny_model_dir) -> None:
    """drop_system: the system message carrying the grounding entry is not in the checked prompt, so a model can only
    reproduce the answer by recall; the part to reproduce is the same tokens either way."""
    tok = load_tokenizer(str(tiny_model_dir))
    entry = "[KB-07] REPAIR PRICES: Basic service costs 45 euros | Full service costs 95 euros."
    answer = "A basic service is 45 euros and a full service is 95 euros, parts extra."
    row = {"id": "g", "messages": [{"role": "system", "content": f"Answer from the entry below.\n{entry}"},
                                   {"role": "user", "content": "What does a service cost?"},
                                   {"role": "assistant", "content": answer}]}
    kept = extraction_case(tok, row, _cfg())
    dropped = extraction_case(tok, row, _cfg(memorization_context="drop_system"))
    assert not isinstance(kept, str) and not isinstance(dropped, str)
    assert "REPAIR PRICES" in tok.decode(kept.input_ids) and "REPAIR PRICES" not in tok.decode(dropped.input_ids)
    assert "What does a service cost?" in tok.decode(dropped.input_ids)
    rest = slice(kept.prefix_end, kept.suffix_end), slice(dropped.prefix_end, dropped.suffix_end)
    assert kept.input_ids[rest[0]] == dropped.input_ids[rest[1]]
    assert tok.decode(dropped.input_ids[dropped.prefix_end : dropped.suffix_end]).strip() in answer


def test_extraction_without_the_entry_finds_a_model_that_memorized_its_grounded_rows(tiny_model_dir) -> None:
    """The check's power on grounded data: a model trained until it recalls three grounded answers reproduces them
    with the entry taken away, and the held-out rows (same format, never trained) it does not: a large excess."""
    import copy

    import torch

    from tasks.common.models import encode_chat
    from tasks.evaluate.memorization import memorization_summary

    def row(i: int, item: str, price: int, days: int) -> dict:
        entry = f"[KB-{i:02d}] {item.upper()}: Costs {price} euros | Ready in {days} days."
        return {"id": f"r{i}", "messages": [
            {"role": "system", "content": f"Answer from the entry below.\n{entry}"},
            {"role": "user", "content": f"How much is the {item} and when is it ready?"},
            {"role": "assistant", "content": f"The {item} costs {price} euros and it is ready in {days} working days."}]}

    trained = [row(1, "brake check", 45, 3), row(2, "wheel truing", 27, 2), row(3, "chain swap", 61, 4)]
    control = [row(4, "gear tune", 38, 5), row(5, "tyre fitting", 19, 1), row(6, "fork service", 83, 6)]
    cfg = _cfg(memorization_context="drop_system")
    tok, base = load_tokenizer(str(tiny_model_dir)), load_model(str(tiny_model_dir))
    tuned = copy.deepcopy(base)
    torch.manual_seed(0)
    batch = [encode_chat(tok, r, 256) for r in trained]
    opt = torch.optim.AdamW(tuned.parameters(), lr=3e-3)
    tuned.train()
    for _ in range(60):
        for enc in batch:
            out = tuned(input_ids=torch.tensor([enc["input_ids"]]), labels=torch.tensor([enc["labels"]]))
            out.loss.backward()
            opt.step()
            opt.zero_grad()
    cases = {"train": [extraction_case(tok, r, cfg) for r in trained], "control": [extraction_case(tok, r, cfg) for r in control]}
    assert all(not isinstance(c, str) for v in cases.values() for c in v), cases
    checks = {name: {rows: extraction_checks(m, tok, cs, cfg, "t") for rows, cs in cases.items()}
              for name, m in (("baseline", base), ("tuned", tuned))}
    summary = memorization_summary(checks, cfg, {"train": {}, "control": {}})
    assert summary["context"] == "drop_system"
    assert summary["tuned"]["train"]["near_verbatim"] == 1.0, summary["tuned"]
    assert summary["excess_near_verbatim"]["value"] >= 0.6, summary["excess_near_verbatim"]


def test_the_head_on_the_checked_positions_gives_the_full_forwards_guesses(tiny_model_dir, monkeypatch) -> None:
    """The extraction check runs the output head on the positions it compares only; the greedy guesses equal those of
    the model's own forward (every position's logits), row by row, on rows of different lengths."""
    import tasks.evaluate.memorization as memorization

    tok, model = load_tokenizer(str(tiny_model_dir)), load_model(str(tiny_model_dir)).eval()
    rows = [{"id": f"r{i}", "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for i, (q, a) in enumerate([("When do you open?", "We open at nine every weekday and at ten on Saturdays."),
                                        ("Phone?", "Call 0161 496 0734 between nine and five."),
                                        ("Do you rent e-bikes for a whole week?", "Yes, 180 euros a week, lock included.")])]
    cases = [extraction_case(tok, r, _cfg()) for r in rows]
    assert all(not isinstance(c, str) for c in cases)
    fast = extraction_checks(model, tok, cases, _cfg(), "fast")
    monkeypatch.setattr(memorization, "fast_parts", lambda _model: None)
    whole = extraction_checks(model, tok, cases, _cfg(), "whole")
    assert [c["greedy"] for c in fast] == [c["greedy"] for c in whole] and fast == whole
    assert all(c["greedy"] for c in fast)
