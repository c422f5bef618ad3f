"""Which dtype is fast on this machine? Times a matmul and a forward pass of the base model in fp32 and bf16.

    python benchmarks/cpu_dtype.py [--model smollm2-135m-instruct] [--size 1024]

Prints throughput per dtype and the bf16/fp32 ratio measured in the same run. `model.dtype: auto` picks bf16 on a
CPU only when it advertises AMX or AVX512-BF16 (`tasks.common.models.cpu_has_fast_bf16`); this script shows whether that
choice is right for your CPU.
"""

from __future__ import annotations

import argparse
import time

import torch


def matmul_tflops(dtype: torch.dtype, size: int, seconds: float = 2.0) -> float:
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return 2 * size**3 * n / (time.perf_counter() - start) / 1e12


def forward_tokens_per_s(path: str, dtype: torch.dtype, batch: int = 8, length: int = 64) -> float:
    from tasks.common.models import load_model

    model = load_model(path, dtype=dtype, device="cpu").eval()
    ids = torch.randint(0, model.config.vocab_size, (batch, length))
    with torch.inference_mode():
        model(input_ids=ids)  # warm-up
        start = time.perf_counter()
        model(input_ids=ids)
        return batch * length / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--skip-model", action="store_true", help="matmul only")
    args = parser.parse_args()

    from tasks.common.models import cpu_has_fast_bf16, resolve_base_model

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, AMX/AVX512-BF16 advertised: {cpu_has_fast_bf16()}")
    results = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        results[name] = {"matmul_tflops": matmul_tflops(dtype, args.size)}
        print(f"{name}: {args.size}² matmul {results[name]['matmul_tflops']:.4f} TFLOP/s", flush=True)
    if not args.skip_model:
        path = resolve_base_model(args.model).path
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            results[name]["forward_tok_s"] = forward_tokens_per_s(path, dtype)
            print(f"{name}: forward {results[name]['forward_tok_s']:.0f} tokens/s (batch 8 × 64)", flush=True)
    for key in results["fp32"]:
        print(f"ratio bf16/fp32 {key}: {results['bf16'][key] / results['fp32'][key]:.3f}")


if __name__ == "__main__":
    main()
