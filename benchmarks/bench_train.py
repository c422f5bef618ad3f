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
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

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


def encode_plain(tok, row: dict, max_length: int, padding) -> dict:
    """The plain script's encoding (`benchmarks/plain_lora.py`): chat template -> ids, loss on the answer only."""
    prompt = tok.apply_chat_template(row["messages"][:-1], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(row["messages"], tokenize=False)
    n = len(tok(prompt, add_special_tokens=False)["input_ids"])
    enc = tok(full, add_special_tokens=False, truncation=True, max_length=max_length, padding=padding)
    ids = enc["input_ids"]
    labels = [-100 if i < n or m == 0 else t for i, (t, m) in enumerate(zip(ids, enc["attention_mask"]))]
    return {"input_ids": ids, "attention_mask": enc["attention_mask"], "labels": labels}


def run_plain(rows, base_path: str, cfg, out: Path, padding, dtype) -> dict:
    """The plain recipe: chat template with the answer as the only loss, random sampler, padding to the longest row
    of each batch (`padding="max_length"`: every row to `max_length`, the tutorial's tokenizer call), Trainer + peft
    LoRA with the same adapter, micro-batch and optimizer steps as fewtune's run, the model loaded in `dtype`."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from tasks.train import step_timer

    t = cfg.train
    tok = AutoTokenizer.from_pretrained(base_path)
    tok.pad_token = tok.pad_token or tok.eos_token
    ds = Dataset.from_list([encode_plain(tok, r, cfg.model.max_length, padding) for r in rows])
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
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
    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
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


def demo_rows() -> list[dict]:
    from tasks.common.records import load_records

    return load_records(REPO / "examples/support/train.jsonl").records


def labelled_rows(domain: str, per_intent: int) -> list[dict]:
    """A CLINC150 intent task (`benchmarks/clinc_tasks.py`) as fewtune trains it: each query a chat row whose system
    prompt lists the labels (`data.label_prompt`), the label the answer."""
    from clinc_tasks import make_task

    from tasks.common.labels import label_prompt, label_set, with_label_prompt
    from tasks.common.records import load_records
    from tasks.config import FewtuneConfig

    task = make_task(domain, n_train_per_intent=per_intent, seed=0, out_dir=Path(tempfile.mkdtemp()) / domain)
    cfg = FewtuneConfig(data={"train": "-", "format": "text_label"})
    rows = load_records(task.train_path, "text_label").records
    labels = label_set(cfg, rows)
    return [with_label_prompt(r, label_prompt(labels, cfg), labels) for r in rows]


def compare_rows(name: str, rows, args, base: str) -> dict:
    """fewtune against the plain script on one row set: at the same dtype (each of `--dtypes`), and with each side's
    default dtype (fewtune `auto`, the plain script fp32 as written) where that differs."""
    import torch

    from tasks.common.models import encode_chat, load_tokenizer, pick_dtype
    from tasks.common.records import split_train_eval

    cfg = bench_config(args.steps, args.batch, args.max_length, args.top_layers)
    train_rows, _ = split_train_eval(rows, cfg.train.validation_fraction, cfg.train.seed)
    tok = load_tokenizer(base)
    lengths = [len(encode_chat(tok, r, args.max_length)["input_ids"]) for r in train_rows]
    trained = [sum(x != -100 for x in encode_chat(tok, r, args.max_length)["labels"]) for r in train_rows]
    print(f"\n{name}: {len(train_rows)} training rows, {min(lengths)}-{max(lengths)} tokens (mean "
          f"{statistics.mean(lengths):.1f}, of which trained {statistics.mean(trained):.1f}); max_length "
          f"{args.max_length}; {args.steps} steps of batch {args.batch}", flush=True)
    results: dict = {}
    auto = pick_dtype("auto", "cpu")
    plans = [(d, d) for d in args.dtypes.split(",") if d != "auto"]
    if "auto" in args.dtypes.split(",") and auto != torch.float32:
        plans.append(("auto", "float32"))  # each side's default: fewtune picks, the plain script is fp32
    with tempfile.TemporaryDirectory() as tmp:
        for fw_dtype, plain_dtype in plans:
            cfg.model.dtype = fw_dtype
            key = f"fewtune_{fw_dtype}"
            if key not in results:
                fw = run_fewtune(rows, base, cfg, Path(tmp) / key)
                fw["padding"] = fewtune_padding(rows, base, cfg)
                results[key] = fw
                shown = f"{fw_dtype} ({str(auto).removeprefix('torch.')})" if fw_dtype == "auto" else fw_dtype
                print(f"  fewtune, {shown:18} {fw['tokens_per_s']:7.1f} real tokens/s, padding {fw['padding']:.1%}",
                      flush=True)
            variants = [("plain", True)] + ([("plain_max_length", "max_length")] if args.with_max_length else [])
            for plain, padding in variants:
                pkey = f"{plain}_{plain_dtype}"
                if pkey not in results:
                    r = run_plain(train_rows, base, cfg, Path(tmp) / pkey, padding, getattr(torch, plain_dtype))
                    results[pkey] = r
                    print(f"  {plain}, {plain_dtype:20} {r['tokens_per_s']:7.1f} real tokens/s, padding "
                          f"{r['padding']:.1%}", flush=True)
                ratio = results[key]["tokens_per_s"] / results[pkey]["tokens_per_s"]
                results[f"ratio {key}/{pkey}"] = ratio
                print(f"  => fewtune {fw_dtype} / {plain} {plain_dtype}: {ratio:.2f}x", flush=True)
    return results


def cpu_comparison(args) -> dict:
    from tasks.common.models import resolve_base_model

    base = resolve_base_model(args.model).path
    results = {}
    for name in args.rows.split(","):
        rows = demo_rows() if name == "demo" else labelled_rows(args.domain, args.per_intent)
        label = "demo rows" if name == "demo" else f"CLINC150 {args.domain}, {args.per_intent} per intent"
        results[name] = compare_rows(label, rows, args, base)
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
    p.add_argument("--rows", default="demo,labelled", help="row sets: demo (the support chat rows), labelled "
                   "(a CLINC150 intent task with the label list in the system prompt)")
    p.add_argument("--domain", default="banking", help="CLINC150 domain of the labelled rows")
    p.add_argument("--per-intent", type=int, default=20, help="training queries per intent of the labelled rows")
    p.add_argument("--dtypes", default="float32,auto",
                   help="fewtune and the plain script at each of these dtypes; auto: each side's default")
    p.add_argument("--with-max-length", action="store_true",
                   help="also the tutorial's padding of every row to max_length")
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
