"""Every scenario config in configs/ loads, points at data that exists, and says what its scenario is about; the
example data they use is what its scripts make (byte for byte)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tasks.common.labels import label_prompt, label_set
from tasks.common.records import load_records
from tasks.config import load_config

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
DATA_FIELDS = ("train", "eval", "probe", "replay")


def test_every_scenario_has_a_config():
    assert {"demo", "classification", "incremental", "gpu-qlora", "dask"} <= {p.stem for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_its_data_exists(path: Path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    for field in DATA_FIELDS:
        value = getattr(cfg.data, field)
        if value is not None:
            assert Path(value).is_file(), f"{path.name}: data.{field} {value} does not exist"
    assert cfg.data.eval, "a scenario others copy keeps a held-out set (forgetting: the shipped general probe)"
    assert path.read_text(encoding="utf-8").lstrip().startswith("#"), "each config opens with what it is for"


def test_scenario_settings():
    cfg = {p.stem: load_config(p) for p in CONFIGS}
    assert cfg["classification"].data.format == "text_label" and cfg["classification"].evaluate.primary_metric == "auto"
    assert cfg["incremental"].train.init_adapter == "champion" and cfg["incremental"].train.learning_rate == "auto"
    assert 0 < cfg["incremental"].train.incremental_lr_factor < 1
    assert cfg["gpu-qlora"].train.method == "qlora" and cfg["gpu-qlora"].model.dtype == "bfloat16"
    assert cfg["dask"].run.task_runner == "dask" and cfg["dask"].run.dask_shards > 1 and cfg["dask"].run.dask_workers > 1


def test_classification_example_is_labelled_and_balanced():
    cfg = load_config(REPO / "configs" / "classification.yaml")
    train = load_records(cfg.data.train, cfg.data.format, cfg.data.system_prompt)
    test = load_records(cfg.data.eval, cfg.data.format, cfg.data.system_prompt)
    labels = label_set(cfg, train.records, test.records)
    prompt = label_prompt(labels, cfg)  # what validate puts in every row's system prompt
    assert not train.rejects and not test.rejects
    train_labels = Counter(r["label"] for r in train.records)
    test_labels = Counter(r["label"] for r in test.records)
    assert set(train_labels) == set(test_labels) and len(train_labels) == 10
    assert set(train_labels.values()) == {30} and set(test_labels.values()) == {20}
    for label in train_labels:
        assert f"- {label}" in prompt, "the label prompt lists every label"
    assert set(cfg.data.label_descriptions) <= set(labels)
    assert not {r["messages"][-2]["content"] for r in train.records} & {r["messages"][-2]["content"] for r in test.records}


def _regenerate(script: str, copied: list[str], tmp_path: Path, *args: str) -> Path:
    """Run an example script from a copy of the files it needs; the copy's folder, where it writes."""
    root = tmp_path / "examples"
    for name in copied:
        source = REPO / "examples" / name
        target = root / name
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.jsonl"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    subprocess.run([sys.executable, str(root / script), *args], check=True, capture_output=True, cwd=tmp_path)
    return root


def test_demo_data_script_reproduces_the_files(tmp_path: Path):
    root = _regenerate("make_demo_data.py", ["make_demo_data.py", "demo_data"], tmp_path)
    for name in ("support/train.jsonl", "support/test.jsonl", "helpdesk/train.jsonl", "helpdesk/test.jsonl",
                 "probe/general.jsonl"):
        assert (root / name).read_bytes() == (REPO / "examples" / name).read_bytes(), name


def test_intents_script_reproduces_the_files(tmp_path: Path):
    source = Path(os.environ.get("CLINC150_DIR", "/work/shared/data/clinc150"))
    if not (source / "data_full.json").is_file():
        pytest.skip("CLINC150's data_full.json not found (set CLINC150_DIR to its folder)")
    root = _regenerate("intents/make_intents.py", ["intents/make_intents.py"], tmp_path, str(source))
    for name in ("intents/train.jsonl", "intents/test.jsonl"):
        assert (root / name).read_bytes() == (REPO / "examples" / name).read_bytes(), name
