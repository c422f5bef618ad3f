"""The registered model: an MLflow pyfunc holding the adapter plus a reference to the base model.

Logging a PEFT model with a local base through `mlflow.transformers` silently re-initialises weights, so the adapter
is logged as an artifact and the base is loaded by path: `mlflow.pyfunc.load_model("models:/NAME@champion")`
answers prompts with the tuned model, exactly as the evaluation did.

This module imports mlflow and pandas (seconds); `tasks.register` imports it only when the class is needed (logging
a model, or `tasks.register.AdapterModel`), so the CLI's registry commands stay quick to start.
"""

from __future__ import annotations

import json

import mlflow.pyfunc
import pandas as pd

from tasks.common.generation import GenerationSettings, generate_answers, load_tuned
from tasks.common.models import load_base
from tasks.config import EvaluateConfig

# The served model answers in batches of the evaluate stage's default size (what it has always used).
SERVE_BATCH_SIZE: int = EvaluateConfig.model_fields["batch_size"].default


class AdapterModel(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc: base model + adapter. Input: a DataFrame with a `prompt` column (one user message each) or a
    `messages` column (whole conversations, lists of {role, content}); output: the greedy answers."""

    def load_context(self, context) -> None:
        mc = context.model_config
        base, self.tokenizer = load_base(mc["base_path"], mc.get("dtype", "auto"))
        self.model = load_tuned(base, context.artifacts["adapter"])
        self.system_prompt = mc.get("system_prompt")
        self.max_new_tokens = int(mc.get("max_new_tokens", 64))
        self.max_length = int(mc.get("max_length", 256))

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

    def predict(self, context, model_input: pd.DataFrame, params=None) -> list[str]:
        # (typed as a DataFrame so that MLflow does not try to validate it; a list of prompts works too)
        return generate_answers(self.model, self.tokenizer, self.conversations(model_input), self._settings(), desc="answering")
