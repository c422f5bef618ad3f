"""Memorization by discoverable extraction, read from one teacher-forced forward pass.

For a row, the prompt plus the first part of the gold answer (`evaluate.memorization_prefix_fraction`) is given and
the greedy continuation is compared with the rest of the answer. Exact extraction: the continuation reproduces the
rest token for token. Near-verbatim: at least `evaluate.near_verbatim_agreement` of the rest's tokens are the model's
greedy choice given the true text before them. Greedy decoding reproduces the rest exactly if and only if every
next-token argmax along it is the gold token, so both are read from a single forward pass per row. Training rows are
checked against control rows of the same data held out of training (the validation slice, never the test rows, whose
answers may repeat training answers): the excess of (tuned − base) on training rows over control rows is the signal.

Grounded data (`evaluate.memorization_context: drop_system`): each prompt carries the text its answer is read from, so
a model that learned to read reproduces trained and held-out answers alike and the excess cannot separate them; the
check then asks without the system message that carries that text, and only recall reproduces an answer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from tasks.common.measure import bootstrap
from tasks.common.models import assistant_spans
from tasks.common.nll import fast_parts
from tasks.common.records import prompt_and_response
from tasks.config import FewtuneConfig
from tasks.evaluate.robustness import rephrase_groups


def _row_rank(record: dict[str, Any], seed: int) -> str:
    return hashlib.sha256(f"memorization:{seed}:{record['id']}".encode()).hexdigest()


def sample_rows(records: list[dict[str, Any]], n: int, seed: int) -> list[dict[str, Any]]:
    """Up to `n` rows picked by a seeded hash of their ids (the same rows every run)."""
    return sorted(records, key=lambda r: _row_rank(r, seed))[:n]


@dataclass
class ExtractionCase:
    """One row prepared for the extraction check: the token ids up to the end of the part to reproduce."""

    id: str
    input_ids: list[int]
    prefix_end: int  # index of the first token to reproduce
    suffix_end: int  # one past the last token to reproduce


def extraction_case(tokenizer, record: dict[str, Any], cfg: FewtuneConfig) -> ExtractionCase | str:
    """The row's prompt + answer tokens split into the given prefix and the part to reproduce, or why it is skipped."""
    e = cfg.evaluate
    _, answer = prompt_and_response(record)
    messages = record["messages"]
    if e.memorization_context == "drop_system":
        messages = [m for m in messages if m.get("role") != "system"]
    full, spans = assistant_spans(tokenizer, messages)
    start = spans[-1][0]
    if full[start : start + len(answer)] != answer:
        start = full.rfind(answer)
        if start < 0:
            return "the chat template changes the answer text"
    end = start + len(answer)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    positions = [i for i, (s, t) in enumerate(enc["offset_mapping"]) if start <= s < end and t > s]
    if len(positions) < 2:
        return "answer shorter than 2 tokens"
    first = positions[0]
    n = positions[-1] + 1 - first
    prefix = max(1, round(n * e.memorization_prefix_fraction))
    suffix = min(n - prefix, e.memorization_max_suffix_tokens)
    if suffix < e.memorization_min_suffix_tokens:
        return f"fewer than {e.memorization_min_suffix_tokens} answer tokens left to reproduce"
    stop = first + prefix + suffix
    if stop > cfg.model.max_length:
        return f"longer than model.max_length ({cfg.model.max_length} tokens)"
    return ExtractionCase(str(record["id"]), enc["input_ids"][:stop], first + prefix, stop)


def extraction_cases(
    tokenizer, sets: dict[str, list[dict[str, Any]]], cfg: FewtuneConfig
) -> tuple[dict[str, list[ExtractionCase]], dict[str, dict[str, str]]]:
    """Per row set (train, control): the cases of up to `evaluate.memorization_rows` sampled rows, and the rows
    skipped with why. The check runs only when both sets have cases."""
    e = cfg.evaluate
    cases: dict[str, list[ExtractionCase]] = {}
    skipped: dict[str, dict[str, str]] = {}
    for name, rows in sets.items():
        cases[name], skipped[name] = [], {}
        for r in sample_rows(rows, e.memorization_rows, e.bootstrap_seed):
            case = extraction_case(tokenizer, r, cfg)
            if isinstance(case, str):
                skipped[name][str(r["id"])] = case
            else:
                cases[name].append(case)
    return cases, skipped


