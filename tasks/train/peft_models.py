"""The model being trained: the PEFT config of each method, the base model (4-bit for QLoRA, CUDA only), a fresh
adapter or an existing one loaded trainable, and the method of a saved adapter."""

from __future__ import annotations

import json
from pathlib import Path

from tasks.common.models import LOAD_LOCK, ModelError, load_model
from tasks.config import ConfigError, FewtuneConfig
from tasks.train.plan import METHODS

PEFT_TYPE_TO_METHOD = {"LORA": "lora", "PREFIX_TUNING": "prefix", "IA3": "ia3", "LN_TUNING": "full"}
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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


def load_training_base(base_path: str, method: str, device: str, dtype):
    """The base model as `method` trains it (4-bit NF4 and prepared for k-bit training for qlora)."""
    import torch

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
        with LOAD_LOCK:
            model = AutoModelForCausalLM.from_pretrained(
                base_path, quantization_config=quant, dtype=quant.bnb_4bit_compute_dtype, device_map={"": 0}
            )
    except Exception as exc:
        raise ModelError(f"could not load {base_path!r} in 4-bit: {type(exc).__name__}: {exc}") from None
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)


def build_model(method: str, base_path: str, cfg: FewtuneConfig, device: str, dtype, init_adapter: str | None,
                base=None):
    """The base model with a fresh adapter of `method`, or with `init_adapter` loaded trainable. `base`: the base
    model already loaded by `load_training_base` (else it is loaded here)."""
    from peft import PeftModel, get_peft_model

    model = base if base is not None else load_training_base(base_path, method, device, dtype)
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
