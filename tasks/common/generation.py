"""Greedy generation with recorded settings, and the base model with an adapter applied.

Every answer a verdict rests on (baseline, tuned, probe, the champion, the served model) is produced by
`generate_answers` with explicit `GenerationSettings`; `settings_from(cfg)` reads them from the `evaluate` and
`model` config sections.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from tasks.common.models import encode_prompt
from tasks.config import FewtuneConfig


@dataclass(frozen=True)
class GenerationSettings:
    """Greedy decoding of at most `max_new_tokens` per prompt; prompts keep their last `max_length` tokens and are
    answered `batch_size` at a time."""

    max_new_tokens: int
    max_length: int
    batch_size: int


def settings_from(cfg: FewtuneConfig) -> GenerationSettings:
    """The generation settings of an evaluation: `evaluate.max_new_tokens`, `model.max_length`, `evaluate.batch_size`."""
    return GenerationSettings(
        max_new_tokens=cfg.evaluate.max_new_tokens,
        max_length=cfg.model.max_length,
        batch_size=cfg.evaluate.batch_size,
    )


def generation_settings(cfg: FewtuneConfig, dtype: str) -> dict[str, Any]:
    """The decoding settings every answer of an evaluation is produced with (recorded with the results)."""
    s = settings_from(cfg)
    return {
        "decoding": "greedy",
        "do_sample": False,
        "max_new_tokens": s.max_new_tokens,
        "prompt_max_tokens": s.max_length,
        "batch_size": s.batch_size,
        "padding": "left",
        "dtype": dtype,
    }


def generate_answers(
    model, tokenizer, prompts: list[list[dict[str, str]]], settings: GenerationSettings, desc: str
) -> list[str]:
    """Greedy answers to each conversation prefix, batched over length-sorted, left-padded prompts."""
    import torch
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    encoded = [encode_prompt(tokenizer, p, settings.max_length) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)
    gen_cfg = GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    answers: list[str] = [""] * len(prompts)
    bs = settings.batch_size
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


def load_tuned(model, adapter_path: str):
    """The base model with the adapter applied: merged into the weights when the method allows it."""
    from peft import PeftModel

    tuned = PeftModel.from_pretrained(model, adapter_path)
    if tuned.peft_config["default"].is_prompt_learning:
        return tuned  # prefix tuning adds virtual tokens; nothing to merge
    return tuned.merge_and_unload()
