"""Evaluate the base model (baseline) and the tuned model on the same held-out rows.

What is measured, each for the baseline and the tuned model:

- **Task metrics** through local `evaluate` modules (`metrics/`): exact match, token F1, ROUGE-L and BLEU on generated
  answers; for classification (every eval row has a `label`) accuracy and macro precision, recall and F1 of the
  answer mapped to a label. Answers come from greedy decoding with fixed, recorded settings
  (`tasks.common.generation`; metrics and intervals in `tasks.common.measure`).
- **Paired bootstrap intervals** on every tuned-minus-baseline delta: the test rows are resampled with replacement
  (`evaluate.bootstrap_samples` times), both models' metric is recomputed on each resample from per-row statistics
  (corpus metrics such as BLEU and macro-F1 are recomputed, not averaged), and the percentile interval of the
  differences is reported at `evaluate.confidence`.
- **Over-memorization signal**: perplexity of the reference answers of the test rows. A tuned model whose test
  perplexity rises while its task metric looks fine has memorized its training rows rather than learned the task.
- **Forgetting** (`forgetting.py`), on the general-ability probe shipped with fewtune (plus `data.probe` rows), which
  training never sees: general-text perplexity, KL(base || tuned) of next-token distributions on general prompts and
  on the task's own prompts, and right->wrong flips on general questions with checkable answers; each with an interval.
- **Memorization** by discoverable extraction (`memorization.py`): for training rows, the prompt plus the first part
  of the gold answer (`evaluate.memorization_prefix_fraction`) is given and the greedy continuation is compared with
  the rest of the answer. Exact extraction: the continuation reproduces the rest token for token. Near-verbatim: at
  least `evaluate.near_verbatim_agreement` of the rest's tokens are the model's greedy choice given the true text
  before them. Both are read from one teacher-forced forward pass (greedy decoding reproduces the rest exactly if and
  only if every next-token argmax along it is the gold token), so hundreds of rows cost about as much as scoring them.
  The same check on rows of the training data held out of training (the validation slice) is the control: a model
  that learned the task completes held-out answers as well as trained ones; a model that memorized rows completes
  only the rows it saw. Not applicable to label answers.
- **Robustness** (`robustness.py`): test rows whose answer also appears in training under a different prompt are the
  *rephrased* rows; their metrics are reported separately, and the tuned model also answers the training prompt of
  the same answer (the *original* phrasing), so the gap between phrasings is measured on the same facts.

The base model's side of all this is kept between runs that share the base model, the eval rows and the settings
(`baseline_cache.py`, `evaluate.baseline_cache`): a nightly re-train computes only the tuned model's side.

The evaluation itself (`evaluate_models`, `EvalResult`) lives in `stage.py`. Task metrics, not training loss, decide
whether the tuned model is better (the gate lives in tasks/register/).
"""

from __future__ import annotations

from tasks.evaluate.baseline_cache import BaselineCache, baseline_cache_for
from tasks.evaluate.memorization import (
    ExtractionCase,
    extraction_case,
    extraction_checks,
    memorization_summary,
    sample_rows,
)
from tasks.evaluate.robustness import rephrase_groups, rows_trained_on
from tasks.evaluate.stage import EvalResult, evaluate_models

__all__ = [
    "BaselineCache",
    "EvalResult",
    "baseline_cache_for",
    "ExtractionCase",
    "evaluate_models",
    "extraction_case",
    "extraction_checks",
    "memorization_summary",
    "rephrase_groups",
    "rows_trained_on",
    "sample_rows",
]
