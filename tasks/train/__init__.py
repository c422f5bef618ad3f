"""Train an adapter on the validated rows with the transformers Trainer and PEFT.

- Method and hyper-parameters: explicit config values, or `auto` choices made from the training-set size and the
  hardware (`plan_training`); every choice and its reason goes to `train_plan.json` and the log.
- Methods: LoRA, QLoRA (4-bit NF4 base, CUDA only), prefix tuning, IA3, and full fine-tuning of the transformer blocks
  (saved in PEFT format too, so evaluation, registration and serving load every method the same way).
- Loss on assistant tokens only (labels from `encode_chat`); a row left with no trainable token is an error.
- Replay: a share of general-text rows is mixed into training against forgetting (`data.replay`, else part of the
  probe set, which is then kept out of the forgetting measurement).
- A validation slice is held out of the *training* rows for early stopping, the over-memorization guard and
  best-checkpoint selection, so the eval/test set stays untouched until the evaluate stage.
- Early stopping on validation loss; the over-memorization guard stops when the validation perplexity has risen at
  several evaluations in a row; the best checkpoint is restored at the end and saved as the adapter.
- Checkpoints at each evaluation under the stage folder; a re-run after a crash (even `kill -9`) resumes from the last
  complete one with the same data order (seeded, epoch-indexed length-grouped sampler).
- On CUDA out-of-memory the run is retried with half the micro-batch and twice the accumulation.
- Incremental mode: start from an existing adapter (e.g. the registered champion) at a lower learning rate.
- `python -m tasks.train ...` runs this stage alone; `accelerate launch -m tasks.train ...` runs it on several GPUs.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from tasks.config import ConfigError, FewtuneConfig
from tasks.common.records import read_jsonl, split_train_eval, write_jsonl
from tasks.health import health_callback
from tasks.common.models import EncodingError, ModelError, encode_chat, load_tokenizer, pick_device, pick_dtype
from tasks.common.tracking import tracking_callbacks

log = logging.getLogger("fewtune.train")

METHODS = ("lora", "qlora", "prefix", "ia3", "full")
# learning_rate auto, per method (reasons in the config field's description and in docs/training.md).
AUTO_LEARNING_RATES = {"lora": 2e-4, "qlora": 2e-4, "ia3": 3e-3, "prefix": 1e-2, "full": 2e-5}
# The method-by-dataset-size table of the background notes, quoted in the reason of an auto choice.
SIZE_TABLE = (
    (1_000, "under 1,000 rows: LoRA or prefix tuning"),
    (10_000, "1,000-10,000 rows: LoRA or adapters"),
    (100_000, "10,000-100,000 rows: adapters or partial fine-tuning"),
)
PEFT_TYPE_TO_METHOD = {"LORA": "lora", "PREFIX_TUNING": "prefix", "IA3": "ia3", "LN_TUNING": "full"}
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CHECKPOINT_PREFIX = "checkpoint-"


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. out of GPU memory at micro-batch 1); the message says what to change."""


# ----------------------------------------------------------------------------------------------------------------
# Auto choices


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


def choose_learning_rate(method: str, incremental: bool, cfg: FewtuneConfig) -> tuple[float, str]:
    t = cfg.train
    if t.learning_rate != "auto":
        return float(t.learning_rate), "set in the config"
    lr = AUTO_LEARNING_RATES[method]
    why = f"auto for {method}: {lr:g}"
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


# ----------------------------------------------------------------------------------------------------------------
# Replay


