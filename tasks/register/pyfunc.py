"""The registered model: an MLflow pyfunc holding the adapter plus a reference to the base model.

Logging a PEFT model with a local base through `mlflow.transformers` silently re-initialises weights, so the adapter
is logged as an artifact and the base by a portable reference (`tasks.common.portable`: the spec or hub id and a
fingerprint of the weights), resolved on the machine that serves it, or bundled with the version
(`register.bundle_base`): `mlflow.pyfunc.load_model("models:/NAME@champion")` and `mlflow models serve` answer with
the tuned model, exactly as the evaluation did, on any machine that has the base weights.

This module imports mlflow and pandas (seconds); `tasks.register` imports it only when the class is needed (logging
a model, or `tasks.register.AdapterModel`), so the CLI's registry commands stay quick to start.
"""

from __future__ import annotations

import json
from typing import Any

import mlflow.pyfunc
import pandas as pd

from tasks.common.generation import GenerationSettings, generate_answers, load_tuned
from tasks.common.label_scoring import score_labels
from tasks.common.models import dtype_name, load_base, pick_dtype
from tasks.common.portable import portable_reference, resolve_portable
from tasks.config import EvaluateConfig, FewtuneConfig

# The served model answers in batches of the evaluate stage's default size (what it has always used).
SERVE_BATCH_SIZE: int = EvaluateConfig.model_fields["batch_size"].default


def served_model_config(
    cfg: FewtuneConfig, evaluation: dict[str, Any], base_path: str, base_spec: str, system_prompt: str | None
) -> dict[str, Any]:
    """The `model_config` a registered model is logged with: what `AdapterModel` loads and how it answers.

    `dtype` is the dtype the evaluation computed in (its recorded `generation.dtype`), never `auto`: the served model
    then answers as the evaluation did on any machine, also where `auto` would pick another dtype (a CPU without
    fast bf16, a GPU with fp16 only). Without a recorded one, `model.dtype` resolved on this machine."""
    recorded = (evaluation.get("generation") or {}).get("dtype")
    return {
        "base": portable_reference(base_spec, base_path),  # found on the serving machine, weights checked
        "base_spec": base_spec,
        "dtype": recorded or dtype_name(pick_dtype(cfg.model.dtype)),
        "max_length": cfg.model.max_length,
        "max_new_tokens": cfg.evaluate.max_new_tokens,
        "system_prompt": system_prompt,
        "labels": evaluation.get("labels"),  # labelled data: answers are the label of highest likelihood
    }


class AdapterModel(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc: base model + adapter. Input: a DataFrame with a `prompt` column (one user message each) or a
    `messages` column (whole conversations, lists of {role, content}); output: the greedy answers, or for labelled
    data one `{"label": ..., "probabilities": {label: p}}` per input (always a label of the set).

    The base loads in the recorded `dtype` (a version that recorded the setting `auto` gets bf16 where the hardware
    computes it fast, else fp32); the attribute `dtype` names the one it computes in."""

    dtype: str

    def load_context(self, context) -> None:
        mc = context.model_config
        if "base" in context.artifacts:  # the base weights bundled with the version (register.bundle_base)
            base_path = context.artifacts["base"]
        elif mc.get("base"):
            base_path = resolve_portable(mc["base"]).path
        else:  # a version registered before portable references: the training machine's path
            base_path = mc["base_path"]
        base, self.tokenizer = load_base(base_path, mc.get("dtype") or "auto")
        self.model = load_tuned(base, context.artifacts["adapter"])
        self.dtype = dtype_name(self.model.dtype)
        self.system_prompt = mc.get("system_prompt")
        self.max_new_tokens = int(mc.get("max_new_tokens", 64))
        self.max_length = int(mc.get("max_length", 256))
        self.labels = list(mc.get("labels") or []) or None

    def conversations(self, model_input) -> list[list[dict[str, str]]]:
        if hasattr(model_input, "columns") and "messages" in model_input.columns:
            return [json.loads(m) if isinstance(m, str) else list(m) for m in model_input["messages"]]
        prompts = list(model_input["prompt"]) if hasattr(model_input, "columns") else list(model_input)
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [system + [{"role": "user", "content": str(p)}] for p in prompts]

    def _settings(self) -> GenerationSettings:
        return GenerationSettings(
            max_new_tokens=self.max_new_tokens, max_length=self.max_length, batch_size=SERVE_BATCH_SIZE
        )

    def predict(self, context, model_input: pd.DataFrame, params=None) -> list[Any]:
        # (typed as a DataFrame so that MLflow does not try to validate it; a list of prompts works too)
        asked = self.conversations(model_input)
        if self.labels:  # labelled data: always one of the labels, as the evaluation predicted, with its probabilities
            scores = score_labels(self.model, self.tokenizer, asked, self.labels, max_length=self.max_length,
                                  batch_size=SERVE_BATCH_SIZE, desc="labelling")
            probabilities = scores.probabilities()
            return [{"label": label, "probabilities": {name: round(float(p), 6) for name, p in zip(scores.labels, row)}}
                    for label, row in zip(scores.predictions(), probabilities)]
        return generate_answers(self.model, self.tokenizer, asked, self._settings(), desc="answering")
