"""`fewtune export`: a tuned model in the forms deployments load.

- `peft`: the adapter folder, its base recorded by a portable reference (`tasks.common.portable`: spec or hub id plus
  a fingerprint of the weights' content) in `adapter_config.json` and `fewtune-base.json`, never only a local path;
  vLLM (`--enable-lora`) and `peft` load it on top of the base.
- `merged`: the adapter folded into the base weights, a plain Hugging Face folder (safetensors, tokenizer with its chat
  template, generation config) that `transformers` and vLLM load without `peft`.
- `gguf`: the merged model as GGUF f16 and q8_0 files (`gguf_file.py`) plus an Ollama `Modelfile`.

The source is a run folder (`runs/<run-name>`, with `adapter/` and the `config.yaml` it ran with) or a registry
reference (`models:/NAME@champion`, `models:/NAME/3`, `NAME/3`, `NAME@champion`), whose registered model carries its
adapter and base reference.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tasks.common.models import ResolvedModel, load_tokenizer, pick_dtype, resolve_base_model
from tasks.common.portable import portable_reference, resolve_portable
from tasks.export.gguf_file import FORMATS as GGUF_TYPES
from tasks.export.gguf_file import ExportError, modelfile, write_gguf

EXPORT_FORMATS = ("peft", "merged", "gguf")
Progress = Callable[[str, int, int], None]  # (step, done, total)


@dataclass
class ExportSource:
    """What an export starts from: the adapter, how to find its base, and how the model was asked."""

    description: str
    adapter_dir: Path
    base: dict[str, Any]  # a portable reference, or {"spec": ...} for a run folder (resolved on this machine)
    system_prompt: str | None = None
    labels: list[str] | None = None


@dataclass
class ExportResult:
    format: str
    out_dir: str
    files: dict[str, int] = field(default_factory=dict)  # relative path -> bytes
    seconds: float = 0.0
    base: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _from_run_folder(folder: Path) -> ExportSource:
    adapter = folder / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise ExportError(f"{folder}: no adapter/adapter_config.json; give a finished run folder (runs/<run-name>) "
                          "or a registry reference such as models:/NAME@champion")
    config = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8")) if (folder / "config.yaml").is_file() else {}
    summary = json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").is_file() else {}
    spec = (config.get("model") or {}).get("base") or summary.get("base_model")
    if not spec:
        raise ExportError(f"{folder}: neither config.yaml nor summary.json names the base model (model.base)")
    validate = summary.get("validate") or {}
    return ExportSource(f"run folder {folder}", adapter, {"spec": spec},
                        validate.get("system_prompt") or (config.get("data") or {}).get("system_prompt"),
                        (summary.get("evaluate") or {}).get("labels"))


def parse_registry_ref(source: str) -> tuple[str, str] | None:
    """`models:/NAME@alias`, `models:/NAME/3`, `NAME@alias` or `NAME/3` -> (name, "@alias" or "3"); else None."""
    ref = source.removeprefix("models:/")
    if "@" in ref and "/" not in ref:
        name, alias = ref.split("@", 1)
        return (name, "@" + alias) if name and alias else None
    if ref.count("/") == 1 and ref.split("/")[1].isdigit():
        return ref.split("/")[0], ref.split("/")[1]
    return None


def _from_registry(source: str, ref: tuple[str, str], tracking_uri: str, work: Path) -> ExportSource:
    import mlflow

    name, which = ref
    uri = f"models:/{name}{which}" if which.startswith("@") else f"models:/{name}/{which}"
    mlflow.set_tracking_uri(tracking_uri)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(work)))
    except Exception as exc:  # noqa: BLE001 - unknown name, version or alias
        raise ExportError(f"{source}: not found in the registry at {tracking_uri} ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200]}); see `fewtune models list`") from None
    mlmodel = yaml.safe_load((local / "MLmodel").read_text(encoding="utf-8"))
    mc = (mlmodel.get("flavors") or {}).get("python_function", {}).get("model_config") or {}
    base = mc.get("base") or {"spec": mc.get("base_spec"), "name": mc.get("base_spec")}
    bundled = local / "artifacts" / "base"
    if bundled.is_dir():  # weights bundled with the registered model
        base = {**base, "bundled": str(bundled)}
    return ExportSource(uri, local / "artifacts" / "adapter", base, mc.get("system_prompt"), mc.get("labels"))


def resolve_source(source: str, tracking_uri: str, work: Path) -> ExportSource:
    """A run folder or a registry reference (downloaded into `work`)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return _from_run_folder(path.resolve())
    ref = parse_registry_ref(source)
    if ref is None:
        raise ExportError(f"{source}: neither a run folder nor a registry reference; use runs/<run-name>, "
                          "models:/NAME@champion or NAME/VERSION")
    return _from_registry(source, ref, tracking_uri, work)


