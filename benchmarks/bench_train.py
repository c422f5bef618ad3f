"""Training throughput: fewtune's train stage against the common `Trainer` + `peft` LoRA tutorial recipe.

    FEWTUNE_HOME=/tmp/fwhome python benchmarks/bench_train.py [--steps 15] [--batch 8] [--threads N]

Same base model (the embedded SmolLM2-135M-Instruct), same training rows (the demo's, less fewtune's validation
slice), same LoRA adapter (r=16 on every linear layer of the top 10 blocks), same micro-batch, same number of
optimizer steps, fp32 on a CPU. Throughput is real (non-pad) tokens per second of time spent inside optimizer
steps (the same `tasks.train.step_timer` callback for all three; loading, evaluation and checkpoints excluded):

- fewtune: `tasks.train.train_adapter` (length-grouped batches, each padded to its longest row);
- vanilla, max_length: the tutorial recipe: `tokenizer(..., padding="max_length", max_length=...)`, the default
  random sampler, `DataCollatorForLanguageModeling(mlm=False)`;
- vanilla, dynamic: the same recipe with padding to the longest row of each batch (still random batches).

Ratios are printed against both vanilla runs, measured in the same run. The share of padding in each run explains
them and does not depend on the machine.

On a CUDA machine it also compares bf16 LoRA with QLoRA (4-bit NF4) on a Llama-shaped ~1.1B model with random
weights (TinyLlama's shape): tokens/s, model FLOPs utilization and peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# bf16 dense peak of the GPU, for model FLOPs utilization (datasheet figures, without sparsity).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}


def bench_config(steps: int, batch: int, max_length: int, top_layers: int, method: str = "lora"):
    from tasks.config import FewtuneConfig

    return FewtuneConfig(
        data={"train": "-"},
        model={"max_length": max_length},
        train={
            "method": method,
            "lora_r": 16,
            "lora_alpha": 32,
            "lora_top_layers": top_layers,
            "learning_rate": 1e-3,
            "batch_size": batch,
            "max_steps": steps,
            "epochs": 1,
            "evals_per_epoch": 1,  # one evaluation an epoch: none within the measured steps
            "replay_fraction": 0,
        },
    )


def run_fewtune(rows, base_path: str, cfg, out: Path) -> dict:
    from tasks.train import train_adapter

    result = train_adapter(rows, cfg, base_path, out)
    return {"tokens_per_s": result.step_tokens_per_s, "steps": result.steps}


def fewtune_padding(rows, base_path: str, cfg) -> float:
    """Share of padding in fewtune's first `max_steps` batches (same sampler and split as training uses)."""
    from tasks.common.models import encode_chat, load_tokenizer
    from tasks.common.records import split_train_eval
    from tasks.train import LengthGroupedSampler

    t = cfg.train
    tok = load_tokenizer(base_path)
    train, _ = split_train_eval(rows, t.validation_fraction, t.seed)
    lengths = [len(encode_chat(tok, r, cfg.model.max_length)["input_ids"]) for r in train]
    order = LengthGroupedSampler(lengths, t.batch_size, t.length_group_batches, t.seed).indices()
    batches = [order[i : i + t.batch_size] for i in range(0, len(order), t.batch_size)][: t.max_steps]
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return 1 - real / padded