def split_probe(probe: list[dict[str, Any]], cfg: FewtuneConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(replay pool, measurement rows): a seeded hash of the row ids decides; the same probe always splits the same."""
    measure, pool = split_train_eval(probe, cfg.train.replay_probe_share, cfg.train.seed)
    return pool, measure


def replay_rows(pool: list[dict[str, Any]], fraction: float, n_train: int, seed: int) -> list[dict[str, Any]]:
    """`fraction` of the final training mix drawn from `pool` (without repeats, so at most the whole pool)."""
    if fraction <= 0 or not pool:
        return []
    wanted = round(n_train * fraction / (1 - fraction))
    ranked = sorted(pool, key=lambda r: hashlib.sha256(f"{seed}:{r['id']}".encode()).hexdigest())  # any file order
    return [{**r, "id": f"replay-{r['id']}"} for r in ranked[:wanted]]


# ----------------------------------------------------------------------------------------------------------------
# Data


def _encode_all(tokenizer, records: list[dict[str, Any]], max_length: int) -> list[dict[str, Any]]:
    rows = []
    for r in records:
        enc = encode_chat(tokenizer, r, max_length)  # a row with no answer token left raises EncodingError here
        enc["length"] = len(enc["input_ids"])
        rows.append(enc)
    return rows


def make_collator(tokenizer):
    """Pads each micro-batch to its longest row; padded labels are -100, so only real answer tokens carry loss."""
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)


class LengthGroupedSampler:
    """Shuffled, length-grouped order that depends only on (seed, epoch): a resumed run sees the same batches.

    Each epoch: shuffle the rows, cut them into groups of `group_batches` micro-batches (at least four groups an
    epoch, so the batches still vary between epochs), sort each group by length, cut the whole order into
    micro-batches, shuffle the full batches (the short last one stays last so batch boundaries hold).
    """

    def __init__(self, lengths: list[int], batch_size: int, group_batches: int, seed: int):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        n_batches = math.ceil(len(self.lengths) / batch_size)
        self.group_size = batch_size * max(1, min(group_batches, n_batches // 4))
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def indices(self) -> list[int]:
        import torch

        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        grouped: list[int] = []
        for start in range(0, len(order), self.group_size):
            grouped += sorted(order[start : start + self.group_size], key=lambda i: self.lengths[i], reverse=True)
        batches = [grouped[i : i + self.batch_size] for i in range(0, len(grouped), self.batch_size)]
        tail = batches.pop() if batches and len(batches[-1]) < self.batch_size else None
        perm = torch.randperm(len(batches), generator=g).tolist()
        batches = [batches[i] for i in perm] + ([tail] if tail else [])
        return [i for b in batches for i in b]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices())


# ----------------------------------------------------------------------------------------------------------------
# Trainer parts


def _trainer_class():
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


def rising_streak(values: list[float]) -> int:
    """How many of the last values each rose above the one before (0 when the last one did not rise)."""
    streak = 0
    for prev, cur in zip(values[-2::-1], values[::-1]):
        if cur > prev:
            streak += 1
        else:
            break
    return streak


def _eval_losses(history: list[dict[str, Any]]) -> list[float]:
    return [h["eval_loss"] for h in history if "eval_loss" in h]


def _callbacks(cfg: FewtuneConfig):
    from transformers import EarlyStoppingCallback, TrainerCallback

    class OverMemorizationGuard(TrainerCallback):
        """Stops when the validation slice's perplexity, exp(eval_loss), has risen at `patience` evaluations in a row.

        Stateless: it reads the evaluations from the trainer state, so it works unchanged after a resume.
        """

        def __init__(self, patience: int):
            self.patience = patience

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            losses = _eval_losses(state.log_history)
            if rising_streak(losses) >= self.patience:
                ppl = [round(math.exp(x), 3) for x in losses[-self.patience - 1 :]]
                log.warning(
                    "over-memorization guard: validation perplexity rose %d evaluations in a row (%s); stopping",
                    self.patience,
                    " -> ".join(map(str, ppl)),
                )
                control.should_training_stop = True

    t = cfg.train
    return EarlyStoppingCallback(early_stopping_patience=t.early_stopping_patience), OverMemorizationGuard(
        t.overmemorization_patience
    ), step_timer()


def step_timer():
    """A callback that sums the time and the real (non-pad) tokens inside optimizer steps only — no evaluation or
    checkpoint writing. Needs `include_num_input_tokens_seen="non_padding"`; read `.seconds` and `.tokens`."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds = 0.0
            self.tokens = 0
            self.steps = 0
            self._t0 = 0.0
            self._tok0 = 0

        def on_step_begin(self, args, state, control, **kwargs):
            self._t0, self._tok0 = time.perf_counter(), state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds += time.perf_counter() - self._t0
            self.tokens += state.num_input_tokens_seen - self._tok0
            self.steps += 1

    return StepTimer()


def stop_reason(history: list[dict[str, Any]], steps: int, planned_steps: int, guard_patience: int) -> str:
    """completed | over_memorization (validation perplexity kept rising) | early_stopping (it stopped improving)."""
    if steps >= planned_steps:
        return "completed"
    if rising_streak(_eval_losses(history)) >= guard_patience:
        return "over_memorization"
    return "early_stopping"


def next_micro_batch(batch_size: int, accumulation: int) -> tuple[int, int]:
    """After an out-of-memory error: half the micro-batch, twice the accumulation (same effective batch)."""
    if batch_size <= 1:
        raise TrainingError(
            "out of GPU memory even at micro-batch 1; lower model.max_length, use train.method qlora, "
            "or set train.lora_top_layers"
        )
    return batch_size // 2, accumulation * 2


# ----------------------------------------------------------------------------------------------------------------
# Models


def peft_config(method: str, cfg: FewtuneConfig, n_layers: int):
    """The PEFT config of `method`; `lora_top_layers` restricts lora/qlora/ia3/full to the top N blocks."""
    from peft import IA3Config, LNTuningConfig, LoraConfig, PrefixTuningConfig

    t = cfg.train
    top = list(range(max(0, n_layers - t.lora_top_layers), n_layers)) if t.lora_top_layers else None
    if method in ("lora", "qlora"):
        targets: list[str] | str = t.target_modules
        if top and targets == "all-linear":
            targets = LLAMA_LINEAR  # PEFT accepts layers_to_transform only with named modules
        return LoraConfig(
            r=t.lora_r,
            lora_alpha=t.lora_alpha,
            lora_dropout=t.lora_dropout,
            target_modules=targets,
            layers_to_transform=top,
            task_type="CAUSAL_LM",
        )
    if method == "ia3":
        # IA3 rescales keys, values and the MLP's down projection (its defaults for Llama); top N blocks by regex.
        blocks = r"layers\.(" + "|".join(str(i) for i in top) + r")\." if top else r"layers\.\d+\."
        return IA3Config(
            target_modules=rf".*{blocks}(self_attn\.[kv]_proj|mlp\.down_proj)$",
            feedforward_modules=rf".*{blocks}mlp\.down_proj$",
            task_type="CAUSAL_LM",
        )
    if method == "prefix":
        return PrefixTuningConfig(num_virtual_tokens=t.prefix_tokens, task_type="CAUSAL_LM")
    if method == "full":
        # Every weight of the chosen transformer blocks (linear layers and norms) trains as a PEFT "LN tuning"
        # copy, so the result saves, merges and loads like any adapter. Token embeddings stay frozen.
        layers = "|".join(str(i) for i in top) if top else r"\d+"
        parts = r"self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj|input_layernorm|post_attention_layernorm"
        final_norm = "" if top else r"|model\.norm"
        return LNTuningConfig(target_modules=rf".*(layers\.({layers})\.({parts}){final_norm})$", task_type="CAUSAL_LM")
    raise ConfigError(f"train.method {method!r}: use one of auto, {', '.join(METHODS)}")


def _load_base(base_path: str, method: str, device: str, dtype):
    import torch

    from tasks.common.models import load_model

    if method != "qlora":
        return load_model(base_path, dtype=dtype, device=device)
    if device != "cuda":
        raise ConfigError(
            "train.method qlora needs a CUDA GPU (torch.cuda.is_available() is False here; bitsandbytes imports on "
            "a CPU but 4-bit training is GPU-only); use train.method lora"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("train.method qlora needs bitsandbytes: pip install 'fewtune[gpu]'") from None
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16,
    )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            base_path, quantization_config=quant, dtype=quant.bnb_4bit_compute_dtype, device_map={"": 0}
        )
    except Exception as exc:
        raise ModelError(f"could not load {base_path!r} in 4-bit: {type(exc).__name__}: {exc}") from None
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)


