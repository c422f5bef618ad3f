"""The train stage's entry point: `train_adapter` fine-tunes on the validated rows and writes the adapter, the
training log, the plan and the result; checkpoints at each evaluation let a re-run resume after a crash."""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tasks.common.general_probe import load_general_probe
from tasks.common.memory import is_out_of_memory
from tasks.common.models import load_tokenizer, pick_device, pick_dtype
from tasks.common.records import write_jsonl
from tasks.common.stm import masking_collator
from tasks.common.tracking import tracking_callbacks
from tasks.config import ConfigError, FewtuneConfig
from tasks.train.callbacks import (
    eval_loss_values,
    health_callback,
    stage_callbacks,
    stop_reason,
)
from tasks.train.data import _encode_all, answer_replay, make_collator, training_mix
from tasks.train.loss import ReplayMarkingCollator
from tasks.train.peft_models import adapter_method, build_model, load_training_base
from tasks.train.plan import (
    TrainPlan,
    choose_epochs,
    choose_learning_rate,
    choose_method,
    count_parameters,
    gpu_memory_bytes,
    is_labelled,
    labelled_settings,
    next_micro_batch,
)
from tasks.train.trainer import trainer_class, training_arguments

log = logging.getLogger("fewtune.train")

CHECKPOINT_PREFIX = "checkpoint-"


@dataclass
class TrainResult:
    adapter_path: str
    method: str
    train_rows: int
    validation_rows: int
    best_val_loss: float | None
    best_step: int | None
    steps: int
    epochs_run: float
    stopped_early: bool
    train_tokens: int
    tokens_per_s: float | None  # None after a resume (tokens seen before the crash are not timed)
    seconds: float
    trainable_params: int
    resumed_from: str | None
    stop_reason: str = "completed"  # completed | early_stopping | over_memorization
    step_tokens_per_s: float | None = None  # real tokens per second inside optimizer steps (this session)
    replay_rows: int = 0
    replay_source: str | None = None  # data.replay, or on-policy (the base model's answers to general prompts)
    validation_path: str | None = None  # the validation slice (held out of training): out_dir/validation.jsonl
    batch_size: int = 0
    gradient_accumulation: int = 0
    oom_retries: int = 0
    init_adapter: str | None = None
    plan_path: str | None = None
    loss_tokens: int | None = None  # answer tokens carrying loss per epoch in the domain rows (before STM masks)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def last_checkpoint(folder: Path) -> str | None:
    """The newest checkpoint that was written completely (a kill during a save leaves a partial one behind)."""
    if not folder.is_dir():
        return None
    done = []
    for path in folder.glob(f"{CHECKPOINT_PREFIX}*"):
        step = path.name[len(CHECKPOINT_PREFIX) :]
        if step.isdigit() and (path / "trainer_state.json").is_file() and (path / "rng_state.pth").is_file():
            done.append((int(step), path))
    return str(max(done)[1]) if done else None