def run_vanilla(rows, base_path: str, cfg, out: Path, padding: str) -> dict:
    """The tutorial recipe: chat template → text, tokenizer padding, random sampler, LM collator, Trainer + peft."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from tasks.train import step_timer

    t = cfg.train
    tok = AutoTokenizer.from_pretrained(base_path)
    tok.pad_token = tok.pad_token or tok.eos_token
    texts = [tok.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    ds = Dataset.from_dict({"text": texts}).map(
        lambda b: tok(b["text"], truncation=True, max_length=cfg.model.max_length, padding=padding),
        batched=True,
        remove_columns=["text"],
    )
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    n = model.config.num_hidden_layers
    lora = LoraConfig(
        r=t.lora_r,
        lora_alpha=t.lora_alpha,
        lora_dropout=t.lora_dropout,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        layers_to_transform=list(range(n - t.lora_top_layers, n)),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    collator = DataCollatorForLanguageModeling(tok, mlm=False)
    seen = {"real": 0, "all": 0}

    def counting(features):
        batch = collator(features)
        seen["real"] += int(batch["attention_mask"].sum())
        seen["all"] += batch["input_ids"].numel()
        return batch

    timer = step_timer()
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=t.batch_size,
        learning_rate=float(t.learning_rate),
        max_steps=t.max_steps,
        logging_steps=t.max_steps,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        seed=t.seed,
        include_num_input_tokens_seen="non_padding",
    )
    Trainer(model=model, args=args, train_dataset=ds, data_collator=counting, callbacks=[timer]).train()
    return {"tokens_per_s": timer.tokens / timer.seconds, "steps": timer.steps, "padding": 1 - seen["real"] / seen["all"]}


def cpu_comparison(args) -> dict:
    from tasks.common.models import encode_chat, load_tokenizer, resolve_base_model
    from tasks.common.records import load_records, split_train_eval

    base = resolve_base_model(args.model).path
    rows = load_records(REPO / "examples/support/train.jsonl").records
    cfg = bench_config(args.steps, args.batch, args.max_length, args.top_layers)
    train_rows, _ = split_train_eval(rows, cfg.train.validation_fraction, cfg.train.seed)
    tok = load_tokenizer(base)
    lengths = [len(encode_chat(tok, r, args.max_length)["input_ids"]) for r in train_rows]
    print(
        f"data: {len(train_rows)} demo rows, {min(lengths)}-{max(lengths)} tokens (mean {statistics.mean(lengths):.1f}); "
        f"max_length {args.max_length}; {args.steps} steps of batch {args.batch}",
        flush=True,
    )
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        fw = run_fewtune(rows, base, cfg, Path(tmp) / "fewtune")
        fw["padding"] = fewtune_padding(rows, base, cfg)
        results["fewtune"] = fw
        print(f"fewtune:            {fw['tokens_per_s']:7.1f} real tokens/s, padding {fw['padding']:.1%}", flush=True)
        for name, padding in (("vanilla_max_length", "max_length"), ("vanilla_dynamic", False)):
            r = run_vanilla(train_rows, base, cfg, Path(tmp) / name, padding)
            results[name] = r
            print(f"{name + ':':19} {r['tokens_per_s']:7.1f} real tokens/s, padding {r['padding']:.1%}", flush=True)
    for name in ("vanilla_max_length", "vanilla_dynamic"):
        print(f"ratio fewtune/{name}: {results['fewtune']['tokens_per_s'] / results[name]['tokens_per_s']:.2f}x")
    return results


# ----------------------------------------------------------------------------------------------------------------
# GPU: bf16 LoRA versus QLoRA on a ~1.1B Llama-shaped model with random weights


def gpu_comparison(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tasks.common.models import load_tokenizer, resolve_base_model
    from tasks.common.records import load_records

    tok_path = resolve_base_model(args.model).path  # tokenizer and chat template of the embedded model
    tok = load_tokenizer(tok_path)
    config = LlamaConfig(  # TinyLlama-1.1B's shape
        vocab_size=len(tok),
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    rows = load_records(REPO / "examples/support/train.jsonl").records
    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "llama-1b-random"
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        del model
        print(f"GPU: {name}; Llama-shaped model with random weights, {params / 1e9:.2f}B parameters", flush=True)
        for method in ("lora", "qlora"):
            cfg = bench_config(args.gpu_steps, args.batch, args.max_length, config.num_hidden_layers, method)
            cfg.train.lora_top_layers = None  # every block, as usual on a GPU
            torch.cuda.reset_peak_memory_stats()
            result = run_fewtune(rows, str(model_dir), cfg, Path(tmp) / method)
            tok_s = result["tokens_per_s"]
            # Frozen base: forward 2N and backward-to-activations 2N FLOPs per token (no weight gradients).
            mfu = 4 * params * tok_s / peak if peak else None
            mem = torch.cuda.max_memory_allocated() / 2**30
            results[method] = {"tokens_per_s": tok_s, "mfu": mfu, "peak_gib": mem}
            mfu_text = f"{mfu:.1%}" if mfu is not None else "n/a (unknown GPU peak)"
            print(f"{method}: {tok_s:8.0f} real tokens/s, MFU {mfu_text}, peak memory {mem:.2f} GiB", flush=True)
    print(f"ratio qlora/lora tokens/s: {results['qlora']['tokens_per_s'] / results['lora']['tokens_per_s']:.2f}x")
    print(f"ratio qlora/lora peak memory: {results['qlora']['peak_gib'] / results['lora']['peak_gib']:.2f}x")
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--steps", type=int, default=15, help="optimizer steps per CPU run")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=160, help="the demo's model.max_length")
    p.add_argument("--top-layers", type=int, default=10, help="LoRA on the top N blocks (the demo's setting)")
    p.add_argument("--gpu-steps", type=int, default=30)
    p.add_argument("--skip-cpu", action="store_true", help="GPU comparison only")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice); 1 on a busy shared machine")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    results = {}
    if not args.skip_cpu:
        results["cpu"] = cpu_comparison(args)
    if torch.cuda.is_available():
        results["gpu"] = gpu_comparison(args)
    else:
        print("no CUDA device: bf16 LoRA vs QLoRA comparison skipped")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"({math.ceil(time.perf_counter() - start)} s)")
