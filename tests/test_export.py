"""`fewtune export`: merged weights equal base + adapter, GGUF read back by transformers answers as the merged model,
the peft export names its base portably, and bad sources or models are one clear message."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from flows.cli import main
from flows.cli.common import EXIT_USER_ERROR
from tasks.common.generation import GenerationSettings, generate_answers
from tasks.common.models import ModelError
from tasks.common.portable import BASE_ENV, resolve_portable, weights_fingerprint
from tasks.export import ExportError, export_model, parse_registry_ref
from tasks.export.gguf_file import write_gguf

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["Where is the shop?", "What are your opening hours?", "Can I return a bike I bought online?",
           "Do you repair bikes bought somewhere else?"]
SYSTEM = "You are the customer support assistant of Kestrel Cycles."
URI = "sqlite:///unused.db"


def make_run(root: Path, model_dir: Path, method: str = "lora") -> Path:
    """A run folder as the flow leaves it: adapter/ (non-zero LoRA weights), config.yaml and summary.json."""
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = (LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False) if method == "lora"
              else PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    run = root / f"run-{method}"
    get_peft_model(base, config).save_pretrained(run / "adapter")
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"base": str(model_dir)}}))
    (run / "summary.json").write_text(json.dumps({"base_model": str(model_dir), "validate": {"system_prompt": SYSTEM}}))
    return run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir) -> Path:
    return make_run(tmp_path_factory.mktemp("export"), tiny_model_dir)


@pytest.fixture(scope="module")
def merged_dir(run_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("merged") / "merged"
    export_model(str(run_dir), "merged", out, dtype="float32", tracking_uri=URI)
    return out


def _load(folder: Path, gguf: str | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = {"gguf_file": gguf} if gguf else {}
    tok = AutoTokenizer.from_pretrained(folder, **extra)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra).eval(), tok


def _answers(model, tok) -> list[str]:
    asked = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": p}] for p in PROMPTS]
    return generate_answers(model, tok, asked, GenerationSettings(max_new_tokens=12, max_length=128, batch_size=4), "answering")


def _logits(model, tok) -> torch.Tensor:
    ids = tok(" ".join(PROMPTS), return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits


def test_merged_folder_logits_equal_base_plus_adapter(run_dir, merged_dir, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {
        p.name for p in merged_dir.iterdir()}
    assert not any(p.name.startswith("adapter") for p in merged_dir.iterdir())  # plain weights, no peft needed
    merged, tok = _load(merged_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    plain_base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    got, want = _logits(merged, tok), _logits(reference, tok)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    assert (got - _logits(plain_base, tok)).abs().max() > 1e-2  # the adapter changed the model: not a no-op


def test_gguf_read_back_answers_as_the_merged_model(run_dir, merged_dir, tmp_path):
    out = tmp_path / "gguf"
    result = export_model(str(run_dir), "gguf", out, tracking_uri=URI)
    assert set(result.files) == {"model-f16.gguf", "model-q8_0.gguf", "Modelfile"}
    assert result.files["model-q8_0.gguf"] < result.files["model-f16.gguf"]
    merged, tok = _load(merged_dir)
    want_answers, want_logits = _answers(merged, tok), _logits(merged, tok)

    f16, f16_tok = _load(out, "model-f16.gguf")
    assert f16_tok(" ".join(PROMPTS))["input_ids"] == tok(" ".join(PROMPTS))["input_ids"]
    assert f16_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False)
    assert _answers(f16, f16_tok) == want_answers
    assert (_logits(f16, f16_tok) - want_logits).abs().max() < 5e-3  # f16 rounding of the weights

    q8, q8_tok = _load(out, "model-q8_0.gguf")
    q8_logits = _logits(q8, q8_tok)
    # q8_0 (8-bit blocks of 32 weights) tolerance: every weight tensor read back within 1% mean relative error,
    # the logits within 5% (mean |delta| over mean |logit|) and the same greedy token at >= 95% of positions
    want_weights = merged.state_dict()
    for name, weight in q8.state_dict().items():
        assert ((weight - want_weights[name]).abs().mean() / want_weights[name].abs().mean()) < 0.01, name
    assert ((q8_logits - want_logits).abs().mean() / want_logits.abs().mean()) < 0.05
    assert (q8_logits.argmax(-1) == want_logits.argmax(-1)).float().mean() >= 0.95

    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model-q8_0.gguf\n") and "<|im_start|>{{ .Role }}" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and f'SYSTEM """{SYSTEM}"""' in modelfile


def test_peft_export_names_its_base_portably(run_dir, tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "peft"
    result = export_model(str(run_dir), "peft", out, tracking_uri=URI)
    config = json.loads((out / "adapter_config.json").read_text())
    recorded = json.loads((out / "fewtune-base.json").read_text())
    assert str(tiny_model_dir) not in json.dumps(config) and str(tiny_model_dir) not in json.dumps(recorded)
    assert recorded["fingerprint"] == weights_fingerprint(tiny_model_dir) == result.base["fingerprint"]
    assert recorded["system_prompt"] == SYSTEM and (out / "adapter_model.safetensors").is_file()
    # Another machine: the weights copied elsewhere, found through FEWTUNE_BASE_MODEL and checked by fingerprint.
    elsewhere = shutil.copytree(tiny_model_dir, tmp_path / "other-machine" / "base")
    monkeypatch.setenv(BASE_ENV, str(elsewhere))
    assert resolve_portable(recorded).path == str(elsewhere.resolve())
    weights = next(elsewhere.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)  # other weights under the same name
    with pytest.raises(ModelError, match="weights differ from the ones the adapter was trained on"):
        resolve_portable(recorded)


def test_cli_exports_with_progress_and_refuses_bad_input(run_dir, tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "cli-gguf"
    assert main(["export", str(run_dir), "--format", "gguf", "--gguf-types", "f16", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"exported {run_dir} as gguf to {out}" in printed and "model-f16.gguf" in printed
    assert main(["export", str(run_dir), "--format", "gguf", "--out", str(out)]) == EXIT_USER_ERROR  # not empty
    assert "exists and is not empty" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "nothing-here"), "--out", str(tmp_path / "x")]) == EXIT_USER_ERROR
    assert "neither a run folder nor a registry reference" in capsys.readouterr().out
    prefix_run = make_run(tmp_path, tiny_model_dir, "prefix")
    assert main(["export", str(prefix_run), "--out", str(tmp_path / "prefix-merged")]) == EXIT_USER_ERROR
    assert "cannot be merged" in capsys.readouterr().out and not (tmp_path / "prefix-merged").exists()


def test_unsupported_architecture_is_one_clear_error(merged_dir, tmp_path):
    other = shutil.copytree(merged_dir, tmp_path / "other-arch")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ExportError, match="supports LlamaForCausalLM.*GPT2LMHeadModel.*--format merged"):
        write_gguf(other, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_registry_references_are_parsed():
    assert parse_registry_ref("models:/support@champion") == ("support", "@champion")
    assert parse_registry_ref("support/3") == ("support", "3")
    assert parse_registry_ref("models:/support/12") == ("support", "12")
    assert parse_registry_ref("runs/demo") is None and parse_registry_ref("support") is None
