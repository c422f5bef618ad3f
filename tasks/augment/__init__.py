"""Augment the training rows: self-distillation of answers and paraphrases of prompts, behind an equivalence filter.

Two techniques, each switched by the `augment` config section (docs/augmentation.md has the reasons and the table of
defaults by dataset size):

- **Self-distillation** (Yang et al. 2024, "Self-Distillation Bridges Distribution Gap in Language Model
  Fine-Tuning"): the generator (by default the base model itself) rewrites each gold answer in its own words, given
  the prompt and the gold answer. Text the base model would write itself is closer to its own distribution (lower
  perplexity), so fine-tuning on it moves the model less and forgets less. A rewrite replaces the gold row
  (`replace`) or joins it (`add`) only when it is equivalent:
    - labelled rows (classification): the rewrite still names the same label;
    - short factual answers (at most `short_answer_words` words with key facts): every key fact of the gold answer
      (numbers, prices, times, dates, names) is still there and no figure is added that neither the gold answer nor
      the prompt holds;
    - every text answer: its all-MiniLM-L6-v2 cosine similarity to the gold answer is at least
      `similarity_threshold`.
  A rewrite that fails stays out and the gold row stays in; the reason is recorded per row.
- **Paraphrases** of the last user message, `paraphrase.n` per row, for robustness to rephrased inputs: kept when
  they mean the same (similarity to the original at least `paraphrase.min_similarity`, the same key facts, closer to
  the question than to its answer) without being near-identical (below `paraphrase.max_similarity` and not a
  near-duplicate of any row of the dataset or of another paraphrase).

Every output row carries provenance: `source` (gold / self_distilled / paraphrase) and `parent_id` (the gold row).
The eval split was made before this stage and never receives augmented rows; the validate stage's leakage rule runs
again on every augmented row against the eval rows, and a leaking row is dropped with the eval row it repeats.

Budgets: at most `max_new_rows` augmented rows and `max_seconds` of generation; generation is batched with a
progress bar, and when a budget ends it the rows that passed are kept and the report says where it stopped.

Outputs in the stage folder: `train.jsonl` (the rows passed on to training), `rejected.jsonl` (every rejected
candidate with its reason), `augment_report.json` and `augment_report.md` (counts per technique, examples, and the
base model's perplexity of kept rewrites against their gold rows).

Modules: `plan` (which techniques run), `rows` (prompts and provenance), `embedder` (all-MiniLM-L6-v2),
`generators` (local model, HTTP), `duplicates` (dataset duplicates, eval leakage), `filters` (the equivalence rules),
`batching` (budgets, the generation loop), `perplexity`, `stage` (`augment_records`), `report`, `merge` (shards of a
Dask run). Key facts come from `tasks.common.facts`, shared with evaluation's `fact_accuracy` metric.
"""

from tasks.augment.batching import Budget, TechniqueLog
from tasks.augment.duplicates import DatasetDuplicates, EvalLeakage
from tasks.augment.embedder import ENCODER_BATCH, ENCODER_INSTALL, ENCODER_MAX_TOKENS, Embedder
from tasks.augment.filters import Verdict, judge_paraphrase, judge_rewrite
from tasks.augment.generators import Generated, Generator, GeneratorError, HttpGenerator, LocalGenerator, make_generator
from tasks.augment.merge import merge_augmented, merge_reports, merge_shard_results
from tasks.augment.perplexity import read_gold_scores, rewrite_perplexity
from tasks.augment.plan import Plan, plan_augmentation, spread_order
from tasks.augment.report import build_report, report_markdown, write_report
from tasks.augment.rows import (
    GOLD,
    PARAPHRASE,
    SELF_DISTILLED,
    clean_generation,
    paraphrase_conversation,
    rewrite_conversation,
    with_answer,
    with_question,
)
from tasks.augment.stage import AugmentResult, augment_records
from tasks.common.facts import Facts, added_figures, key_facts, missing_facts

__all__ = [
    "ENCODER_BATCH",
    "ENCODER_INSTALL",
    "ENCODER_MAX_TOKENS",
    "GOLD",
    "PARAPHRASE",
    "SELF_DISTILLED",
    "AugmentResult",
    "Budget",
    "DatasetDuplicates",
    "Embedder",
    "EvalLeakage",
    "Facts",
    "Generated",
    "Generator",
    "GeneratorError",
    "HttpGenerator",
    "LocalGenerator",
    "Plan",
    "TechniqueLog",
    "Verdict",
    "added_figures",
    "augment_records",
    "build_report",
    "clean_generation",
    "judge_paraphrase",
    "judge_rewrite",
    "key_facts",
    "make_generator",
    "merge_augmented",
    "merge_reports",
    "merge_shard_results",
    "missing_facts",
    "paraphrase_conversation",
    "plan_augmentation",
    "read_gold_scores",
    "report_markdown",
    "rewrite_conversation",
    "rewrite_perplexity",
    "spread_order",
    "with_answer",
    "with_question",
    "write_report",
]
