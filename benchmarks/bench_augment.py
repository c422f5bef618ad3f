"""How long does augmentation take on a CPU, and what does the equivalence filter keep? Measured in the same run.

    python benchmarks/bench_augment.py [--rows N] [--paraphrase-rows N] [--json FILE]

On the demo's training rows with the embedded default model (SmolLM2-135M-Instruct):

1. baseline: the evaluate stage's generation (`tasks.common.generation.generate_answers`: greedy answers to the rows'
   prompts, batch 25, 40 new tokens, the demo's settings) — prompts per second;
2. self-distillation generation alone (`LocalGenerator` with the rewrite instruction, batch `generator.batch_size`,
   new tokens capped at `self_distill_max_length_ratio` x the gold answer + slack, as the stage does) — rows per second
   and the ratio to 1;
3. paraphrase generation alone (one sampled paraphrase per prompt) — rows per second and the ratio to 1;
   then step 2 again with `generator.threads: 1` instead of torch's default (one thread per core): the ratio says
   whether threads help decoding on this machine under its current load;
4. the augment stage end to end (`augment_records`, both techniques, leakage re-check against the demo's test rows):
   seconds by part, kept and rejected per rule, and the base-model perplexity of kept rewrites against their gold rows.

Steps 2 and 3 use the same rows as the stage, so their rows/s predict the stage's generation time for any budget.
On a shared machine throughput moves with the load (printed at the start and the end); compare the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64, help="rows to self-distil (and the baseline's prompts)")
    parser.add_argument("--paraphrase-rows", type=int, default=32)
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()

    import math

    import torch

    from tasks.augment import LocalGenerator, augment_records, paraphrase_conversation, rewrite_conversation, spread_order
    from tasks.common.generation import generate_answers, settings_from
    from tasks.common.models import load_base, resolve_base_model
    from tasks.common.records import load_records
    from tasks.config import load_config

    load = os.getloadavg()[0]
    print(f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, load average {load:.1f} at start")
    cfg = load_config(REPO / "configs" / "closed-book.yaml", [  # the closed-book support rows, as recorded
        "augment.enabled=true", "augment.self_distill=replace", f"augment.self_distill_max_rows={args.rows}",
        "augment.paraphrase.n=1", f"augment.paraphrase.max_rows={args.paraphrase_rows}", "augment.max_seconds=100000",
    ])
    a = cfg.augment
    rows = load_records(cfg.data.train).records
    evals = load_records(cfg.data.eval).records
    base = resolve_base_model(cfg.model.base)
    model, tok = load_base(base.path, cfg.model.dtype)
    order = spread_order(rows)
    sd_rows = [rows[i] for i in order[: args.rows]]
    pp_rows = [rows[i] for i in order[: args.paraphrase_rows]]
    figures: dict = {"rows": args.rows, "paraphrase_rows": args.paraphrase_rows, "dtype": str(model.dtype)}

    # 1. baseline: the evaluate stage's generation
    start = time.perf_counter()
    generate_answers(model, tok, [r["messages"][:-1] for r in sd_rows], settings_from(cfg), "baseline: evaluate-style answers")
    base_s = time.perf_counter() - start
    base_rate = len(sd_rows) / base_s
    print(f"\n1. baseline, evaluate-stage generation: {len(sd_rows)} prompts in {base_s:.1f} s = {base_rate:.2f} prompts/s "
          f"(batch {cfg.evaluate.batch_size}, {cfg.evaluate.max_new_tokens} new tokens)")

    gen = LocalGenerator(model, tok, cfg.model.max_length, "base")

    def timed_generation(label: str, batch_rows, conversation, cap_of, n: int, temperature: float, threads: int | None = None) -> float:
        gen.threads = threads
        start = time.perf_counter()
        new_tokens = 0
        bs = a.generator.batch_size
        for i in range(0, len(batch_rows), bs):
            chunk = batch_rows[i : i + bs]
            out = gen.generate([conversation(r) for r in chunk], max(cap_of(r) for r in chunk), n=n, temperature=temperature, seed=a.seed)
            new_tokens += sum(len(tok(g.text, add_special_tokens=False)["input_ids"]) for o in out for g in o)
        seconds = time.perf_counter() - start
        rate = len(batch_rows) / seconds
        print(f"{label}: {len(batch_rows)} rows in {seconds:.1f} s = {rate:.2f} rows/s, {new_tokens / seconds:.0f} new tokens/s; "
              f"{rate / base_rate:.2f}x the baseline's prompts/s")
        return rate

    def n_tokens(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    sd_rate = timed_generation(
        "\n2. self-distillation generation", sd_rows, lambda r: rewrite_conversation(r, a.self_distill_prompt),
        lambda r: min(a.max_new_tokens, math.ceil(n_tokens(r["messages"][-1]["content"]) * a.self_distill_max_length_ratio) + a.length_slack_tokens),
        1, a.self_distill_temperature,
    )
    pp_rate = timed_generation(
        "3. paraphrase generation", pp_rows, lambda r: paraphrase_conversation(r, a.paraphrase.prompt),
        lambda r: min(a.max_new_tokens, math.ceil(n_tokens(r["messages"][-2]["content"]) * a.paraphrase.max_length_ratio) + a.length_slack_tokens),
        1, a.paraphrase.temperature,
    )
    one_rate = timed_generation(
        "   self-distillation generation with 1 thread", sd_rows, lambda r: rewrite_conversation(r, a.self_distill_prompt),
        lambda r: min(a.max_new_tokens, math.ceil(n_tokens(r["messages"][-1]["content"]) * a.self_distill_max_length_ratio) + a.length_slack_tokens),
        1, a.self_distill_temperature, threads=1,
    )
    print(f"   1 thread vs {torch.get_num_threads()} threads: {one_rate / sd_rate:.2f}x the rows/s")
    figures.update({"baseline_prompts_per_s": round(base_rate, 3), "self_distill_rows_per_s": round(sd_rate, 3),
                    "paraphrase_rows_per_s": round(pp_rate, 3), "self_distill_rows_per_s_1_thread": round(one_rate, 3)})

    # 4. the stage end to end
    with tempfile.TemporaryDirectory(prefix="fewtune-bench-augment-") as tmp:
        start = time.perf_counter()
        result = augment_records(rows, cfg, Path(tmp), base_path=base.path, eval_records=evals)
        stage_s = time.perf_counter() - start
    rep = result.report
    print(f"\n4. the augment stage: {stage_s:.1f} s in all ({json.dumps(rep['seconds'])})")
    for name, t in rep["techniques"].items():
        print(f"   {name} ({t['mode']}): {t['kept']} of {t['generated']} kept; rejected by rule {json.dumps(t['rejected_by_rule'])}")
    ppl = rep["perplexity"]
    if ppl.get("rows"):
        print(f"   perplexity of the {ppl['rows']} kept rewrites under the base model: {ppl['rewrite_mean_ppl']:.2f} vs "
              f"{ppl['gold_mean_ppl']:.2f} for their gold answers (ratio {ppl['rewrite_mean_ppl'] / ppl['gold_mean_ppl']:.2f}; "
              f"lower for {ppl['rows_lower']} of {ppl['rows']})")
    print(f"   {result.note}")
    figures.update({"stage_s": round(stage_s, 1), "stage_seconds": rep["seconds"], "perplexity": ppl,
                    "techniques": {k: {c: v[c] for c in ("generated", "kept", "rejected", "rejected_by_rule")} for k, v in rep["techniques"].items()}})
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