def extraction_checks(
    model, tokenizer, cases: list[ExtractionCase], cfg: FewtuneConfig, desc: str
) -> list[dict[str, Any]]:
    """Per case: whether greedy decoding after the prefix reproduces the rest exactly, and the token agreement."""
    model.eval()
    return _checks(tokenizer, cases, cfg, desc, next(model.parameters()).device,
                   lambda ids, mask, spans: [_greedy_guesses(model, ids, mask, spans)])[0]


def paired_extraction_checks(twin, tokenizer, cases: list[ExtractionCase], cfg: FewtuneConfig, desc: str
                             ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | None:
    """(base, tuned) `extraction_checks` of the same cases from one pass per batch, the layers below the adapter run
    once for both models (`Twin.hidden`); None when the twin cannot share them (check each model on its own)."""
    parts = fast_parts(twin.model)
    if not twin.shared or parts is None:
        return None
    if not cases:
        return [], []
    head, state = parts[1], {"twin": None}

    def guesses(ids, mask, spans):
        if state["twin"] is None:  # the shortcut checked against two whole passes on the first batch
            state["twin"] = twin.checked(ids, mask)
        tuned, base = state["twin"].hidden(ids, mask)
        return [_picked(head, base, spans), _picked(head, tuned, spans)]

    twin.model.eval()
    base, tuned = _checks(tokenizer, cases, cfg, desc, next(twin.model.parameters()).device, guesses)
    return base, tuned


def paired_memorization(twin, tokenizer, cases: dict[str, list[ExtractionCase]], cfg: FewtuneConfig, cache,
                        dtype: str) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Both models' extraction checks of every row set ({"baseline": {rows: checks}, "tuned": ...}), from one pass
    per batch where the twin shares its lower layers, else the base model's from whole passes (the tuned model's then
    left to its own pass); the base model's stored in the baseline `cache` under `dtype`."""
    checks: dict[str, dict[str, list[dict[str, Any]]]] = {"baseline": {}, "tuned": {}}
    for rows, rows_cases in cases.items():
        got = paired_extraction_checks(twin, tokenizer, rows_cases, cfg, f"evaluate: baseline and tuned {rows} extraction")
        if got is None:
            with twin.base():
                checks["baseline"][rows] = extraction_checks(twin.model, tokenizer, rows_cases, cfg,
                                                             f"evaluate: baseline {rows} extraction")
        else:
            checks["baseline"][rows], checks["tuned"][rows] = got
    cache.put("memorization", [cases, dtype], checks["baseline"])
    return checks if len(checks["tuned"]) == len(cases) else {"baseline": checks["baseline"]}


