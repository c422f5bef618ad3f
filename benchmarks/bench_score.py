"""How fast is fewtune's scorer? Base-model perplexity of the demo rows three ways, measured in the same run.

    python benchmarks/bench_score.py [--rows N] [--repeats R] [--bf16-rows N] [--json FILE]

1. per-example loop: one row per forward pass (no padding), the model's logits, cross-entropy;
2. `evaluate`-style batch: what the `evaluate` perplexity metric does — every text tokenized at once with
   `padding=True` (so each batch is as wide as the longest row of the dataset), batches of 16 in dataset order,
   the model's full logits copied and cross-entropy over `logits.transpose(1, 2)`, fp32 (`add_start_token=False`:
   the chat template already starts with its own start token, so all three methods score the same tokens);
3. fewtune: `tasks.score.score_records` with the default `score` settings (shared-prefix reuse, length-sorted
   batches under row and token budgets, chunked log-probabilities from the final hidden states).

Each method scores the same chat-templated rows (`encode_chat`, `model.max_length` of the demo) of the embedded
default model; the script checks that their per-row perplexities agree. Tokens/s counts real tokens (no padding).
"Share of matmul rate" is 2 · parameters · tokens per second over the fp32 matmul rate measured here on a
model-shaped product. It also times fewtune's scorer in bf16 against fp32 and checks that the bf16 numbers stay within
a tolerance of the fp32 ones. On a shared machine throughput moves with the load (printed); compare the ratios, which
come from the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BF16_TOLERANCE_NATS = 0.02  # bf16 per-row answer log-perplexity must stay this close to fp32 (about 2% in perplexity)


def matmul_tflops(m: int, k: int, n: int, dtype: torch.dtype, seconds: float = 3.0) -> tuple[float, float]:
    """(TFLOP/s of wall-clock time, TFLOP per CPU-second) of an m×k @ k×n product."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    a @ b
    count, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    flop = 2 * m * k * n * count / 1e12
    return flop / (time.perf_counter() - start), flop / (time.process_time() - cpu)


def per_example_loop(model, encoded: list[dict]) -> list[float]:
    """Full-sequence perplexity of each row, one forward pass per row."""
    out = []
    with torch.inference_mode():
        for e in encoded:
            ids = torch.tensor([e["input_ids"]])
            logits = model(input_ids=ids).logits[0, :-1].float()
            out.append(math.exp(torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item()))
    return out


def evaluate_style(model, tokenizer, texts: list[str], max_length: int, batch_size: int = 16) -> list[float]:
    """The `evaluate` perplexity metric's computation, with the model and tokenizer passed in."""
    encodings = tokenizer(
        texts, add_special_tokens=False, padding=True, truncation=True, max_length=max_length,
        return_tensors="pt", return_attention_mask=True,
    )
    encoded_texts, attn_masks = encodings["input_ids"], encodings["attention_mask"]
    loss_fct = torch.nn.CrossEntropyLoss(reduction="none")
    ppls: list[float] = []
    for start in range(0, len(encoded_texts), batch_size):
        encoded_batch = encoded_texts[start : start + batch_size]
        attn_mask = attn_masks[start : start + batch_size]
        labels = encoded_batch
        with torch.no_grad():
            out_logits = model(encoded_batch, attention_mask=attn_mask).logits
        shift_logits = out_logits[..., :-1, :].contiguous()
        shift_labels = labels[..., 1:].contiguous()
        shift_mask = attn_mask[..., 1:].contiguous()
        ppls += torch.exp((loss_fct(shift_logits.transpose(1, 2), shift_labels) * shift_mask).sum(1) / shift_mask.sum(1)).tolist()
    return ppls


def fewtune_scorer(model, tokenizer, records: list[dict], max_length: int, folder: Path):
    from tasks.config import ScoreConfig
    from tasks.score import score_records, scoring_options

    return score_records(
        records, model, tokenizer, max_length=max_length, out_path=folder / "scores.parquet",
        **scoring_options(ScoreConfig()),
    )


