"""The train stage's `auto` choices, made from the training-set size and the hardware: method, learning rate,
epochs, replay share; and the micro-batch after an out-of-memory error. Every choice comes with its reason, and the
whole plan is saved as `train_plan.json`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from tasks.config import FewtuneConfig

METHODS = ("lora", "qlora", "prefix", "ia3", "full")
# learning_rate auto, per method (reasons in the config field's description and in docs/training.md).
AUTO_LEARNING_RATES = {"lora": 2e-4, "qlora": 2e-4, "ia3": 3e-3, "prefix": 1e-2, "full": 2e-5}
# The method-by-dataset-size table of the background notes, quoted in the reason of an auto choice.
SIZE_TABLE = (
    (1_000, "under 1,000 rows: LoRA or prefix tuning"),
    (10_000, "1,000-10,000 rows: LoRA or adapters"),
    (100_000, "10,000-100,000 rows: adapters or partial fine-tuning"),
)


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. out of GPU memory at micro-batch 1); the message says what to change."""


@dataclass
class TrainPlan:
    """What training will do, and why: every `auto` choice with its reason (saved as `train_plan.json`)."""

    method: str
    learning_rate: float
    epochs: float
    replay_fraction: float
    replay_rows: int
    replay_source: str | None
    init_adapter: str | None
    batch_size: int
    gradient_accumulation: int
    train_rows: int
    validation_rows: int
    params: int
    reasons: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def choose_method(n_rows: int, params: int, gpu_bytes: int | None, cfg: FewtuneConfig) -> tuple[str, str]:
    """method auto: the dataset-size table, then what fits in the GPU's memory (`gpu_bytes` None: no GPU)."""
    t = cfg.train
    row = next((text for limit, text in SIZE_TABLE if n_rows < limit), "over 100,000 rows: full fine-tuning viable")
    if n_rows >= t.full_from_rows:
        method, why = "full", f"{n_rows:,} training rows ({row}; train.full_from_rows={t.full_from_rows:,})"
        if gpu_bytes is None or params * t.full_bytes_per_param <= gpu_bytes:
            return method, why
        why += (
            f"; but full fine-tuning needs ~{params * t.full_bytes_per_param / 2**30:.1f} GiB "
            f"({t.full_bytes_per_param:g} bytes per weight) and the GPU has {gpu_bytes / 2**30:.1f} GiB, so LoRA"
        )
    else:
        why = f"{n_rows:,} training rows ({row}); LoRA: few trainable weights, least overfitting and forgetting"
    if gpu_bytes is not None and params * 2 > t.qlora_above_gpu_share * gpu_bytes:
        return "qlora", (
            f"{why}; the bf16 weights (~{params * 2 / 2**30:.1f} GiB) take more than "
            f"{t.qlora_above_gpu_share:.0%} of the GPU's {gpu_bytes / 2**30:.1f} GiB, so QLoRA (4-bit NF4 base)"
        )
    return "lora", why


def choose_learning_rate(method: str, incremental: bool, cfg: FewtuneConfig, labelled: bool = False) -> tuple[float, str]:
    """learning_rate auto: per method; LoRA on labelled rows `train.label_learning_rate`; x incremental_lr_factor
    when continuing an adapter."""
    t = cfg.train
    if t.learning_rate != "auto":
        return float(t.learning_rate), "set in the config"
    lr = AUTO_LEARNING_RATES[method]
    why = f"auto for {method}: {lr:g}"
    if labelled and method in ("lora", "qlora"):
        lr = t.label_learning_rate
        why = f"auto for {method} on labelled rows: train.label_learning_rate {lr:g}"
    if incremental:
        lr *= t.incremental_lr_factor
        why += f" x incremental_lr_factor {t.incremental_lr_factor:g} (continuing from an existing adapter) = {lr:g}"
    return lr, why


def choose_epochs(n_rows: int, cfg: FewtuneConfig) -> tuple[float, str]:
    t = cfg.train
    if t.epochs != "auto":
        return float(t.epochs), "set in the config"
    raw = t.epochs_target_examples / max(1, n_rows)
    epochs = float(min(t.epochs_max, max(t.epochs_min, round(raw))))
    return epochs, (
        f"auto: {t.epochs_target_examples:,} examples to show / {n_rows:,} rows = {raw:.1f} passes, kept within "
        f"[{t.epochs_min:g}, {t.epochs_max:g}]: {epochs:g} (early stopping ends sooner when validation stops improving)"
    )


def choose_replay_fraction(n_rows: int, cfg: FewtuneConfig) -> tuple[float, str]:
    t = cfg.train
    if t.replay_fraction != "auto":
        return float(t.replay_fraction), "set in the config"
    if n_rows < t.replay_auto_below_rows:
        return t.replay_auto_fraction, (
            f"auto: {n_rows:,} training rows < {t.replay_auto_below_rows:,} (small data forgets most): "
            f"{t.replay_auto_fraction:g} of the training mix is general-text replay"
        )
    return 0.0, f"auto: {n_rows:,} training rows >= {t.replay_auto_below_rows:,}: no replay"


def count_parameters(base_path: str) -> int:
    """Weights of the base model, counted on the meta device (nothing is loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def gpu_memory_bytes() -> int | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return int(torch.cuda.get_device_properties(0).total_memory)


def next_micro_batch(batch_size: int, accumulation: int, device: str = "cuda") -> tuple[int, int]:
    """After an out-of-memory error: half the micro-batch, twice the accumulation (same effective batch)."""
    if batch_size <= 1:
        hint = "use train.method qlora, " if device == "cuda" else "set model.dtype bfloat16, close other programs, "
        raise TrainingError(
            f"out of {'GPU' if device == 'cuda' else 'CPU'} memory even at micro-batch 1; lower model.max_length, "
            f"{hint}or set train.lora_top_layers"
        )
    return batch_size // 2, accumulation * 2


# train field -> the field that replaces it on labelled rows where the config leaves it at its default
# (learning_rate auto: `choose_learning_rate`, so that the incremental factor still applies)
LABEL_SETTINGS = {
    "epochs": "label_epochs",
    "lora_top_layers": "label_lora_top_layers",
    "batch_size": "label_batch_size",
    "replay_auto_fraction": "label_replay_auto_fraction",
}


def is_labelled(records: list[dict[str, Any]]) -> bool:
    return bool(records) and all(r.get("label") not in (None, "") for r in records)


def _at_default(t, field: str) -> bool:
    if field == "epochs":
        return t.epochs == "auto"
    return getattr(t, field) == type(t).model_fields[field].default


def labelled_settings(cfg: FewtuneConfig, records: list[dict[str, Any]]) -> tuple[FewtuneConfig, dict[str, str]]:
    """Labelled rows (every row has a label): the `train.label_*` settings for each of epochs (auto),
    lora_top_layers (unset), batch_size and replay_auto_fraction (their defaults) that the config leaves at its
    default (a value the config sets is kept; read from the values, so a config written out and read back behaves
    the same).
    Returns the config to train with and why each setting changed."""
    if not is_labelled(records):
        return cfg, {}
    t = cfg.train
    lora = t.method in ("lora", "qlora") or (t.method == "auto" and len(records) < t.full_from_rows)
    chosen = {field: getattr(t, label_field) for field, label_field in LABEL_SETTINGS.items()
              if _at_default(t, field) and (lora or field != "lora_top_layers")}  # (measured for LoRA)
    if not chosen:
        return cfg, {}
    why = {field: f"labelled rows: train.{LABEL_SETTINGS[field]} = {value}" for field, value in chosen.items()}
    return cfg.model_copy(update={"train": t.model_copy(update=chosen)}), why
