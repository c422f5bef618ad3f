"""The evaluation's row-level files: every test prompt with both models' answers and scores, and every probe
question with both models' answers, right or wrong."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.common.general_probe import GeneralProbe
from tasks.common.measure import Scored
from tasks.common.records import prompt_and_response, write_jsonl

SIDES = ("baseline", "tuned")


def prediction_rows(records: list[dict[str, Any]], prompts: list, refs: list[str], answers: dict[str, list[str]],
                    groups: dict[str, str], scored: dict[str, dict[str, Scored]], eval_ppl: dict[str, Scored],
                    labels: list[str] | None, label_scores: dict[str, Any], baselines: dict[str, Any] | None,
                    baseline_predictions: dict[str, list[str]]) -> list[dict[str, Any]]:
    """One row per test prompt: the prompt, reference, both answers, its group (rephrased or novel), each metric's
    row statistic, the reference's NLL under both models; for labelled data also both models' label probabilities
    and the fair baselines' predictions."""
    probabilities = {m: s.probabilities() for m, s in label_scores.items()}
    rows = []
    for i, (r, prompt, ref) in enumerate(zip(records, prompts, refs)):
        row = {
            "id": r["id"],
            "prompt": prompt[-1]["content"] if prompt else "",
            "reference": ref,
            "baseline": answers["baseline"][i],
            "tuned": answers["tuned"][i],
            "group": groups.get(r["id"], "novel"),
            "scores": {m: {k: s.items[i] for k, s in scored[m].items()} for m in SIDES},
            "eval_nll": {m: list(eval_ppl[m].items[i]) for m in SIDES},
        }
        if labels is not None:
            row["probabilities"] = {m: {lab: round(p, 5) for lab, p in zip(labels, probabilities[m][i])} for m in SIDES}
            if baselines:
                row["baselines"] = {n: baseline_predictions[n][i] for n in baselines["systems"]}
        rows.append(row)
    return rows


def write_outputs(out_dir: Path, rows: list[dict[str, Any]], general: GeneralProbe, general_prompts: list,
                  general_answers: dict[str, list[str]], right: dict[str, list[bool]]) -> Path:
    """`out_dir/predictions.jsonl` (the rows) and `out_dir/probe_predictions.jsonl`; returns the first's path."""
    out_dir = Path(out_dir)
    pred_path = write_jsonl(out_dir / "predictions.jsonl", rows)
    n_q = len(general.questions)
    write_jsonl(
        out_dir / "probe_predictions.jsonl",
        [
            {"id": r["id"], "prompt": p[-1]["content"], "reference": prompt_and_response(r)[1],
             "answers": r.get("answers"), "baseline": b, "tuned": t,
             "baseline_right": right["baseline"][i] if i < n_q else None,
             "tuned_right": right["tuned"][i] if i < n_q else None}
            for i, (r, p, b, t) in enumerate(zip(general.questions + general.extra, general_prompts,
                                                 general_answers["baseline"], general_answers["tuned"]))
        ],
    )
    return pred_path
