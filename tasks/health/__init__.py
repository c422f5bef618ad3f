"""Training health: the warning signs of small-data fine-tuning, each with the config knob to turn.

Five checks, thresholds in the `health` config section:

- **eval_perplexity** — the tuned model's perplexity of the test answers above `health.max_eval_ppl` (5; healthy
  in-domain text is about 1.5-4): the model has not learned the domain's answers.
- **loss_gap** — validation loss minus training loss ends above `health.max_loss_gap` nats and grew since the best
  validation loss (or over the last `health.gap_window` evaluations): over-fitting.
- **convergence** — the training loss climbs back above its lowest value so far by more than
  `health.max_loss_rebound` of the first logged loss, ends more than `health.max_loss_rise` above it, or becomes
  NaN: it oscillates or diverges instead of converging; the learning rate is too high.
- **baseline** — the tuned model's primary metric below the base model's by more than `health.metric_margin`:
  fine-tuning made the task worse.
- **trainable_tokens** — fewer than `health.min_trainable_tokens` answer tokens carry loss per epoch: too little
  signal to learn from.

The checks are plain functions over the train stage's log (`train_log.json`, the Trainer's log history), its result
and plan, and the evaluation results; `assess` runs them all. They live on the ground floor
(`tasks/common/health_checks.py`, and `tasks/common/health_run.py` for a run folder) because the train stage runs the
training-log checks at each evaluation during training (`tasks.train.health_callback`, a warning in the log the first
time a sign appears) and the report shows them. This stage assesses a train stage folder or a run folder and presents
the result (the checks themselves are on the ground floor, `tasks/common/health_checks.py`, since training
runs them live too): `python -m tasks.health RUN_DIR` (or `fewtune health RUN_DIR`) checks a finished run folder.

- `folders.py` — `assess_train_dir`, `assess_run_dir`, `count_loss_tokens`
- `present.py` — `health_lines`, `health_markdown`, `main`
"""

from tasks.health.folders import assess_run_dir, assess_train_dir, count_loss_tokens
from tasks.health.present import health_lines, health_markdown, main

__all__ = [
    "assess_run_dir",
    "assess_train_dir",
    "count_loss_tokens",
    "health_lines",
    "health_markdown",
    "main",
]