def resolve_base(src: ExportSource) -> ResolvedModel:
    if src.base.get("bundled"):
        return resolve_base_model(src.base["bundled"])
    if src.base.get("fingerprint") or src.base.get("hub_id"):
        return resolve_portable(src.base)
    return resolve_base_model(src.base["spec"])


def _sizes(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}


def export_peft(src: ExportSource, base: ResolvedModel, out: Path) -> dict[str, Any]:
    """The adapter, with its base recorded portably (adapter_config.json and fewtune-base.json)."""
    # no path of this machine in what leaves it: the spec, hub id and weights fingerprint find the base elsewhere
    reference = {k: v for k, v in portable_reference(base.spec, base.path).items() if k != "path"}
    shutil.copytree(src.adapter_dir, out, dirs_exist_ok=True)
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = reference.get("hub_id") or reference.get("spec") or reference["name"]
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    (out / "fewtune-base.json").write_text(json.dumps({**reference, "system_prompt": src.system_prompt,
                                                       "labels": src.labels}, indent=2))
    return reference


def export_merged(src: ExportSource, base: ResolvedModel, out: Path, dtype: str) -> None:
    """The adapter folded into the base weights, saved as a plain transformers folder in `dtype`."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32)  # merge in fp32, then cast
    tuned = PeftModel.from_pretrained(model, str(src.adapter_dir))
    if tuned.peft_config["default"].is_prompt_learning:
        raise ExportError(f"{src.description}: a prefix-tuning adapter adds virtual tokens and cannot be merged into "
                          "the weights; export --format peft and load it with peft")
    merged = tuned.merge_and_unload().to(pick_dtype(dtype, "cpu"))
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer = load_tokenizer(base.path)
    tokenizer.save_pretrained(out)
    if merged.generation_config is not None:
        merged.generation_config.save_pretrained(out)


def export_model(source: str, fmt: str, out: Path, *, dtype: str = "bfloat16", gguf_types: tuple[str, ...] = GGUF_TYPES,
                 tracking_uri: str, progress: Progress | None = None) -> ExportResult:
    """Export `source` (run folder or registry reference) as `fmt` into `out` (created; must be empty or absent)."""
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"--format {fmt!r}: use one of {', '.join(EXPORT_FORMATS)}")
    bad = [t for t in gguf_types if t not in GGUF_TYPES]
    if bad:
        raise ExportError(f"GGUF type(s) {', '.join(bad)} are not written; use {', '.join(GGUF_TYPES)}")
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out}: exists and is not empty; give a new --out folder")
    start = time.perf_counter()
    step = progress or (lambda *_: None)
    with tempfile.TemporaryDirectory(prefix="fewtune-export-") as work:
        src = resolve_source(source, tracking_uri, Path(work))
        base = resolve_base(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))  # renamed when complete
        try:
            reference = _export_into(building, src, base, fmt, dtype, gguf_types, Path(work), step)
            if out.exists():
                out.rmdir()
            building.rename(out)
        finally:
            shutil.rmtree(building, ignore_errors=True)
    return ExportResult(fmt, str(out), _sizes(out), round(time.perf_counter() - start, 2), reference)


def _export_into(out: Path, src: ExportSource, base: ResolvedModel, fmt: str, dtype: str, gguf_types: tuple[str, ...],
                 work: Path, step: Progress) -> dict[str, Any]:
    if fmt == "peft":
        return export_peft(src, base, out)
    merged = out if fmt == "merged" else work / "merged"
    step("merging", 0, 1)
    export_merged(src, base, merged, dtype if fmt == "merged" else "float32")
    step("merging", 1, 1)
    if fmt == "gguf":
        for kind in gguf_types:
            write_gguf(merged, out / f"model-{kind}.gguf", kind, name=base.spec,
                       progress=lambda done, total, k=kind: step(f"writing {k}", done, total))
        template = _chat_template_of(merged)
        first = f"model-{'q8_0' if 'q8_0' in gguf_types else gguf_types[0]}.gguf"
        (out / "Modelfile").write_text(modelfile(first, template, src.system_prompt))
    if not base.local:
        return {"spec": base.spec, "hub_id": base.spec}
    return {k: v for k, v in portable_reference(base.spec, base.path).items() if k != "path"}


def _chat_template_of(folder: Path) -> str | None:
    template = json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    return template


__all__ = ["EXPORT_FORMATS", "ExportError", "ExportResult", "ExportSource", "export_model", "parse_registry_ref",
           "resolve_source"]