def timed(fn, *args):
    """(value, wall-clock seconds, CPU seconds of this process)."""
    start, cpu = time.perf_counter(), time.process_time()
    value = fn(*args)
    return value, time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", default=str(REPO / "examples/support/train.jsonl"))
    parser.add_argument("--rows", type=int, default=None, help="score the first N rows (default: all)")
    parser.add_argument("--loop-rows", type=int, default=None, help="rows for the per-example loop (default: --rows)")
    parser.add_argument("--max-length", type=int, default=None, help="default: model.max_length of configs/closed-book.yaml (the support rows')")
    parser.add_argument("--repeats", type=int, default=1, help="rounds; each method's best round is reported")
    parser.add_argument("--bf16-rows", type=int, default=48, help="rows for the bf16 vs fp32 comparison (0: skip)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from tasks.common.models import encode_chat, load_model, load_tokenizer, pick_dtype, render, resolve_base_model
    from tasks.common.records import load_records
    from tasks.config import load_config

    max_length = args.max_length or load_config(REPO / "configs" / "closed-book.yaml").model.max_length
    path = resolve_base_model(args.model).path
    tokenizer = load_tokenizer(path)
    records = load_records(args.data).records[: args.rows]
    encoded = [encode_chat(tokenizer, r, max_length) for r in records]
    texts = [render(tokenizer, r["messages"]) for r in records]
    tokens = sum(len(e["input_ids"]) for e in encoded)
    loop_n = args.loop_rows or len(records)
    loop_tokens = sum(len(e["input_ids"]) for e in encoded[:loop_n])
    from tasks.common.nll import plan_batches
    from tasks.config import ScoreConfig

    plan = plan_batches(
        [e["input_ids"] for e in encoded], batch_size=ScoreConfig().batch_size, batch_tokens=ScoreConfig().batch_tokens,
        share_prefix=ScoreConfig().share_prefix, min_shared_prefix=ScoreConfig().min_shared_prefix,
    )
    computed = sum(
        len(g.prefix) + sum(len(encoded[i]["input_ids"]) - len(g.prefix) for b in g.batches for i in b) for g in plan
    )
    padded = sum(
        max(len(e["input_ids"]) for e in encoded) * len(encoded[s : s + 16]) for s in range(0, len(encoded), 16)
    )

    model = load_model(path, dtype=torch.float32, device="cpu").eval()
    params = model.num_parameters()
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, load average {os.getloadavg()[0]:.1f}; "
          f"model {args.model}: {params / 1e6:.1f}M parameters; dtype auto here = {pick_dtype('auto', 'cpu')}")
    print(f"data: {len(records)} rows of {args.data}, {tokens} tokens (mean {tokens / len(records):.1f}, "
          f"max {max(len(e['input_ids']) for e in encoded)}); evaluate-style pads them to {padded} tokens")
    hidden, inter = model.config.hidden_size, model.config.intermediate_size
    rate, rate_cpu = matmul_tflops(1024, hidden, inter, torch.float32)
    print(f"fp32 matmul rate (1024x{hidden} @ {hidden}x{inter}, {threads} threads): {rate:.4f} TFLOP/s wall-clock, "
          f"{rate_cpu:.4f} TFLOP per CPU-second", flush=True)

    best: dict[str, float] = {}  # tokens/s, wall-clock
    best_cpu: dict[str, float] = {}  # tokens per CPU-second: what the method costs, whatever else runs
    results: dict[str, list[float]] = {}
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            this, this_cpu = {}, {}
            loop_ppl, s, c = timed(per_example_loop, model, encoded[:loop_n])
            this["per-example loop"], this_cpu["per-example loop"] = loop_tokens / s, loop_tokens / c
            eval_ppl, s, c = timed(evaluate_style, model, tokenizer, texts, max_length)
            this["evaluate-style batch"], this_cpu["evaluate-style batch"] = tokens / s, tokens / c
            scored, s, c = timed(fewtune_scorer, model, tokenizer, records, max_length, Path(tmp))
            this["fewtune"], this_cpu["fewtune"] = tokens / s, tokens / c
            rounds.append({"wall": this, "cpu": this_cpu, "load": os.getloadavg()[0]})
            for k in this:
                best[k] = max(best.get(k, 0.0), this[k])
                best_cpu[k] = max(best_cpu.get(k, 0.0), this_cpu[k])
            print(f"round {r + 1}: " + ", ".join(f"{k} {this[k]:.0f} tokens/s ({this_cpu[k]:.0f} per CPU-s)" for k in this)
                  + f" (load average {os.getloadavg()[0]:.1f})", flush=True)
            results = {"loop": loop_ppl, "evaluate": eval_ppl, "fewtune": [row["seq_ppl"] for row in scored.rows]}

    agree = {
        name: max(abs(a - b) / b for a, b in zip(values, results["fewtune"]))
        for name, values in (("per-example loop", results["loop"]), ("evaluate-style batch", results["evaluate"]))
    }
    print()
    print(f"{'method':22} {'tokens/s':>9} {'of matmul rate':>15} {'tokens/CPU-s':>13} {'of matmul rate':>15}")
    for name, tps in best.items():
        print(f"{name:22} {tps:9.1f} {2 * params * tps / (rate * 1e12):15.1%} {best_cpu[name]:13.1f} "
              f"{2 * params * best_cpu[name] / (rate_cpu * 1e12):15.1%}")
    print(f"fewtune computes {computed} of the {tokens} tokens (a shared prefix once per group), so its share of the "
          f"matmul rate on the tokens it computes is {2 * params * best['fewtune'] * computed / tokens / (rate * 1e12):.1%}")
    ratio_eval = best["fewtune"] / best["evaluate-style batch"]
    ratio_loop = best["fewtune"] / best["per-example loop"]
    ratio_eval_cpu = best_cpu["fewtune"] / best_cpu["evaluate-style batch"]
    ratio_loop_cpu = best_cpu["fewtune"] / best_cpu["per-example loop"]
    per_round = [x["wall"]["fewtune"] / x["wall"]["evaluate-style batch"] for x in rounds]
    per_round_cpu = [x["cpu"]["fewtune"] / x["cpu"]["evaluate-style batch"] for x in rounds]
    print(f"ratio fewtune / evaluate-style batch: {ratio_eval:.2f}x wall-clock (per round: "
          f"{', '.join(f'{x:.2f}' for x in per_round)}), {ratio_eval_cpu:.2f}x per CPU-second (per round: "
          f"{', '.join(f'{x:.2f}' for x in per_round_cpu)})")
    print(f"ratio fewtune / per-example loop:     {ratio_loop:.2f}x wall-clock, {ratio_loop_cpu:.2f}x per CPU-second")
    print(f"ratio evaluate-style / per-example:   {best['evaluate-style batch'] / best['per-example loop']:.2f}x wall-clock, "
          f"{best_cpu['evaluate-style batch'] / best_cpu['per-example loop']:.2f}x per CPU-second")
    print("per-row full-sequence perplexity vs fewtune, max relative difference: "
          + ", ".join(f"{k} {v:.1e}" for k, v in agree.items()))

    bf16 = None
    if args.bf16_rows:
        subset = records[: args.bf16_rows]
        sub_tokens = sum(len(e["input_ids"]) for e in encoded[: args.bf16_rows])
        with tempfile.TemporaryDirectory() as tmp:
            fp32_scored, s32, c32 = timed(fewtune_scorer, model, tokenizer, subset, max_length, Path(tmp))
            del model
            model16 = load_model(path, dtype=torch.bfloat16, device="cpu").eval()
            bf16_scored, s16, c16 = timed(fewtune_scorer, model16, tokenizer, subset, max_length, Path(tmp))
        diff = max(abs(a["nll_mean"] - b["nll_mean"]) for a, b in zip(fp32_scored.rows, bf16_scored.rows))
        ok = diff <= BF16_TOLERANCE_NATS
        bf16 = {"rows": len(subset), "fp32_tokens_per_s": sub_tokens / s32, "bf16_tokens_per_s": sub_tokens / s16,
                "fp32_tokens_per_cpu_s": sub_tokens / c32, "bf16_tokens_per_cpu_s": sub_tokens / c16,
                "max_abs_diff_log_ppl": diff, "within_tolerance": ok}
        print(f"\nbf16 vs fp32 (fewtune scorer, {len(subset)} rows): fp32 {sub_tokens / s32:.1f} tokens/s, "
              f"bf16 {sub_tokens / s16:.1f} tokens/s, ratio bf16/fp32 {s32 / s16:.2f}x wall-clock, "
              f"{c32 / c16:.2f}x per CPU-second; "
              f"answer log-perplexity max |bf16 - fp32| = {diff:.4f} nats "
              f"({'within' if ok else 'OUTSIDE'} the {BF16_TOLERANCE_NATS} tolerance)")

    if args.json:
        Path(args.json).write_text(json.dumps({
            "threads": threads, "rows": len(records), "tokens": tokens, "tokens_computed_fewtune": computed, "padded_tokens_evaluate": padded,
            "matmul_tflops_fp32": rate, "matmul_tflop_per_cpu_s": rate_cpu, "params": params,
            "best_tokens_per_s": best, "best_tokens_per_cpu_s": best_cpu, "rounds": rounds,
            "ratio_vs_evaluate": ratio_eval, "ratio_vs_loop": ratio_loop, "ratio_vs_evaluate_cpu": ratio_eval_cpu,
            "ratio_vs_loop_cpu": ratio_loop_cpu, "max_rel_diff": agree, "bf16": bf16,
        }, indent=2))


if __name__ == "__main__":
    main()
