"""Sizes and times of `fewtune export` for the demo model, and how closely each export answers like the tuned model.

    python benchmarks/bench_export.py [--run RUN_DIR] [--work DIR]

With `--run`, a finished run folder of the demo (its trained adapter). Without, an adapter with the demo config's
LoRA settings (rank, alpha, target modules) on the embedded SmolLM2-135M-Instruct, its weights drawn at random
(`init_lora_weights=False`): sizes and times do not depend on what the adapter learned, and a non-zero adapter makes
the answer comparison meaningful. Prints one row per export (seconds, MiB) and, for the merged model and each GGUF
file read back by transformers, the greedy answers to the demo's test prompts compared with base + adapter.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tasks.common.generation import GenerationSettings, generate_answers, load_tuned  # noqa: E402
from tasks.common.models import load_model, load_tokenizer, resolve_base_model  # noqa: E402
from tasks.common.records import read_jsonl  # noqa: E402
from tasks.config import load_config  # noqa: E402
from tasks.export import export_model  # noqa: E402


def demo_run(work: Path) -> Path:
    """A run folder holding an adapter with the demo's LoRA settings (random weights) on the embedded base."""
    from peft import get_peft_model

    from tasks.train.peft_models import peft_config

    cfg = load_config(REPO / "configs" / "demo.yaml")
    base = resolve_base_model(cfg.model.base)
    model = load_model(base.path, dtype=torch.float32)
    config = peft_config("lora", cfg, model.config.num_hidden_layers)
    config.init_lora_weights = False
    torch.manual_seed(0)
    tuned = get_peft_model(model, config)
    with torch.no_grad():  # random LoRA weights, scaled to a change the size of a short fine-tune's
        for name, p in tuned.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)
    run = work / "demo-run"
    tuned.save_pretrained(run / "adapter")
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"base": cfg.model.base}}))
    (run / "summary.json").write_text(json.dumps({"base_model": cfg.model.base, "validate": {"system_prompt": cfg.data.system_prompt}}))
    return run


def answers(model, tok, prompts: list[str], system: str | None) -> list[str]:
    asked = [([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}] for p in prompts]
    return generate_answers(model, tok, asked, GenerationSettings(max_new_tokens=32, max_length=256, batch_size=8), "answering")


def next_tokens(model, tok, text: str) -> torch.Tensor:
    """The greedy next token at every position of `text`."""
    with torch.no_grad():
        return model(**tok(text, return_tensors="pt")).logits[0].argmax(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a finished demo run folder (default: a demo-shaped adapter, see the docstring)")
    parser.add_argument("--work", default="/tmp/fewtune-bench-export", help="scratch folder (emptied first)")
    parser.add_argument("--prompts", type=int, default=12, help="test prompts compared per export")
    args = parser.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    run = Path(args.run) if args.run else demo_run(work)
    cfg = load_config(REPO / "configs" / "demo.yaml")
    tests = read_jsonl(REPO / "examples" / "support" / "test.jsonl")[: args.prompts]
    prompts = [r["messages"][-2]["content"] for r in tests]
    system = json.loads((run / "summary.json").read_text()).get("validate", {}).get("system_prompt")

    rows = []
    for fmt, extra in (("peft", {}), ("merged", {"dtype": "bfloat16"}), ("gguf", {})):
        start = time.perf_counter()
        result = export_model(str(run), fmt, work / fmt, tracking_uri=f"sqlite:///{work}/unused.db", **extra)
        rows.append((fmt, time.perf_counter() - start, result.files))

    base = resolve_base_model(cfg.model.base)
    tok = load_tokenizer(base.path)
    reference = answers(load_tuned(load_model(base.path, dtype=torch.float32), str(run / "adapter")), tok, prompts, system)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    compared = {"merged (bf16)": (work / "merged", None)} | {f"gguf {k}": (work / "gguf", f"model-{k}.gguf") for k in ("f16", "q8_0")}
    tuned = load_tuned(load_model(base.path, dtype=torch.float32), str(run / "adapter"))
    texts = [tok.apply_chat_template(([{"role": "system", "content": system}] if system else [])
                                     + [{"role": "user", "content": p}, {"role": "assistant", "content": a}], tokenize=False)
             for p, a in zip(prompts, reference)]
    want = [next_tokens(tuned, tok, t) for t in texts]
    agreement, tokens = {}, {}
    for label, (folder, gguf) in compared.items():
        extra = {"gguf_file": gguf} if gguf else {}
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra)
        said = answers(model, AutoTokenizer.from_pretrained(folder, **extra), prompts, system)
        agreement[label] = sum(a == b for a, b in zip(said, reference))
        got = [next_tokens(model, tok, t) for t in texts]
        same = sum(int((g == w).sum()) for g, w in zip(got, want))
        tokens[label] = same / sum(len(w) for w in want)

    print(f"\nexports of {run} (base {cfg.model.base})")
    print(f"{'format':<8} {'seconds':>8}  files")
    for fmt, seconds, files in rows:
        listed = ", ".join(f"{n} {s / 2**20:.1f} MiB" for n, s in files.items() if s > 2**16)
        print(f"{fmt:<8} {seconds:8.1f}  {listed}")
    print(f"\nagainst base + adapter in fp32, on {len(prompts)} test prompts: whole greedy answers identical, and the same "
          "next token (teacher-forced on its answers)")
    for label, same in agreement.items():
        print(f"  {label:<14} answers {same}/{len(prompts)}   next token {100 * tokens[label]:.1f}%")


if __name__ == "__main__":
    main()
