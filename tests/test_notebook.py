"""examples/quickstart.ipynb executes top to bottom (nbclient) and its cells show the run's real outcome.

Users run it on the embedded demo and the real base model; here it reads FEWTUNE_NOTEBOOK_CONFIG and
FEWTUNE_NOTEBOOK_OVERRIDES and runs the same cells on the tiny model and a slice of the demo data, with 2-fold
cross-validation so the flow's cv stage runs too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tasks.common.records import read_jsonl, write_jsonl

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "examples" / "quickstart.ipynb"

nbformat = pytest.importorskip("nbformat", reason="pip install -e '.[dev]' (nbclient, nbformat, ipykernel)")
nbclient = pytest.importorskip("nbclient", reason="pip install -e '.[dev]' (nbclient, nbformat, ipykernel)")


def tiny_config(tmp_path: Path, model_dir: Path) -> Path:
    write_jsonl(tmp_path / "train.jsonl", read_jsonl(REPO / "examples/support/train.jsonl")[:40])
    write_jsonl(tmp_path / "test.jsonl", read_jsonl(REPO / "examples/support/test.jsonl")[:6])
    write_jsonl(tmp_path / "probe.jsonl", read_jsonl(REPO / "examples/probe/general.jsonl")[:6])
    cfg = {
        "name": "notebook",
        "data": {"train": "train.jsonl", "eval": "test.jsonl", "probe": "probe.jsonl"},
        "model": {"base": str(model_dir), "max_length": 96},
        "validate": {"near_duplicates": False, "token_checks": False},
        "train": {"method": "lora", "epochs": 1, "batch_size": 8, "learning_rate": 1e-3},
        "cv": {"folds": 2},
        "evaluate": {"max_new_tokens": 8, "batch_size": 8, "bootstrap_samples": 100, "memorization_rows": 0},
        "register": {"enabled": False},  # the gate is still decided; MLflow registration is covered by test_flow
        "run": {"runs_dir": str(tmp_path / "runs")},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def outputs(cell) -> str:
    """The cell's visible output: printed text and the plain-text form of its result."""
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream" and out.get("name") == "stdout":
            parts.append(out["text"])
        elif out.get("output_type") in ("execute_result", "display_data"):
            parts.append(out["data"].get("text/plain", ""))
    return "".join(parts)


def test_quickstart_notebook_runs_the_pipeline_and_shows_the_outcome(tmp_path, tiny_model_dir, monkeypatch):
    from nbclient import NotebookClient

    config = tiny_config(tmp_path, tiny_model_dir)
    monkeypatch.setenv("FEWTUNE_NOTEBOOK_CONFIG", str(config))
    monkeypatch.setenv("FEWTUNE_NOTEBOOK_OVERRIDES", "run.name=nb-run; evaluate.examples_in_summary=3")
    # The kernel inherits the environment: one thread, as the other tiny-model tests use (the tiny model gains
    # nothing from threads, and on a busy machine they make it several times slower).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO / "examples")}}).execute()

    cells = {c.metadata["tags"][0]: c for c in nb.cells if c.cell_type == "code" and c.metadata.get("tags")}
    run_dir = tmp_path / "runs" / "nb-run"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert f"config {config} (notebook)" in outputs(cells["setup"])
    assert "evaluate.examples_in_summary=3" in outputs(cells["setup"])
    doctor = outputs(cells["doctor"])
    assert "base model" in doctor and "torch" in doctor
    assert f"run folder: {run_dir}" in outputs(cells["run"])

    table = outputs(cells["summary"])  # the metrics table: every metric with both models' values
    ev = summary["evaluate"]
    assert f"{ev['primary_metric']} (gate)" in table and "eval_ppl" in table and "rouge_l" in table
    assert f"{ev['baseline']['eval_ppl']:.4f}"[:6] in table.replace(" ", "")

    gate = outputs(cells["gate"])  # the gate decision as the run recorded it
    assert summary["register"] is None and gate.startswith(f"gate: {summary['gate']['decision']}\n")
    assert summary["gate"]["criteria"][0]["name"] == "task_gain"
    for c in summary["gate"]["criteria"]:
        assert f"{c['status']:<14} {c['name']}: {c['detail']}" in gate

    health = outputs(cells["health"])  # the tiny random model is not a healthy fine-tune: its flags are shown
    assert summary["health"]["flags"] and all(name in health for name in summary["health"]["flags"])
    assert "fix:" in health and f"cross-validation: 2 folds: {summary['cv']['primary_metric']} tuned" in health
    assert len(summary["cv"]["folds"]) == 2 and (run_dir / "cv_results.json").is_file()
    assert len(summary["examples"]) == 3 and summary["examples"][0]["prompt"][:20] in outputs(cells["examples"])
    assert "Training health" in (run_dir / "report.html").read_text()
