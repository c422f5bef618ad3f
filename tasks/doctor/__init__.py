"""`fewtune doctor`: check the environment a run needs and say what to fix.

Each check returns a `Finding`: `ok`, `note` (works, but worth knowing: e.g. no GPU) or `fix` (a run would fail or a
configured service is unreachable). Nothing is downloaded, converted or trained: the base model is resolved from
local files and caches only, services get one request with a short timeout (`doctor.timeout_s`), and bitsandbytes is
exercised only where CUDA exists (it imports on a CPU, which proves nothing about 4-bit training).
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from tasks.config import FewtuneConfig

Status = Literal["ok", "note", "fix"]
GiB = 2**30


@dataclass
class Finding:
    check: str
    status: Status
    detail: str
    fix: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def check_python() -> Finding:
    version = platform.python_version()
    if sys.version_info < (3, 11):
        return Finding("python", "fix", f"Python {version}", "fewtune needs Python 3.11 or newer")
    return Finding("python", "ok", f"Python {version} ({sys.executable})")


def check_torch() -> Finding:
    try:
        import torch
    except ImportError:
        return Finding("torch", "fix", "torch is not installed", "pip install torch==2.13.0 (CPU) or a CUDA build, then fewtune")
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build"
    return Finding("torch", "ok", f"torch {torch.__version__}, {build}, {torch.get_num_threads()} threads")


def check_cuda() -> Finding:
    import torch

    if not torch.cuda.is_available():
        if torch.version.cuda:
            return Finding("cuda", "fix", f"a CUDA {torch.version.cuda} build of torch, but no usable GPU",
                           "check the driver (nvidia-smi) and CUDA_VISIBLE_DEVICES; or install the CPU build")
        return Finding("cuda", "note", "no CUDA GPU: training runs on the CPU (LoRA on small models such as the demo's 135M)",
                       "for larger models or QLoRA use a GPU machine (docs/where-to-train.md)")
    try:
        name = torch.cuda.get_device_name(0)
        memory = torch.cuda.get_device_properties(0).total_memory / GiB
        x = torch.ones(64, 64, device="cuda")
        ok = float((x @ x).sum().item()) == 64.0**3
    except Exception as exc:  # noqa: BLE001 - any CUDA failure is the finding
        return Finding("cuda", "fix", f"CUDA is visible but a small operation failed: {type(exc).__name__}: {exc}",
                       "check the driver and the torch build's CUDA version (nvidia-smi)")
    if not ok:
        return Finding("cuda", "fix", f"{name}: a 64x64 matrix product gave a wrong result", "check the GPU and driver")
    return Finding("cuda", "ok", f"{torch.cuda.device_count()} GPU(s); {name}, {memory:.0f} GiB")


def check_cpu_dtype() -> Finding:
    from tasks.common.models import cpu_has_fast_bf16

    if cpu_has_fast_bf16():
        return Finding("cpu dtype", "ok", "the CPU has AMX/AVX512-BF16: model.dtype auto uses bfloat16 on it")
    return Finding("cpu dtype", "ok", "no AMX/AVX512-BF16: model.dtype auto uses float32 on the CPU (bfloat16 would be emulated, ~6x slower)")


def check_bitsandbytes(cfg: FewtuneConfig) -> Finding:
    """bitsandbytes usable for QLoRA: installed, CUDA present, and a 4-bit quantize/dequantize round trip works."""
    import torch

    wanted = cfg.train.method == "qlora"
    if importlib.util.find_spec("bitsandbytes") is None:
        return Finding("bitsandbytes", "fix" if wanted else "note", "not installed: train.method qlora is unavailable",
                       "on a CUDA machine: pip install 'fewtune[gpu]'")
    if not torch.cuda.is_available():
        return Finding("bitsandbytes", "fix" if wanted else "note",
                       "installed, but not usable here: 4-bit QLoRA needs CUDA (bitsandbytes imports on a CPU, which proves nothing)",
                       "use train.method lora on this machine; QLoRA on a CUDA GPU" if wanted else "")
    try:
        import bitsandbytes.functional as bnbf

        x = torch.randn(64, 64, device="cuda", dtype=torch.float16)
        packed, state = bnbf.quantize_4bit(x, quant_type="nf4")
        error = (bnbf.dequantize_4bit(packed, state) - x).abs().mean().item()
    except Exception as exc:  # noqa: BLE001 - any failure is the finding
        return Finding("bitsandbytes", "fix", f"a 4-bit round trip on the GPU failed: {type(exc).__name__}: {exc}",
                       "reinstall bitsandbytes for this CUDA version: pip install -U 'fewtune[gpu]'")
    if not error < 0.2:
        return Finding("bitsandbytes", "fix", f"4-bit round trip error {error:.3f} is implausibly large", "reinstall bitsandbytes")
    import bitsandbytes

    return Finding("bitsandbytes", "ok", f"bitsandbytes {bitsandbytes.__version__}: NF4 round trip on the GPU works (mean error {error:.3f})")


def check_disk(cfg: FewtuneConfig) -> list[Finding]:
    from tasks.common.home import fewtune_home

    findings = []
    for label, folder in (("disk: FEWTUNE_HOME", fewtune_home()), ("disk: run.runs_dir", Path(cfg.run.runs_dir).resolve())):
        existing = next((p for p in [folder, *folder.parents] if p.exists()), Path("/"))
        free = shutil.disk_usage(existing).free / GiB
        if free < cfg.doctor.min_free_gib:
            findings.append(Finding(label, "fix", f"{folder}: {free:.1f} GiB free, under doctor.min_free_gib={cfg.doctor.min_free_gib:g}",
                                    "free space (old run folders: runs/, runs/.cache/) or point it at a larger disk"))
        else:
            findings.append(Finding(label, "ok", f"{folder}: {free:.1f} GiB free"))
    return findings


def check_base_model(spec: str) -> Finding:
    """Where the base model would come from, without downloading or converting anything."""
    from tasks.common import models

    label = "base model"
    if spec == models.SMOLLM2_ALIAS:
        try:
            gguf = models.smollm2_gguf_path()
        except models.ModelError as exc:
            message = str(exc).splitlines()
            return Finding(label, "fix", message[0], message[1].strip().removeprefix("fix: ") if len(message) > 1 else "")
        target = models.fewtune_home() / "models" / f"{spec}-{models._gguf_key(gguf)}"
        if (target / "config.json").exists():
            return Finding(label, "ok", f"{spec}: converted at {target}")
        return Finding(label, "note", f"{spec}: packaged ({gguf.name}), not converted yet",
                       f"the first run converts it once (~1 min); or now: fewtune prepare-model {spec}")
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            return Finding(label, "fix", f"{spec}: GGUF file not found", "fix model.base")
        return Finding(label, "ok", f"{spec}: GGUF file ({path.stat().st_size / GiB:.2f} GiB; converted once on first use)")
    if path.is_dir():
        if not (path / "config.json").is_file():
            return Finding(label, "fix", f"{spec}: the folder has no config.json", "point model.base at a transformers model folder")
        return Finding(label, "ok", f"{spec}: local model folder")
    if spec.startswith((".", "/", "~")):
        return Finding(label, "fix", f"{spec}: no such model folder or file", "fix model.base")
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(spec, "config.json")
    if isinstance(cached, str):
        return Finding(label, "ok", f"{spec}: in the local Hugging Face cache ({Path(cached).parent})")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return Finding(label, "fix", f"{spec}: not in the local Hugging Face cache, and HF_HUB_OFFLINE=1",
                       f"download it where the hub is reachable (hf download {spec}) or use a local folder / .gguf file")
    return Finding(label, "note", f"{spec}: not in the local Hugging Face cache: the first run downloads it from the hub")


def _get(url: str, timeout: float) -> str | None:
    """None when `url` answers 2xx, else what went wrong."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=timeout) as response:
            return None if 200 <= response.status < 300 else f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return str(getattr(exc, "reason", exc))


