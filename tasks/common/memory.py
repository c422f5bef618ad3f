"""Out of memory, on a GPU and on the CPU, told apart from the user's errors.

torch reports a GPU that is full as `torch.OutOfMemoryError`, a CPU allocation that fails as a plain `RuntimeError`
("DefaultCPUAllocator: can't allocate memory"), and Python as `MemoryError`. Each is a resource problem, not a data
or config problem: training retries it with a smaller micro-batch (`tasks.train.stage`), loading raises
`OutOfMemory` (a `MemoryError`, so the flow's retry rule retries the stage once, as the memory may have been held by
another process), and the CLI prints it as one message with what to change.

What no process can catch: when the operating system's out-of-memory killer ends the process (SIGKILL), nothing of
the above runs. The stages' results are written atomically, so re-running the same command resumes from the last
completed stage (training from its last checkpoint).
"""

from __future__ import annotations

from pathlib import Path

CPU_MARKERS = ("can't allocate memory", "not enough memory", "cannot allocate memory", "out of memory")


class OutOfMemory(MemoryError):
    """Out of memory where no smaller setting could be tried automatically; the message says what to change."""


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is an allocation failure (GPU or CPU), as opposed to a bug or a bad input."""
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    if isinstance(exc, MemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in CPU_MARKERS)


def available_gib() -> float | None:
    """The memory the kernel says is available now (MemAvailable), in GiB; None where /proc/meminfo is missing."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        return None
    return None


def loading_out_of_memory(path: str, dtype: object, device: str) -> OutOfMemory:
    """The error for a model that does not fit while loading."""
    free = available_gib()
    where = "GPU" if device == "cuda" else "CPU"
    have = f" ({free:.1f} GiB available now)" if free is not None and device != "cuda" else ""
    return OutOfMemory(
        f"out of {where} memory loading model {path!r} in {str(dtype).removeprefix('torch.')}{have}\n"
        "  fix: close other programs using memory, set model.dtype bfloat16 (half the memory of float32), "
        "or use a smaller model.base; on a GPU, train.method qlora loads the base in 4 bits"
    )