def build_model(method: str, base_path: str, cfg: FewtuneConfig, device: str, dtype, init_adapter: str | None):
    """The base model with a fresh adapter of `method`, or with `init_adapter` loaded trainable."""
    from peft import PeftModel, get_peft_model

    model = _load_base(base_path, method, device, dtype)
    model.config.use_cache = False
    if init_adapter:
        try:
            return PeftModel.from_pretrained(model, init_adapter, is_trainable=True)
        except Exception as exc:
            raise ModelError(
                f"could not load the adapter {init_adapter} onto {base_path}: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}\n  fix: train.init_adapter must be an adapter of "
                "the same base model (model.base)"
            ) from None
    return get_peft_model(model, peft_config(method, cfg, model.config.num_hidden_layers))


def adapter_method(adapter_dir: str | Path) -> str:
    """fewtune method of a saved PEFT adapter (from its adapter_config.json)."""
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        raise ConfigError(f"train.init_adapter: {path} not found; point it at a PEFT adapter folder or use `champion`")
    peft_type = json.loads(path.read_text()).get("peft_type")
    if peft_type not in PEFT_TYPE_TO_METHOD:
        raise ConfigError(f"train.init_adapter: {path} holds a {peft_type} adapter; fewtune continues {', '.join(PEFT_TYPE_TO_METHOD)}")
    return PEFT_TYPE_TO_METHOD[peft_type]