def _checks(tokenizer, cases: list[ExtractionCase], cfg: FewtuneConfig, desc: str, device,
            guesses) -> list[list[dict[str, Any]]]:
    """The extraction checks of `cases`, length-sorted batches of `score.batch_size`, for each model `guesses(ids,
    mask, spans)` gives the greedy choices of (one list per model, each a list per row)."""
    import torch

    pad = tokenizer.pad_token_id
    order = sorted(range(len(cases)), key=lambda i: len(cases[i].input_ids), reverse=True)
    out: list[list[dict[str, Any]]] = []
    bs = cfg.score.batch_size
    with torch.inference_mode(), tqdm(total=len(cases), desc=desc, unit="row", leave=False) as bar:
        for begin in range(0, len(order), bs):
            idx = order[begin : begin + bs]
            width = max(len(cases[i].input_ids) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                n = len(cases[i].input_ids)
                ids[row, :n] = torch.tensor(cases[i].input_ids)
                mask[row, :n] = 1
            found = guesses(ids.to(device), mask.to(device),
                            [(cases[i].prefix_end - 1, cases[i].suffix_end - 1) for i in idx])
            while len(out) < len(found):
                out.append([{} for _ in cases])
            for per_model, model_guesses in zip(out, found):
                for row, i in enumerate(idx):
                    per_model[i] = _check(tokenizer, cases[i], model_guesses[row])
            bar.update(len(idx))
    return out or [[]]


def _check(tokenizer, c: ExtractionCase, guess: list[int]) -> dict[str, Any]:
    gold = c.input_ids[c.prefix_end : c.suffix_end]
    hits = sum(g == t for g, t in zip(guess, gold))
    return {
        "id": c.id,
        "exact": hits == len(gold),
        "agreement": round(hits / len(gold), 4),
        "prefix": tokenizer.decode(c.input_ids[: c.prefix_end][-24:], skip_special_tokens=True),
        "rest": tokenizer.decode(gold, skip_special_tokens=True),
        "greedy": tokenizer.decode(guess, skip_special_tokens=True),
    }


def _greedy_guesses(model, ids, mask, spans: list[tuple[int, int]]) -> list[list[int]]:
    """Per row, the greedy choice at each position of its span [start, end): the token predicted for position + 1.
    The output head runs on those positions only (the rest of a row, a policy entry or a question, is context), and
    the choice is `max(...).indices` (argmax's first maximum, ~3x faster on bf16 logits)."""
    parts = fast_parts(model)
    if parts is None:  # a model that needs its own forward (prompt learning, rescaled logits)
        best = model(input_ids=ids, attention_mask=mask).logits.max(dim=-1).indices.cpu()
        return [best[row, a:b].tolist() for row, (a, b) in enumerate(spans)]
    decoder, head = parts
    return _picked(head, decoder(input_ids=ids, attention_mask=mask).last_hidden_state, spans)


def _picked(head, hidden, spans: list[tuple[int, int]]) -> list[list[int]]:
    """The head's greedy choices at each row's span of final hidden states."""
    import torch

    best = head(torch.cat([hidden[row, a:b] for row, (a, b) in enumerate(spans)])).max(dim=-1).indices.cpu().tolist()
    out, start = [], 0
    for a, b in spans:
        out.append(best[start : start + b - a])
        start += b - a
    return out


def _rates(checks: list[dict[str, Any]], threshold: float) -> dict[str, float]:
    n = len(checks)
    return {
        "exact": round(sum(c["exact"] for c in checks) / n, 4) if n else float("nan"),
        "near_verbatim": round(sum(c["agreement"] >= threshold for c in checks) / n, 4) if n else float("nan"),
    }


def memorization_summary(
    checks: dict[str, dict[str, list[dict[str, Any]]]], cfg: FewtuneConfig, skipped: dict[str, dict[str, str]]
) -> dict[str, Any]:
    """Extraction rates per model and row set, and the excess: (tuned − base) on training rows minus on control rows.

    `checks[model][rows]`, model in baseline/tuned, rows in train/control, with the same rows for both models.
    """
    e = cfg.evaluate
    threshold = e.near_verbatim_agreement
    result: dict[str, Any] = {
        "prefix_fraction": e.memorization_prefix_fraction,
        "max_suffix_tokens": e.memorization_max_suffix_tokens,
        "near_verbatim_agreement": threshold,
        "method": "teacher-forced greedy check: exact = greedy continuation reproduces the rest token for token",
        "context": e.memorization_context,
        "rows": {k: len(v) for k, v in checks["tuned"].items()},
        "skipped": {k: len(v) for k, v in skipped.items()},
        "skipped_reasons": sorted({why for v in skipped.values() for why in v.values()}),
    }
    for model in ("baseline", "tuned"):
        result[model] = {rows: _rates(c, threshold) for rows, c in checks[model].items()}
    n_train, n_ctrl = len(checks["tuned"]["train"]), len(checks["tuned"]["control"])
    for kind in ("exact", "near_verbatim"):

        def hit(model: str, rows: str, i: int, kind: str = kind) -> float:
            c = checks[model][rows][i]
            return float(c["exact"] if kind == "exact" else c["agreement"] >= threshold)

        def stat(idx: list[Sequence[int]], hit=hit) -> float:
            tr = [hit("tuned", "train", i) - hit("baseline", "train", i) for i in idx[0]]
            ct = [hit("tuned", "control", i) - hit("baseline", "control", i) for i in idx[1]]
            return sum(tr) / len(tr) - sum(ct) / len(ct)

        if n_train and n_ctrl:
            result[f"excess_{kind}"] = bootstrap(
                stat, [n_train, n_ctrl], e.bootstrap_samples, e.confidence, e.bootstrap_seed
            ).to_dict()
        else:
            result[f"excess_{kind}"] = None
    n = e.examples_in_summary
    result["examples"] = [
        {"id": b["id"], "prefix": b["prefix"], "rest": b["rest"], "baseline": b["greedy"], "tuned": t["greedy"],
         "tuned_exact": t["exact"], "baseline_exact": b["exact"]}
        for b, t in zip(checks["baseline"]["train"][:n], checks["tuned"]["train"][:n])
    ]
    return result


def memorization_result(
    checks: dict[str, dict[str, list[dict[str, Any]]]],
    cases: dict[str, list[ExtractionCase]],
    skipped: dict[str, dict[str, str]],
    cfg: FewtuneConfig,
) -> dict[str, Any]:
    """The summary when the check ran (status measured), else why no row could be checked: not_applicable when the
    answers are too short to split into a given part and a part to reproduce, else not_measured (a blocking gap)."""
    if checks:
        return {"status": "measured", "reason": "", **memorization_summary(checks, cfg, skipped)}
    why = sorted({w for v in skipped.values() for w in v.values()})
    # Not applicable only when no row of either set could be checked, every one for being too short; a set left
    # without cases while the other has some (a control of too-short rows) cannot be compared: not measured.
    nothing = not any(cases.values())
    short = nothing and bool(why) and all("shorter than" in w or "left to reproduce" in w for w in why)
    return {
        "status": "not_applicable" if short else "not_measured",
        "reason": "no row could be checked: " + ("; ".join(why) or "no rows"),
        "skipped_reasons": why,
        "rows": {k: len(v) for k, v in cases.items()},
    }


def memorization_plan(
    task: str, trained: list[dict[str, Any]], held_out: list[dict[str, Any]] | None, control: list[dict[str, Any]],
    cfg: FewtuneConfig,
) -> dict[str, Any] | None:
    """Why memorization is not measured (not applicable, off, or no control rows), or None when it is.

    `held_out`: the validation slice; `control`: those of its rows whose answer is not also a trained answer."""
    if task == "classification":
        return {"status": "not_applicable", "reason": "the answers are labels: a label is reproduced by any model that "
                "learned the task, so verbatim extraction measures nothing"}
    if not cfg.evaluate.memorization_rows:
        return {"status": "off", "reason": "turned off (evaluate.memorization_rows: 0)"}
    if not trained or not held_out:
        return {"status": "not_measured", "reason": "no rows of the training data held out of training (the "
                "validation slice) to compare with: the control cannot come from the test rows"}
    if not control:
        return {"status": "not_applicable", "reason": f"all {len(held_out)} held-out training rows repeat an answer that "
                "is also trained under another prompt: the data is a fixed set of answers asked in several ways, so "
                "reproducing them is the task (as with labels); the generalization gap (training vs rephrased "
                "prompts of the same answers) is the signal for such data"}
    return None


def clean_control(held_out: list[dict[str, Any]] | None, trained: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The held-out rows whose answer is not a trained answer: a control no training row has shown the model."""
    if not held_out:
        return []
    groups, _ = rephrase_groups(held_out, trained)
    return [r for r in held_out if groups.get(r["id"]) == "novel"]
