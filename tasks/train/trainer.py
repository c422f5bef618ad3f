"""The transformers Trainer as the train stage runs it: its arguments (evaluation and checkpoints at the same steps,
best checkpoint by validation loss, seeded data order) and a resumable length-grouped sampler."""

from __future__ import annotations

from pathlib import Path

from tasks.config import FewtuneConfig
from tasks.train.data import LengthGroupedSampler


def training_arguments(
    cfg: FewtuneConfig,
    ckpt_dir: Path,
    *,
    batch: int,
    accum: int,
    lr: float,
    epochs: float,
    eval_every: int,
    device: str,
    dtype,
    distributed: bool,
):
    """The `TrainingArguments` of one attempt (`batch` x `accum` changes after an out-of-memory error)."""
    import torch
    from transformers import TrainingArguments

    t = cfg.train
    return TrainingArguments(
        output_dir=str(ckpt_dir),
        per_device_train_batch_size=batch,
        per_device_eval_batch_size=batch * 2,
        gradient_accumulation_steps=accum,
        learning_rate=lr,
        num_train_epochs=epochs,
        max_steps=t.max_steps or -1,
        warmup_steps=t.warmup_ratio,  # below 1: a share of the steps
        lr_scheduler_type=t.lr_scheduler,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        eval_strategy="steps",
        eval_steps=eval_every,
        save_strategy="steps",
        save_steps=eval_every,
        save_total_limit=2,  # the best checkpoint is kept on top of these
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        restore_callback_states_from_checkpoint=True,
        logging_steps=max(1, eval_every // 2),
        length_column_name="length",
        report_to=[],
        seed=t.seed,
        data_seed=t.seed,
        use_cpu=device == "cpu",
        bf16=device == "cuda" and dtype == torch.bfloat16,
        fp16=device == "cuda" and dtype == torch.float16,
        dataloader_num_workers=0,
        save_only_model=False,
        include_num_input_tokens_seen="non_padding",
        fsdp="full_shard auto_wrap" if distributed and t.distributed == "fsdp" else "",
        ddp_find_unused_parameters=False if distributed else None,
    )


def trainer_class():
    from transformers import Trainer

    class FewtuneTrainer(Trainer):
        """The transformers Trainer with a resumable length-grouped sampler."""

        def __init__(self, *args, group_batches: int, **kwargs):
            self._group_batches = group_batches
            super().__init__(*args, **kwargs)
            # Read before the Trainer drops the columns the model does not take (`length` among them).
            self._lengths = list(self.train_dataset["length"])

        def _get_train_sampler(self, train_dataset=None):
            return LengthGroupedSampler(self._lengths, self.args.train_batch_size, self._group_batches, self.args.data_seed)

    return FewtuneTrainer
