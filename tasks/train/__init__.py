"""Train an adapter on the validated rows with the transformers Trainer and PEFT.

- Method and hyper-parameters: explicit config values, or `auto` choices made from the training-set size and the
  hardware (`plan_training`); every choice and its reason goes to `train_plan.json` and the log.
- Methods: LoRA, QLoRA (4-bit NF4 base, CUDA only), prefix tuning, IA3, and full fine-tuning of the transformer blocks
  (saved in PEFT format too, so evaluation, registration and serving load every method the same way).
- Loss on assistant tokens only (labels from `encode_chat`); a row left with no trainable token is an error.
- Replay: a share of general rows is mixed into training against forgetting: `data.replay`, else on-policy replay
  (the base model's own greedy answers to general prompts that ship with fewtune). Replay never comes from the
  general-ability probe, and replay rows that nearly repeat a probe row stop the run.
- A validation slice is held out of the *training* rows for early stopping, the over-memorization guard and
  best-checkpoint selection, so the eval/test set stays untouched until the evaluate stage; it is written to
  `validation.jsonl` (the memorization check's held-out control rows).
- Early stopping on validation loss; the over-memorization guard stops when the validation perplexity has risen at
  several evaluations in a row; the best checkpoint is restored at the end and saved as the adapter.
- Checkpoints at each evaluation under the stage folder; a re-run after a crash (even `kill -9`) resumes from the last
  complete one with the same data order (seeded, epoch-indexed length-grouped sampler).
- On CUDA out-of-memory the run is retried with half the micro-batch and twice the accumulation.
- Incremental mode: start from an existing adapter (e.g. the registered champion) at a lower learning rate.
- `python -m tasks.train ...` runs this stage alone; `accelerate launch -m tasks.train ...` runs it on several GPUs.

Modules: `plan.py` (the auto choices, `TrainPlan`), `data.py` (validation slice, replay mix, encoding, collator,
length-grouped sampler), `callbacks.py` (early stopping, over-memorization guard, step timer, live health warnings),
`peft_models.py` (PEFT configs, base loading incl. QLoRA, the model), `incremental.py` (the champion's adapter),
`trainer.py` (Trainer and its arguments), `stage.py` (`train_adapter`, `TrainResult`, checkpoints), `launch.py`
(`accelerate launch`, `main`).
"""

from tasks.train.callbacks import health_callback, rising_streak, step_timer, stop_reason
from tasks.train.data import (
    LengthGroupedSampler,
    TrainingMix,
    _encode_all,
    answer_replay,
    make_collator,
    replay_rows,
    replay_wanted,
    training_mix,
)
from tasks.train.incremental import InitAdapter, champion_adapter, resolve_init_adapter
from tasks.train.launch import launch_command, main, train_adapter_launched
from tasks.train.peft_models import (
    LLAMA_LINEAR,
    PEFT_TYPE_TO_METHOD,
    adapter_method,
    build_model,
    load_training_base,
    peft_config,
)
from tasks.train.plan import (
    AUTO_LEARNING_RATES,
    METHODS,
    SIZE_TABLE,
    TrainingError,
    TrainPlan,
    choose_epochs,
    choose_learning_rate,
    choose_method,
    choose_replay_fraction,
    count_parameters,
    gpu_memory_bytes,
    next_micro_batch,
)
from tasks.train.stage import CHECKPOINT_PREFIX, TrainResult, last_checkpoint, train_adapter

__all__ = [
    "AUTO_LEARNING_RATES",
    "CHECKPOINT_PREFIX",
    "LLAMA_LINEAR",
    "METHODS",
    "PEFT_TYPE_TO_METHOD",
    "SIZE_TABLE",
    "InitAdapter",
    "LengthGroupedSampler",
    "TrainPlan",
    "TrainResult",
    "TrainingError",
    "TrainingMix",
    "_encode_all",
    "adapter_method",
    "answer_replay",
    "build_model",
    "champion_adapter",
    "choose_epochs",
    "choose_learning_rate",
    "choose_method",
    "choose_replay_fraction",
    "count_parameters",
    "gpu_memory_bytes",
    "health_callback",
    "last_checkpoint",
    "launch_command",
    "load_training_base",
    "main",
    "make_collator",
    "next_micro_batch",
    "peft_config",
    "replay_rows",
    "replay_wanted",
    "resolve_init_adapter",
    "rising_streak",
    "step_timer",
    "stop_reason",
    "train_adapter",
    "train_adapter_launched",
    "training_mix",
]
