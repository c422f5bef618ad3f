"""Score every training example with the frozen base model.

For each row, under the base model and with the chat template applied exactly as training encodes it
(`tasks.common.models.encode_chat`):

- the negative log-likelihood (NLL) of every token, from which come the perplexity of the assistant answer (the tokens
  that carry loss in training) and of the full sequence (system and user turns included);
- a robust z-score of the answer's log-perplexity across the dataset; rows far above the rest (z > `score.outlier_z`)
  are outliers: often mislabelled, garbled or off-domain rows, and always the rows a small fine-tune is most tempted
  to memorize. `score.outlier_action` keeps them, drops them, or hands them to the augment stage;
- Selective Token Masking (STM, `score.token_masking`): answer tokens whose token perplexity exp(NLL) exceeds a
  threshold are excluded from the training loss (see `tasks/common/stm.py`).

How scoring is made fast (`benchmarks/bench_score.py` measures it against a per-example loop and an `evaluate`-style
batch): rows are grouped by a shared leading part (typically the system prompt), whose keys and values are computed
once per group and reused by every row of the group; inside a group rows are sorted by length and cut into batches
by row and token budgets, right-padded (left padding without position ids skews perplexity); the last token of each
row is not fed (nothing follows it); and log-probabilities are computed from the final hidden states in chunks of
positions, so the full-vocabulary logits of a batch never sit in memory at once. All under `torch.inference_mode`,
in the dtype `model.dtype` picks (fp32 on CPUs without native bf16; bf16 on GPUs).

Modules: `stage` (score_records, ScoreResult, scoring_options), `finish` (finish_scores: masks, outlier action,
files), `report` (histogram and Markdown report), `merge` (shard results of a Dask run merged into one).
"""

from tasks.score.finish import finish_scores
from tasks.score.merge import merge_scores
from tasks.score.report import plot_histogram, write_markdown
from tasks.score.stage import ScoreResult, score_records, scoring_options

__all__ = [
    "ScoreResult",
    "finish_scores",
    "merge_scores",
    "plot_histogram",
    "score_records",
    "scoring_options",
    "write_markdown",
]
