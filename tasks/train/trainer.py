"""The transformers Trainer as the train stage runs it: its arguments (evaluation and checkpoints at the same steps,
best checkpoint by validation loss, seeded data order) and a resumable length-grouped sampler."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tasks.config import FewtuneConfig
from tasks.train.data import LengthGroupedSampler
from tasks.train.loss import SelectedLoss, replay_kl_loss

log = logging.getLogger("fewtune.train")


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


def shared_prefix_length(input_ids, attention_mask, labels, min_tokens: int) -> int:
    """Leading tokens every row of a micro-batch has in common, carrying no loss (0 when fewer than `min_tokens`).

    One token before the first differing or trained token stays out of the prefix: its logits predict that token."""
    if input_ids.size(0) < 2:
        return 0
    ok = (input_ids == input_ids[:1]).all(0) & (attention_mask == 1).all(0) & (labels == -100).all(0)
    shared = int(ok.long().cumprod(0).sum()) - 1
    return shared if shared >= min_tokens and shared < input_ids.size(1) - 1 else 0


def shared_prefix_inputs(model, inputs: dict[str, Any], min_tokens: int) -> dict[str, Any] | None:
    """The micro-batch with its shared leading part (e.g. the system prompt with a label list) run once: the keys
    and values of the prefix, computed for one row with gradients, repeated for every row, and the rest of each row
    on top of them. Loss and gradients equal the plain forward's (the repeated keys' gradients add up)."""
    import torch

    ids, mask, labels = inputs["input_ids"], inputs.get("attention_mask"), inputs.get("labels")
    if mask is None or labels is None or "past_key_values" in inputs:
        return None
    n = shared_prefix_length(ids, mask, labels, min_tokens)
    if not n:
        return None
    rows, width = ids.shape
    prefix = model(input_ids=ids[:1, :n], use_cache=True, logits_to_keep=1)
    cache = prefix.past_key_values
    cache.batch_repeat_interleave(rows)
    positions = torch.arange(n, width, device=ids.device).unsqueeze(0).expand(rows, -1)
    return {**inputs, "input_ids": ids[:, n:], "labels": labels[:, n:], "past_key_values": cache,
            "position_ids": positions, "attention_mask": mask}


_ROW_INPUTS = {"input_ids", "attention_mask", "labels"}


def prefix_groups(inputs: dict[str, Any], min_tokens: int) -> list[Any] | None:
    """Row indices of a micro-batch that as a whole shares no leading part, grouped by their first `min_tokens`
    tokens, when some group has at least two rows (labelled rows with their label list, and a replay row among
    them); None otherwise."""
    import torch

    ids, mask, labels = inputs["input_ids"], inputs.get("attention_mask"), inputs.get("labels")
    if set(inputs) - _ROW_INPUTS or mask is None or labels is None or ids.size(0) < 3 or ids.size(1) <= min_tokens:
        return None
    if shared_prefix_length(ids, mask, labels, min_tokens):
        return None
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, start in enumerate(ids[:, :min_tokens].tolist()):
        groups.setdefault(tuple(start), []).append(i)
    if len(groups) < 2 or max(map(len, groups.values())) < 2:
        return None
    return [torch.tensor(rows, device=ids.device) for rows in groups.values()]


def grouped_loss(model, inputs: dict[str, Any], min_tokens: int, loss_of, num_items_in_batch):
    """The loss of a micro-batch whose rows start in different ways, as the sum of each group's loss (`loss_of(model,
    group inputs, num_items_in_batch)`, every group normalised by the whole batch's trained-token count, so the sum
    is the batch's loss), each group with its own shared leading part run once and its trailing padding dropped.
    None where the batch is not such a batch or a group's loss is not available."""
    groups = prefix_groups(inputs, min_tokens) if num_items_in_batch is not None else None
    if not groups:
        return None
    total = None
    for rows in groups:
        sub = _rows(inputs, rows)
        part = loss_of(model, shared_prefix_inputs(model, sub, min_tokens) or sub, num_items_in_batch)
        if part is None:
            return None
        total = part if total is None else total + part
    return total


def _rows(inputs: dict[str, Any], rows):
    """The micro-batch's rows `rows`, right padding past the longest of them dropped."""
    sub = {k: v.index_select(0, rows) for k, v in inputs.items()}
    if sub.get("attention_mask") is None:
        return sub
    width = int(sub["attention_mask"].sum(0).nonzero().max()) + 1
    return {k: v[:, :width] for k, v in sub.items()}


def _adapters_in_layers(model) -> bool:
    """A PEFT model whose adapters sit inside the base model's layers (LoRA and its kin; not prompt learning), which
    the trained-token loss can run through the base model's decoder and output head."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return False
    config = model.peft_config.get(model.active_adapter)
    return config is not None and not config.is_prompt_learning


def trainer_class():
    from transformers import Trainer

    class FewtuneTrainer(Trainer):
        """The transformers Trainer with a resumable length-grouped sampler, and micro-batches whose rows share a
        leading part (a system prompt, a label list) running that part once (`train.share_prefix`)."""

        def __init__(self, *args, group_batches: int, share_prefix_min_tokens: int = 0,
                     trained_token_loss: bool = True, **kwargs):
            self._group_batches = group_batches
            self._share_min = share_prefix_min_tokens
            super().__init__(*args, **kwargs)
            import torch

            half = self.args.bf16 or self.args.fp16 or next(self.model.parameters()).dtype != torch.float32
            self._selected = SelectedLoss(trained_token_loss and _adapters_in_layers(self.model),
                                          tolerance=1e-2 if half else 1e-4)
            # Read before the Trainer drops the columns the model does not take (`length` among them).
            self._lengths = list(self.train_dataset["length"])

        def _get_train_sampler(self, train_dataset=None):
            return LengthGroupedSampler(self._lengths, self.args.train_batch_size, self._group_batches, self.args.data_seed)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # (evaluation asks for outputs but reads only the loss: the Trainer runs it loss-only without metrics)
            replay = inputs.pop("replay", None)  # train.replay_loss kl: replay rows learn the base model's distributions
            if replay is not None and bool(replay.any()):
                loss = self._with_replay_kl(model, inputs, replay, num_items_in_batch)
                return (loss, {"loss": loss}) if return_outputs else loss
            own_loss = self.label_smoother is None and self.compute_loss_func is None and model is self.model
            count = num_items_in_batch if self.model_accepts_loss_kwargs else None
            if own_loss and not self._selected.checked:
                self._selected.check(model, inputs)
            if self._share_min:
                try:
                    if own_loss and self._selected.enabled:
                        # a replay row among labelled rows: each kind of row runs with its own shared part
                        grouped = grouped_loss(model, inputs, self._share_min, self._selected, count)
                        if grouped is not None:
                            return (grouped, {"loss": grouped}) if return_outputs else grouped
                    shared = shared_prefix_inputs(model, inputs, self._share_min)
                except (TypeError, AttributeError, NotImplementedError) as exc:  # a model without logits_to_keep or
                    log.warning("shared-prefix training is off for this model (%s): plain forward", exc)  # a cache API
                    self._share_min, shared = 0, None
                if shared is not None:
                    inputs = shared
            loss = self._selected(model, inputs, count) if own_loss else None
            if loss is not None:
                return (loss, {"loss": loss}) if return_outputs else loss
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

        def _with_replay_kl(self, model, inputs, replay, num_items_in_batch):
            """The domain rows' loss as usual plus the replay rows' KL toward the base model (`replay_kl_loss`), both
            divided by the whole micro-batch's trained-token count."""
            trained = (inputs["labels"][:, 1:] != -100).sum().clamp(min=1)
            count = num_items_in_batch if self.model_accepts_loss_kwargs else None
            parts = {flag: _rows(inputs, (replay == flag).nonzero()[:, 0]) for flag in (True, False) if
                     bool((replay == flag).any())}
            loss = replay_kl_loss(model, parts[True], count if count is not None else trained)
            if False in parts:
                domain = self.compute_loss(model, parts[False], num_items_in_batch=num_items_in_batch)
                if count is None:  # a mean over the domain rows' tokens: weighted by their share of the batch's
                    domain = domain * (parts[False]["labels"][:, 1:] != -100).sum() / trained
                loss = loss + domain
            return loss

    return FewtuneTrainer
