"""A merged Llama-architecture model folder written as one GGUF file (f16 or q8_0) for llama.cpp and Ollama.

This is the reverse of what loading a GGUF base does (`tasks.common.models.convert_gguf`, through transformers'
GGUF reader): Hugging Face tensor names become GGUF names through the `gguf` package's own name map, the query and
key projections get the row order llama.cpp expects (the permutation its converter applies, undone by every GGUF
reader), the byte-level BPE tokenizer goes in as `gpt2` tokens, types and merges, with its special ids and chat
template. Norms and other 1-D tensors stay f32, as llama.cpp's converter keeps them; q8_0 quantizes every 2-D
weight whose rows are a multiple of 32 values (else f16).

Only the Llama architecture (Llama, SmolLM, Mistral-shaped dense models without biases or sliding windows) is
written; anything else is one clear `ExportError`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tasks.common.models import ModelError

FORMATS = ("f16", "q8_0")
SUPPORTED = ("LlamaForCausalLM",)


class ExportError(ModelError):
    """A model or setting that cannot be exported; the message says what is supported."""


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row order for the rotary halves of a q/k projection (its converter's `permute`)."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _tokens(folder: Path) -> tuple[list[str], list[int], list[str]]:
    """Token texts by id, their GGUF token types, and the BPE merges of a fast byte-level BPE tokenizer."""
    import gguf

    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "BPE" or (data.get("decoder") or {}).get("type") != "ByteLevel":
        raise ExportError(f"{folder}: GGUF export supports byte-level BPE tokenizers (GPT-2 style) only")
    by_id = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in data.get("added_tokens") or []}
    by_id.update({i: a["content"] for i, a in added.items()})
    size = max(by_id) + 1
    tokens, types = [], []
    for i in range(size):
        text = by_id.get(i)
        if text is None:  # a hole in the ids: llama.cpp's converter pads with unused tokens
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(text)
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(text)
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return tokens, [int(t) for t in types], merges


def _special_ids(folder: Path, tokens: list[str]) -> dict[str, int]:
    """bos/eos/unk/pad token ids from tokenizer_config.json and the generation config."""
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    ids: dict[str, int] = {}
    for kind in ("bos", "eos", "unk", "pad"):
        value = config.get(f"{kind}_token")
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str) and value in tokens:
            ids[kind] = tokens.index(value)
    return ids


def _chat_template(folder: Path) -> str | None:
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    if isinstance(config.get("chat_template"), str):
        return config["chat_template"]
    jinja = folder / "chat_template.jinja"
    return jinja.read_text(encoding="utf-8") if jinja.is_file() else None


def _tensor_type(name: str, array: np.ndarray, kind: str):
    import gguf

    if array.ndim == 1 or name.endswith("_norm.weight"):
        return gguf.GGMLQuantizationType.F32
    if kind == "q8_0" and array.shape[-1] % 32 == 0:
        return gguf.GGMLQuantizationType.Q8_0
    return gguf.GGMLQuantizationType.F16


def write_gguf(folder: Path, out_file: Path, kind: str = "f16", pre_tokenizer: str = "default",
               name: str | None = None, progress: Callable[[int, int], None] | None = None) -> Path:
    """Write the merged model folder `folder` (safetensors, config.json, tokenizer) as a GGUF file of `kind`."""
    import gguf
    import torch
    from safetensors import safe_open

    if kind not in FORMATS:
        raise ExportError(f"GGUF type {kind!r} is not written; use one of {', '.join(FORMATS)}")
    config: dict[str, Any] = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    arch = (config.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED or config.get("attention_bias") or config.get("mlp_bias"):
        raise ExportError(f"{folder}: GGUF export supports {', '.join(SUPPORTED)} without biases; this model is {arch}. "
                          "Export --format merged instead and convert it with llama.cpp's convert_hf_to_gguf.py")
    n_head, n_kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    n_layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // n_head
    tokens, types, merges = _tokens(folder)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)

    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_suffix(out_file.suffix + ".partial")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name(name or folder.name)
    writer.add_block_count(n_layers)
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(float(config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(len(tokens))
    writer.add_rope_dimension_count(head_dim)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if kind == "q8_0" else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for kind_name, token_id in _special_ids(folder, tokens).items():
        getattr(writer, {"bos": "add_bos_token_id", "eos": "add_eos_token_id", "unk": "add_unk_token_id",
                         "pad": "add_pad_token_id"}[kind_name])(token_id)
    writer.add_add_bos_token(False)
    writer.add_add_space_prefix(False)
    if (template := _chat_template(folder)) is not None:
        writer.add_chat_template(template)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{folder}: no .safetensors weights to export")
    total = sum(len(safe_open(str(f), "pt").keys()) for f in files)
    done = 0
    for key, tensor in ((k, h.get_tensor(k)) for f in files for h in [safe_open(str(f), "pt")] for k in h.keys()):
        done += 1
        array = tensor.to(torch.float32).numpy()
        if key == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue  # llama.cpp reuses token_embd for a tied output
        target = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise ExportError(f"{folder}: tensor {key!r} has no GGUF name for the llama architecture")
        if key.endswith("self_attn.q_proj.weight"):
            array = _permute(array, n_head)
        elif key.endswith("self_attn.k_proj.weight"):
            array = _permute(array, n_kv)
        qtype = _tensor_type(target, array, kind)
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(target, array.astype(np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(target, array.astype(np.float16))
        else:
            writer.add_tensor(target, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        if progress:
            progress(done, total)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(out_file)
    return out_file


CHATML_MODELFILE = '''FROM ./GGUF_FILE
TEMPLATE """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""
PARAMETER stop "<|im_end|>"
PARAMETER temperature 0
'''


def modelfile(gguf_name: str, chat_template: str | None, system_prompt: str | None) -> str:
    """An Ollama Modelfile for the GGUF: ChatML templates are written in Ollama's template language; any other
    template is left to Ollama, which reads `tokenizer.chat_template` from the GGUF file."""
    text = (CHATML_MODELFILE.replace("GGUF_FILE", gguf_name) if chat_template and "<|im_start|>" in chat_template
            else f"FROM ./{gguf_name}\nPARAMETER temperature 0\n")
    if system_prompt:
        text += 'SYSTEM """' + system_prompt.replace('"""', '"') + '"""\n'
    return text