# ----------------------------------------------------------------------------------------------------------------
# Incremental mode: the champion's adapter


@dataclass(frozen=True)
class InitAdapter:
    path: str
    source: str  # what the config said: a folder, or "champion"
    fingerprint: str  # changes when the adapter changes; part of the train stage's cache key


def _folder_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def champion_adapter(cfg: FewtuneConfig) -> InitAdapter | None:
    """The adapter of the registered model's `champion` version (downloaded once), or None when there is none."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from tasks.common.home import fewtune_home
    from tasks.common.registry import CHAMPION, tracking_uri

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    uri = tracking_uri(cfg)
    name = cfg.register_.model_name
    try:
        version = MlflowClient(uri).get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    target = fewtune_home() / "champions" / f"{name}-v{version.version}"
    if not (target.exists() and any(target.rglob("adapter_config.json"))):
        tmp = target.with_name(target.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        mlflow.set_tracking_uri(uri)
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version.version}", dst_path=str(tmp))
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    found = sorted(target.rglob("adapter_config.json"))
    if not found:
        raise ModelError(f"{name} version {version.version} (champion) holds no adapter under {target}")
    folder = found[0].parent
    return InitAdapter(str(folder), f"champion ({name} version {version.version})", _folder_hash(folder))


def resolve_init_adapter(cfg: FewtuneConfig) -> InitAdapter | None:
    """train.init_adapter as a local folder: `champion` asks the registry; None when training starts fresh."""
    spec = cfg.train.init_adapter
    if not spec:
        return None
    if spec == "champion":
        found = champion_adapter(cfg)
        if found is None:
            log.info("incremental mode: %s has no champion yet; training a fresh adapter", cfg.register_.model_name)
        return found
    folder = Path(spec).expanduser().resolve()
    adapter_method(folder)  # clear error when it is not an adapter folder
    return InitAdapter(str(folder), spec, _folder_hash(folder))


# ----------------------------------------------------------------------------------------------------------------
# Training


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
    probe_eval_path: str | None = None  # the probe rows left for measuring forgetting, when replay used the probe
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

    `replay`: general-text rows for the replay mix; without them, part of `probe` is used (and the rest written to
    `out_dir/probe_eval.jsonl` for the forgetting measurement). `init_adapter`: continue this adapter.
    `token_masks`: a score stage's `scores.parquet` whose STM masks the data collator applies (`tasks/common/stm.py`).
    """
    import torch
    from datasets import Dataset
    from transformers import TrainingArguments, set_seed

    t = cfg.train
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out_dir / "checkpoints"
    device = pick_device()
    dtype = pick_dtype(cfg.model.dtype, device)

    # Rows: validation slice (domain rows only), then the replay mix.
    train_rows, val_rows = split_train_eval(records, t.validation_fraction, t.seed)
    if not val_rows or not train_rows:
        raise EncodingError(
            f"{len(records)} training row(s) are too few to hold out a validation slice for early stopping; "
            "add rows (validate.min_rows) or raise train.validation_fraction"
        )
    fraction, fraction_why = choose_replay_fraction(len(records), cfg)
    probe_eval: list[dict[str, Any]] | None = None
    source: str | None = None
    if replay:
        pool, source = replay, "data.replay"
    elif probe and fraction > 0:
        pool, probe_eval = split_probe(probe, cfg)
        source = f"data.probe ({len(pool)} of {len(probe)} rows; forgetting is measured on the other {len(probe_eval)})"
        if not pool:
            probe_eval, source = None, None
    else:
        pool = []
    mixed = replay_rows(pool, fraction, len(train_rows), t.seed)
    if fraction > 0 and not pool:
        fraction_why += "; no replay source (set data.replay or data.probe): no replay rows"
    elif fraction > 0 and len(mixed) < round(len(train_rows) * fraction / (1 - fraction)):
        fraction_why += f"; the pool holds only {len(pool)} rows: all of them are used"

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
    lr, lr_why = choose_learning_rate(method, bool(init_adapter), cfg)
    epochs, epochs_why = choose_epochs(len(records), cfg)
    plan = TrainPlan(
        method=method,
        learning_rate=lr,
        epochs=epochs,
        replay_fraction=fraction,
        replay_rows=len(mixed),
        replay_source=source if mixed else None,
        init_adapter=init_adapter,
        batch_size=t.batch_size,
        gradient_accumulation=t.gradient_accumulation,
        train_rows=len(train_rows),
        validation_rows=len(val_rows),
        params=params,
        reasons={"method": method_why, "learning_rate": lr_why, "epochs": epochs_why, "replay_fraction": fraction_why},
    )
    for key, why in plan.reasons.items():
        log.info("train %s = %s: %s", key, getattr(plan, key), why)
    plan_path = out_dir / "train_plan.json"
    main_process = int(os.environ.get("RANK", "0")) == 0
    if main_process:
        plan_path.write_text(json.dumps(plan.to_dict(), indent=2))
        if probe_eval is not None and mixed:
            write_jsonl(out_dir / "probe_eval.jsonl", probe_eval)

    tokenizer = load_tokenizer(base_path)
    train_ds = Dataset.from_list(_encode_all(tokenizer, train_rows + mixed, cfg.model.max_length))
    val_ds = Dataset.from_list(_encode_all(tokenizer, val_rows, cfg.model.max_length))
    loss_tokens = sum(sum(1 for x in labels if x != -100) for labels in train_ds[: len(train_rows)]["labels"])
    collator = make_collator(tokenizer)
    if token_masks:  # Selective Token Masking: masked answer tokens carry no loss
        from tasks.common.stm import masking_collator

        collator = masking_collator(collator, token_masks, rows=train_ds["input_ids"])

    batch, accum = t.batch_size, t.gradient_accumulation
    oom_retries = 0
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    while True:
        set_seed(t.seed)
        model = build_model(method, base_path, cfg, device, dtype, init_adapter)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info("%s: %d trainable parameters of %d", method, trainable, params)
        per_step = batch * accum * int(os.environ.get("WORLD_SIZE", "1"))
        steps_per_epoch = max(1, math.ceil(len(train_ds) / per_step))
        eval_every = max(1, steps_per_epoch // t.evals_per_epoch)
        args = TrainingArguments(
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
        early, guard, timer = _callbacks(cfg)
        extra = tracking_callbacks(cfg, out_dir)  # TensorBoard / W&B (train.report_to)
        if cfg.health.live_warnings:
            extra.append(health_callback(cfg, loss_tokens, len(train_rows)))
        trainer = _trainer_class()(
            model=model,
            args=args,
            train_dataset=train_ds,
            eval_dataset=val_ds,
            data_collator=collator,
            callbacks=[early, guard, timer, *extra],
            group_batches=t.length_group_batches,
        )
        resume = last_checkpoint(ckpt_dir)
        if resume:
            log.info("resuming training from %s", resume)
        start = time.perf_counter()
        out_of_memory = False
        try:
            trainer.train(resume_from_checkpoint=resume)
        except torch.OutOfMemoryError:
            if device != "cuda":
                raise
            out_of_memory = True  # handled below, once the traceback no longer holds the failed step's tensors
        if not out_of_memory:
            break
        new_batch, new_accum = next_micro_batch(batch, accum)
        log.warning(
            "CUDA out of memory at micro-batch %d; retrying with micro-batch %d x accumulation %d (same effective batch)",
            batch,
            new_batch,
            new_accum,
        )
        del trainer, model
        gc.collect()
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
        probe_eval_path=str(out_dir / "probe_eval.jsonl") if probe_eval is not None and mixed else None,
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
    losses = _eval_losses(history)
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


# ----------------------------------------------------------------------------------------------------------------
# Several processes: `accelerate launch`


def launch_command(cfg: FewtuneConfig, args: list[str]) -> list[str]:
    """`accelerate launch` (one process per GPU) running this module with `args`."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(cfg.train.num_processes)]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu"]
    return cmd + ["-m", "tasks.train", *args]


def train_adapter_launched(
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
    """`train_adapter` in `train.num_processes` processes under `accelerate launch` (DDP or FSDP)."""
    out_dir = Path(out_dir)
    inputs = out_dir / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    (inputs / "config.json").write_text(json.dumps(cfg.dump()))
    args = ["--config", str(inputs / "config.json"), "--train", str(write_jsonl(inputs / "train.jsonl", records))]
    args += ["--base", base_path, "--out", str(out_dir)]
    if probe:
        args += ["--probe", str(write_jsonl(inputs / "probe.jsonl", probe))]
    if replay:
        args += ["--replay", str(write_jsonl(inputs / "replay.jsonl", replay))]
    if init_adapter:
        args += ["--init-adapter", init_adapter]
    if token_masks:
        args += ["--token-masks", token_masks]
    cmd = launch_command(cfg, args)
    log.info("launching: %s", " ".join(cmd))
    done = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[2])
    result_file = out_dir / "train_result.json"
    if done.returncode != 0 or not result_file.is_file():
        raise TrainingError(f"distributed training failed (exit code {done.returncode}); see the output above. Command: {' '.join(cmd)}")
    return TrainResult(**json.loads(result_file.read_text()))


def main(argv: list[str] | None = None) -> int:
    """Run the train stage alone: `python -m tasks.train --config C --train ROWS --base MODEL --out DIR`."""
    p = argparse.ArgumentParser(prog="python -m tasks.train", description=main.__doc__)
    p.add_argument("--config", required=True, help="fewtune config: YAML file, or the JSON a run wrote")
    p.add_argument("--train", required=True, help="training rows (canonical JSONL, e.g. a run's data/train.jsonl)")
    p.add_argument("--base", required=True, help="base model folder (model.base resolved)")
    p.add_argument("--out", required=True, help="output folder (adapter/, checkpoints/, train_result.json)")
    p.add_argument("--probe", help="probe rows (JSONL) for the replay mix")
    p.add_argument("--replay", help="general-text rows (JSONL) for the replay mix")
    p.add_argument("--init-adapter", help="adapter folder to continue (incremental mode)")
    p.add_argument("--token-masks", help="scores.parquet whose STM token masks apply (score.token_masking)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if a.config.endswith(".json"):
            cfg = FewtuneConfig.model_validate(json.loads(Path(a.config).read_text()))
        else:
            from tasks.config import load_config

            cfg = load_config(a.config)
        result = train_adapter(
            read_jsonl(a.train),
            cfg,
            a.base,
            Path(a.out),
            probe=read_jsonl(a.probe) if a.probe else None,
            replay=read_jsonl(a.replay) if a.replay else None,
            init_adapter=a.init_adapter,
            token_masks=a.token_masks,
        )
    except (ConfigError, EncodingError, ModelError, TrainingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result.to_dict(), indent=2))
    return 0
