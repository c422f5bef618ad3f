"""Evaluate the base model (baseline) and the tuned model on the same held-out rows.

Both models answer every eval prompt with greedy decoding; answers are compared with the reference through local
`evaluate` metric modules (exact match, ROUGE-L). The perplexity of the reference answers is measured too, and, when
a general-ability probe set is configured, the perplexity of its answers (a rise means the fine-tune made the model
forget general ability). Task metrics, not training loss, decide whether the tuned model is better.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from flows.config import FewtuneConfig
import metrics as _metrics
from tasks.data import prompt_and_response, write_jsonl
from tasks.models import encode_chat, encode_prompt, load_model, load_tokenizer, pick_device, pick_dtype
from tasks.score import perplexity, token_nlls

log = logging.getLogger("fewtune.evaluate")

METRICS = ("exact_match", "rouge_l")


def generate_answers(model, tokenizer, prompts: list[list[dict[str, str]]], cfg: FewtuneConfig, desc: str) -> list[str]:
    """Greedy answers to each conversation prefix, batched over length-sorted, left-padded prompts."""
    import torch
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    encoded = [encode_prompt(tokenizer, p, cfg.model.max_length) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)
    gen_cfg = GenerationConfig(
        max_new_tokens=cfg.evaluate.max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    answers: list[str] = [""] * len(prompts)
    bs = cfg.evaluate.batch_size
    model.eval()
    with torch.inference_mode(), tqdm(total=len(prompts), desc=desc, unit="prompt", leave=False) as bar:
        for start in range(0, len(order), bs):
            idx = order[start : start + bs]
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                n = len(encoded[i])
                ids[row, width - n :] = torch.tensor(encoded[i])
                mask[row, width - n :] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen_cfg)
            for row, i in enumerate(idx):
                answers[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True).strip()
            bar.update(len(idx))
    return answers


def compute_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    scores: dict[str, float] = {}
    for name in METRICS:
        scores.update(_metrics.load_metric(name).compute(predictions=predictions, references=references))
    return {k: round(float(v), 4) for k, v in scores.items()}


def _model_report(model, tokenizer, records, probe, cfg: FewtuneConfig, label: str) -> tuple[dict[str, Any], list[str]]:
    prompts, refs = zip(*(prompt_and_response(r) for r in records))
    answers = generate_answers(model, tokenizer, list(prompts), cfg, desc=f"evaluate: {label} answers")
    report = compute_metrics(answers, list(refs))
    encoded = [encode_chat(tokenizer, r, cfg.model.max_length) for r in records]
    report["eval_ppl"] = round(perplexity(token_nlls(model, tokenizer, encoded, cfg.score.batch_size, f"evaluate: {label} ppl")), 4)
    if probe:
        enc = [encode_chat(tokenizer, r, cfg.model.max_length) for r in probe]
        report["probe_ppl"] = round(perplexity(token_nlls(model, tokenizer, enc, cfg.score.batch_size, f"evaluate: {label} probe")), 4)
    return report, answers


@dataclass
class EvalResult:
    baseline: dict[str, float]
    tuned: dict[str, float]
    primary_metric: str
    n_examples: int
    examples: list[dict[str, Any]] = field(default_factory=list)
    predictions_path: str | None = None

    @property
    def gain(self) -> float:
        return round(self.tuned[self.primary_metric] - self.baseline[self.primary_metric], 4)

    def to_dict(self) -> dict[str, Any]:
        return {
            "primary_metric": self.primary_metric,
            "n_examples": self.n_examples,
            "baseline": self.baseline,
            "tuned": self.tuned,
            "gain": self.gain,
            "examples": self.examples,
            "predictions_path": self.predictions_path,
        }


def evaluate_models(
    records: list[dict[str, Any]],
    probe: list[dict[str, Any]] | None,
    cfg: FewtuneConfig,
    base_path: str,
    adapter_path: str,
    out_dir: Path,
) -> EvalResult:
    """Baseline vs tuned on `records`; writes `out_dir/predictions.jsonl` (every prompt, reference and both answers)."""
    from peft import PeftModel

    if cfg.evaluate.max_examples:
        records = records[: cfg.evaluate.max_examples]
    device = pick_device()
    dtype = pick_dtype(cfg.model.dtype, device)
    tokenizer = load_tokenizer(base_path)
    model = load_model(base_path, dtype=dtype, device=device)
    baseline, base_answers = _model_report(model, tokenizer, records, probe, cfg, "baseline")
    log.info("baseline: %s", baseline)

    model = PeftModel.from_pretrained(model, adapter_path).merge_and_unload()
    tuned, tuned_answers = _model_report(model, tokenizer, records, probe, cfg, "tuned")
    log.info("tuned: %s", tuned)

    rows = []
    for r, b, t in zip(records, base_answers, tuned_answers):
        prompt, ref = prompt_and_response(r)
        rows.append({"id": r["id"], "prompt": prompt[-1]["content"], "reference": ref, "baseline": b, "tuned": t})
    out_dir = Path(out_dir)
    pred_path = write_jsonl(out_dir / "predictions.jsonl", rows)
    return EvalResult(
        baseline=baseline,
        tuned=tuned,
        primary_metric=cfg.evaluate.primary_metric,
        n_examples=len(records),
        examples=rows[: cfg.evaluate.examples_in_summary],
        predictions_path=str(pred_path),
    )
