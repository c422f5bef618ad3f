"""Out of memory on the CPU: real allocation failures, made by limiting a child process's address space
(RLIMIT_AS), so torch's own allocator fails exactly as on a machine that is short of memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from flows.stages import retry_unless_user_error
from tasks.common.memory import OutOfMemory, is_out_of_memory
from tasks.train.plan import next_micro_batch

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

# Run in a child: build the tiny model, measure the process's address space, then allow only `extra_mib` more.
HARNESS = textwrap.dedent(
    """
    import json, resource, sys
    sys.path[:0] = [{tests!r}, {repo!r}]
    from pathlib import Path
    import torch
    torch.set_num_threads(1)

    def limit(extra_mib):
        vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + extra_mib * 2**20, resource.RLIM_INFINITY))
    """
)


def run_child(body: str, tmp_path: Path) -> dict:
    script = tmp_path / "child.py"
    script.write_text(HARNESS.format(tests=str(TESTS), repo=str(REPO)) + textwrap.dedent(body))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600,
                          env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    last = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert last, f"child printed no result (rc {done.returncode}):\n{done.stderr[-3000:]}"
    return json.loads(last[-1])


def test_cpu_out_of_memory_in_training_retries_with_a_smaller_micro_batch(tmp_path):
    """Long rows at micro-batch 32 do not fit in the allowed memory; training halves the micro-batch until they do
    and keeps the effective batch."""
    result = run_child(
        """
        from tiny_model import build_tiny_model
        from tasks.config import FewtuneConfig
        from tasks.train import train_adapter
        model_dir = build_tiny_model(Path("model"))
        long = " ".join(["The shop is open on weekdays and rents bikes by the day."] * 40)
        rows = [{"id": f"l{i}", "messages": [{"role": "user", "content": long}, {"role": "assistant", "content": long}],
                 "label": None, "source": "gold", "parent_id": None} for i in range(32)]
        cfg = FewtuneConfig(data={"train": "-"}, model={"max_length": 1024, "dtype": "float32"},
                            train={"method": "lora", "max_steps": 2, "batch_size": 32, "replay_fraction": 0})
        limit(1500)
        r = train_adapter(rows, cfg, str(model_dir), Path("out"))
        print(json.dumps({"batch": r.batch_size, "accumulation": r.gradient_accumulation, "retries": r.oom_retries,
                          "steps": r.steps, "adapter": (Path(r.adapter_path) / "adapter_model.safetensors").is_file()}))
        """,
        tmp_path,
    )
    assert result["retries"] >= 1 and result["batch"] < 32
    assert result["batch"] * result["accumulation"] == 32  # the same effective batch
    assert result["steps"] == 2 and result["adapter"]


def test_cpu_out_of_memory_while_loading_is_retryable_and_says_what_to_change(tmp_path):
    """A base model larger than the memory left: `OutOfMemory` (retried by the flow), not a user's model error."""
    result = run_child(
        """
        from safetensors.torch import save_file
        from transformers import LlamaConfig
        from tasks.common.models import ModelError, load_model
        folder = Path("big-model"); folder.mkdir()
        config = LlamaConfig(vocab_size=1000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=4,
                             num_attention_heads=8, num_key_value_heads=8)
        config.save_pretrained(folder)
        from transformers import AutoModelForCausalLM
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
        save_file({k: torch.zeros(s) for k, s in shapes.items()}, str(folder / "model.safetensors"))  # 270 MB
        limit(100)
        try:
            load_model(str(folder), dtype=torch.float32, device="cpu")
            print(json.dumps({"error": None}))
        except BaseException as exc:
            print(json.dumps({"error": type(exc).__name__, "memory_error": isinstance(exc, MemoryError),
                              "model_error": isinstance(exc, ModelError), "message": str(exc)}))
        """,
        tmp_path,
    )
    assert result["error"] == "OutOfMemory" and result["memory_error"] and not result["model_error"]
    assert "out of CPU memory loading model" in result["message"] and "big-model" in result["message"]
    assert "fix:" in result["message"] and "model.dtype bfloat16" in result["message"]


class _State:
    def __init__(self, exc: BaseException):
        self.exc = exc

    def result(self):
        raise self.exc


def test_out_of_memory_is_told_apart_from_bugs_and_user_errors():
    import torch

    from tasks.config import ConfigError

    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried "
                       "to allocate 100 bytes. Error code 12 (Cannot allocate memory)")
    assert is_out_of_memory(cpu) and is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(MemoryError()) and not is_out_of_memory(RuntimeError("shape mismatch"))
    # The flow retries an out-of-memory stage (memory may have been held by another process), never a config error.
    assert retry_unless_user_error(None, None, _State(OutOfMemory("out of CPU memory loading model")))
    assert not retry_unless_user_error(None, None, _State(ConfigError("bad")))
    with pytest.raises(Exception, match="out of CPU memory even at micro-batch 1.*model.dtype bfloat16"):
        next_micro_batch(1, 8, "cpu")


def test_the_cli_prints_out_of_memory_as_one_message(monkeypatch, capsys):
    import flows.cli as cli

    def no_memory(args):  # what `fewtune run` raises when loading still fails after the flow's retry
        raise OutOfMemory("out of CPU memory loading model 'm' in float32 (1.0 GiB available now)\n  fix: close other programs")

    monkeypatch.setattr(cli, "cmd_run", no_memory)
    code = cli.main(["run"])
    out = capsys.readouterr().out
    assert code == 3 and out.startswith("out of memory: out of CPU memory loading model 'm'") and "Traceback" not in out
    assert "\n  fix: close other programs" in out