def check_prefect(cfg: FewtuneConfig) -> Finding:
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        from prefect.settings import get_current_settings

        url = get_current_settings().api.url
    if not url:
        return Finding("prefect api", "note", "PREFECT_API_URL not set: each run starts a temporary local Prefect server",
                       "for schedules and a shared UI: prefect server start; export PREFECT_API_URL=http://127.0.0.1:4200/api")
    problem = _get(url.rstrip("/") + "/health", cfg.doctor.timeout_s)
    if problem:
        return Finding("prefect api", "fix", f"{url}: not reachable ({problem})",
                       "start the server (prefect server start) or correct PREFECT_API_URL; unset it to use a temporary server")
    return Finding("prefect api", "ok", f"{url}: reachable")


def _local_store(uri: str) -> Path | None:
    """The file or folder of a local MLflow store (sqlite:///FILE, file:///FOLDER or a plain path); None for servers."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :])
    if uri.startswith("file:"):
        return Path(urllib.parse.urlparse(uri).path)
    return Path(uri) if "://" not in uri else None


def check_mlflow(cfg: FewtuneConfig) -> Finding:
    from tasks.common.registry import tracking_uri

    if not cfg.register_.enabled:
        return Finding("mlflow", "note", "register.enabled=false: no MLflow run or model version is written")
    uri = tracking_uri(cfg)
    if uri.startswith(("http://", "https://")):
        problem = _get(uri.rstrip("/") + "/health", cfg.doctor.timeout_s)
        if problem:
            return Finding("mlflow", "fix", f"{uri}: not reachable ({problem})",
                           "start the tracking server (mlflow server ...) or correct register.tracking_uri")
        return Finding("mlflow", "ok", f"{uri}: reachable")
    store = _local_store(uri)
    if store is not None:
        folder = store.parent if uri.startswith("sqlite:") else store
        existing = next((p for p in [folder, *folder.parents] if p.exists()), None)
        if existing is None or not os.access(existing, os.W_OK):
            return Finding("mlflow", "fix", f"{uri}: {existing or folder} is not writable", "set register.tracking_uri to a writable place")
        state = "exists" if store.exists() else "created on the first run"
        return Finding("mlflow", "ok", f"{uri} (local store; {state})")
    return Finding("mlflow", "note", f"{uri}: not checked (only local stores and http(s) servers are)")


def check_trackers(cfg: FewtuneConfig) -> Finding:
    from tasks.common.tracking import PACKAGES, trackers

    wanted = trackers(cfg)
    installed = [name for name, package in PACKAGES.items() if importlib.util.find_spec(package) is not None]
    missing = [name for name in wanted if name not in installed]
    if missing:
        return Finding("trackers", "fix", f"train.report_to lists {', '.join(missing)}, not installed",
                       "pip install 'fewtune[tracking]', or remove it from train.report_to")
    have = ", ".join(installed) or "none"
    if not wanted:
        return Finding("trackers", "ok", f"train.report_to: none (MLflow only); installed trackers: {have}")
    return Finding("trackers", "ok", f"train.report_to: {', '.join(wanted)} (installed: {have})")


def run_checks(cfg: FewtuneConfig) -> list[Finding]:
    """Every check, in the order a user would fix things."""
    findings = [check_python(), check_torch()]
    if findings[-1].status == "fix":
        return findings
    findings += [check_cuda(), check_cpu_dtype(), check_bitsandbytes(cfg), *check_disk(cfg), check_base_model(cfg.model.base),
                 check_prefect(cfg), check_mlflow(cfg), check_trackers(cfg)]
    return findings


def exit_code(findings: list[Finding]) -> int:
    """0: nothing to fix; 1: something to fix."""
    return 1 if any(f.status == "fix" for f in findings) else 0