def train_adapter(
    records: list[dict[str, Any]],
    cfg: FewtuneConfig,
    base_path: str,
    out_dir: Path,
    *,
    probe: list[dict[str, Any]] | None = None,
    replay: list[dict[str, Any]] | None = None,
    init_adapter: str | None = None,
    token_masks: str | None = None,
) -> TrainResult:
    """Fine-tune on `records`; writes `out_dir/adapter`, `train_log.json`, `train_plan.json`, `train_result.json`.

    `replay`: general-text rows for the replay mix (data.replay); without them, on-policy replay: the base model's
    greedy answers to general prompts (never probe rows). `probe`: the user's data.probe rows, never trained on;
    replay rows that nearly repeat them or the shipped probe stop the run (DataError). The validation slice is
    written to `out_dir/validation.jsonl`, the replay rows to `out_dir/replay.jsonl`. `init_adapter`: continue this
    adapter.
    `token_masks`: a score stage's `scores.parquet` whose STM masks the data collator applies (`tasks/common/stm.py`).
    """
    import torch
    from datasets import Dataset
    from transformers import set_seed

    cfg, label_why = labelled_settings(cfg, records)  # labelled rows: the label_* settings the config leaves unset
    t = cfg.train
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out_dir / "checkpoints"
    device = pick_device()
    dtype = pick_dtype(cfg.model.dtype, device)

    # Rows: validation slice (domain rows only), then the replay mix (never from the general-ability probe).
    general = load_general_probe(probe)
    mix = training_mix(records, cfg, replay, general)
    train_rows, val_rows = mix.train_rows, mix.val_rows

    # Choices.
    init_method = adapter_method(init_adapter) if init_adapter else None
    params = count_parameters(base_path)
    gpu_bytes = gpu_memory_bytes()
    if init_method:
        method = "qlora" if init_method == "lora" and t.method == "qlora" else init_method
        if t.method not in ("auto", method):
            raise ConfigError(f"train.method is {t.method} but train.init_adapter {init_adapter} is a {init_method} adapter; set train.method auto")
        method_why = f"incremental: continuing the {init_method} adapter {init_adapter}"
    elif t.method == "auto":
        method, method_why = choose_method(len(records), params, gpu_bytes, cfg)
    else:
        method, method_why = t.method, "set in the config"
    lr, lr_why = choose_learning_rate(method, bool(init_adapter), cfg, labelled=is_labelled(records))
    epochs, epochs_why = choose_epochs(len(records), cfg)

    # On-policy replay: the base model answers the general prompts before the adapter is put on it.
    tokenizer = load_tokenizer(base_path)
    base_model = load_training_base(base_path, method, device, dtype) if mix.pending else None
    mixed = answer_replay(base_model, tokenizer, mix, general, cfg) if mix.pending else mix.mixed
    plan = TrainPlan(
        method=method,
        learning_rate=lr,
        epochs=epochs,
        replay_fraction=mix.fraction,
        replay_rows=len(mixed),
        replay_source=mix.source if mixed else None,
        init_adapter=init_adapter,
        batch_size=t.batch_size,
        gradient_accumulation=t.gradient_accumulation,
        train_rows=len(train_rows),
        validation_rows=len(val_rows),
        params=params,
        reasons={"method": method_why, "learning_rate": lr_why, "epochs": label_why.get("epochs", epochs_why),
                 "replay_fraction": mix.fraction_why, **{k: v for k, v in label_why.items() if k != "epochs"}},
    )
    for key, why in plan.reasons.items():
        log.info("train %s = %s: %s", key, getattr(plan, key, getattr(t, key, None)), why)
    plan_path = out_dir / "train_plan.json"
    main_process = int(os.environ.get("RANK", "0")) == 0
    if main_process:
        plan_path.write_text(json.dumps(plan.to_dict(), indent=2))
        write_jsonl(out_dir / "validation.jsonl", val_rows)  # held out of training: memorization's control rows
        if mixed:
            write_jsonl(out_dir / "replay.jsonl", mixed)  # the replay rows mixed into training, for inspection

    train_ds = Dataset.from_list(_encode_all(tokenizer, train_rows + mixed, cfg.model.max_length))
    val_ds = Dataset.from_list(_encode_all(tokenizer, val_rows, cfg.model.max_length))
    loss_tokens = sum(sum(1 for x in labels if x != -100) for labels in train_ds[: len(train_rows)]["labels"])
    collator = make_collator(tokenizer)
    if token_masks:  # Selective Token Masking: masked answer tokens carry no loss
        collator = masking_collator(collator, token_masks, rows=train_ds["input_ids"])
    if t.replay_loss == "kl" and mixed and method != "full":  # replay rows learn the base model's distributions
        collator = ReplayMarkingCollator(collator, train_ds[len(train_rows) :]["input_ids"])

    batch, accum = t.batch_size, t.gradient_accumulation
    oom_retries = 0
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    while True:
        set_seed(t.seed)
        model = build_model(method, base_path, cfg, device, dtype, init_adapter, base=base_model)
        base_model = None  # an out-of-memory retry loads a fresh one
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info("%s: %d trainable parameters of %d", method, trainable, params)
        per_step = batch * accum * int(os.environ.get("WORLD_SIZE", "1"))
        steps_per_epoch = max(1, math.ceil(len(train_ds) / per_step))
        eval_every = max(1, steps_per_epoch // t.evals_per_epoch)
        args = training_arguments(cfg, ckpt_dir, batch=batch, accum=accum, lr=lr, epochs=epochs, eval_every=eval_every,
                                  device=device, dtype=dtype, distributed=distributed)
        early, guard, timer = stage_callbacks(cfg)
        extra = tracking_callbacks(cfg, out_dir)  # TensorBoard / W&B (train.report_to)
        if cfg.health.live_warnings:
            extra.append(health_callback(cfg, loss_tokens, len(train_rows)))
        trainer = trainer_class()(
            model=model,
            args=args,
            train_dataset=train_ds,
            eval_dataset=val_ds,
            data_collator=collator,
            callbacks=[early, guard, timer, *extra],
            group_batches=t.length_group_batches,
            # the shared leading part of a micro-batch run once (not with virtual tokens or checkpointed layers)
            share_prefix_min_tokens=0 if method in ("prefix", "qlora") else t.share_prefix_min_tokens,
            trained_token_loss=t.trained_token_loss,
        )
        resume = last_checkpoint(ckpt_dir)
        if resume:
            log.info("resuming training from %s", resume)
        start = time.perf_counter()
        out_of_memory = False
        try:
            trainer.train(resume_from_checkpoint=resume)
        except Exception as exc:  # noqa: BLE001 - only an allocation failure is handled here
            if not is_out_of_memory(exc):
                raise
            out_of_memory = True  # handled below, once the traceback no longer holds the failed step's tensors
        if not out_of_memory:
            break
        new_batch, new_accum = next_micro_batch(batch, accum, device)
        log.warning(
            "%s out of memory at micro-batch %d; retrying with micro-batch %d x accumulation %d (same effective batch)",
            "CUDA" if device == "cuda" else "CPU",
            batch,
            new_batch,
            new_accum,
        )
        del trainer, model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        batch, accum = new_batch, new_accum
        oom_retries += 1
    seconds = time.perf_counter() - start

    state = trainer.state
    history = state.log_history
    reason = stop_reason(history, state.global_step, state.max_steps, t.overmemorization_patience)
    best_step = None
    if state.best_model_checkpoint:
        best_step = int(Path(state.best_model_checkpoint).name.split("-")[-1])
    tokens = int(state.num_input_tokens_seen or 0)
    adapter_dir = out_dir / "adapter"
    result = TrainResult(
        adapter_path=str(adapter_dir),
        method=method,
        train_rows=len(train_rows),
        validation_rows=len(val_rows),
        best_val_loss=state.best_metric,
        best_step=best_step,
        steps=state.global_step,
        epochs_run=round(state.epoch or 0.0, 3),
        stopped_early=reason != "completed",
        train_tokens=tokens,
        tokens_per_s=round(tokens / seconds, 1) if seconds and not resume else None,
        seconds=round(seconds, 1),
        trainable_params=trainable,
        resumed_from=resume,
        stop_reason=reason,
        step_tokens_per_s=round(timer.tokens / timer.seconds, 1) if timer.seconds else None,
        replay_rows=len(mixed),
        replay_source=mix.source if mixed else None,
        validation_path=str(out_dir / "validation.jsonl"),
        batch_size=batch,
        gradient_accumulation=accum,
        oom_retries=oom_retries,
        init_adapter=init_adapter,
        plan_path=str(plan_path),
        loss_tokens=loss_tokens,
    )
    if not trainer.is_world_process_zero():
        return result
    trainer.model.save_pretrained(str(adapter_dir))
    tokenizer.save_pretrained(str(adapter_dir))
    _pin_base_path(adapter_dir, base_path)
    losses = eval_loss_values(history)
    stop = {"event": "stop", "reason": reason, "step": state.global_step, "best_step": best_step}
    if losses:
        stop["validation_ppl"] = [round(math.exp(x), 4) for x in losses]
    (out_dir / "train_log.json").write_text(json.dumps(history + [stop], indent=2))
    log.info("training stopped: %s at step %d of %d (best step %s)", reason, state.global_step, state.max_steps, best_step)
    (out_dir / "train_result.json").write_text(json.dumps(result.to_dict(), indent=2))
    return result


def _pin_base_path(adapter_dir: Path, base_path: str) -> None:
    """PEFT stores the base path as given; store it absolute so the adapter loads from any folder."""
    cfg_file = adapter_dir / "adapter_config.json"
    data = json.loads(cfg_file.read_text())
    local = Path(base_path)
    if local.exists():
        data["base_model_name_or_path"] = str(local.resolve())
    cfg_file.write_text(json.dumps(data, indent=2))
