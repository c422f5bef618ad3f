"""Tests of the configuration model: YAML loading, defaults, path resolution, --set overrides, errors, hashes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.config import (
    AugmentConfig,
    ConfigError,
    EvaluateConfig,
    FewtuneConfig,
    ModelConfig,
    RegisterConfig,
    RunConfig,
    ScoreConfig,
    TrainConfig,
    ValidateConfig,
    apply_overrides,
    load_config,
)


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A config folder with a data file in it; the current folder is elsewhere, so relative paths are telling."""
    folder = tmp_path / "project"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return folder


def write_config(folder: Path, text: str, name: str = "support.yaml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def config_error(path, overrides=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


# ----------------------------------------------------------------------------------------------------------------
# Defaults and paths


def test_minimal_config_gets_every_default(project):
    cfg = load_config(write_config(project, "data:\n  train: data/train.jsonl\n"))
    assert cfg.name == "support"  # the file's stem
    assert cfg.data.eval is None and cfg.data.probe is None
    assert cfg.data.format == "auto"
    assert cfg.data.eval_fraction == 0.15
    assert cfg.model == ModelConfig()
    assert cfg.validate_ == ValidateConfig()
    assert cfg.score == ScoreConfig()
    assert cfg.augment == AugmentConfig() and cfg.augment.enabled is False
    assert cfg.train == TrainConfig()
    assert cfg.train.learning_rate == "auto" and cfg.train.method == "auto"
    assert cfg.evaluate == EvaluateConfig()
    assert cfg.register_ == RegisterConfig()
    assert cfg.run == RunConfig()
    assert cfg.model.base == "smollm2-135m-instruct"


def test_values_in_the_file_win_over_defaults(project):
    text = """
name: bikes
data:
  train: data/train.jsonl
  format: prompt_completion
  eval_fraction: 0.25
validate:
  min_rows: 3
train:
  learning_rate: 1e-4
  epochs: 2
  target_modules: [q_proj, v_proj]
augment:
  enabled: true
"""
    cfg = load_config(write_config(project, text))
    assert cfg.name == "bikes"
    assert cfg.data.format == "prompt_completion" and cfg.data.eval_fraction == 0.25
    assert cfg.validate_.min_rows == 3
    assert cfg.train.learning_rate == pytest.approx(1e-4)  # YAML reads 1e-4 as text; the model makes it a number
    assert cfg.train.epochs == 2.0
    assert cfg.train.target_modules == ["q_proj", "v_proj"]
    assert cfg.augment.enabled is True
    assert cfg.train.batch_size == TrainConfig().batch_size  # untouched fields keep their defaults


def test_relative_data_paths_resolve_against_the_config_folder(project):
    (project.parent / "shared").mkdir()
    (project.parent / "shared" / "eval.csv").write_text("prompt,completion\na,b\n")
    text = "data:\n  train: data/train.jsonl\n  eval: ../shared/eval.csv\n  probe: ./data\n"
    cfg = load_config(write_config(project, text))
    assert cfg.data.train == str((project / "data" / "train.jsonl").resolve())
    assert cfg.data.eval == str((project.parent / "shared" / "eval.csv").resolve())
    assert cfg.data.probe == str((project / "data").resolve())


def test_missing_relative_data_file_resolves_against_the_config_folder(project):
    # A file of the same name in the current folder must not be picked up instead.
    Path("data").mkdir()
    Path("data/eval.jsonl").write_text('{"prompt": "x", "completion": "y"}\n')
    cfg = load_config(write_config(project, "data:\n  train: data/train.jsonl\n  eval: data/eval.jsonl\n"))
    assert cfg.data.eval == str((project / "data" / "eval.jsonl").resolve())


def test_absolute_paths_and_hub_ids_stay_as_written(project, tmp_path):
    absolute = tmp_path / "abs.jsonl"
    text = f"data:\n  train: {absolute}\n  eval: someone/support-tickets:test\n  probe: someone/general-qa\n"
    cfg = load_config(write_config(project, text))
    assert cfg.data.train == str(absolute)
    assert cfg.data.eval == "someone/support-tickets:test"
    assert cfg.data.probe == "someone/general-qa"


def test_local_model_files_resolve_against_the_config_folder(project):
    (project / "models").mkdir()
    (project / "models" / "tiny.gguf").write_bytes(b"GGUF")
    cfg = load_config(write_config(project, "data:\n  train: data/train.jsonl\nmodel:\n  base: models/tiny.gguf\n"))
    assert cfg.model.base == str((project / "models" / "tiny.gguf").resolve())
    cfg = load_config(write_config(project, "data:\n  train: data/train.jsonl\nmodel:\n  base: ./models\n"))
    assert cfg.model.base == str((project / "models").resolve())
    cfg = load_config(write_config(project, "data:\n  train: data/train.jsonl\nmodel:\n  base: HuggingFaceTB/SmolLM2-135M\n"))
    assert cfg.model.base == "HuggingFaceTB/SmolLM2-135M"


def test_dump_uses_the_yaml_names_and_loads_back(project):
    cfg = load_config(write_config(project, "data:\n  train: data/train.jsonl\nvalidate:\n  min_rows: 4\n"))
    dumped = cfg.dump()
    assert "validate" in dumped and "validate_" not in dumped
    assert dumped["validate"]["min_rows"] == 4
    assert FewtuneConfig.model_validate(dumped) == cfg


# ----------------------------------------------------------------------------------------------------------------
# --set overrides


def test_overrides_are_typed_yaml_values(project):
    path = write_config(project, "data:\n  train: data/train.jsonl\ntrain:\n  learning_rate: 3e-4\n")
    cfg = load_config(
        path,
        [
            "train.learning_rate=1e-4",
            "augment.enabled=true",
            "train.target_modules=[q_proj, v_proj]",
            "train.epochs=1.5",
            "train.batch_size=4",
            "evaluate.max_examples=null",
            "run.name=try-1",
            "data.system_prompt=Answer as a=b style.",
        ],
    )
    assert cfg.train.learning_rate == pytest.approx(1e-4)
    assert cfg.augment.enabled is True
    assert cfg.train.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.epochs == 1.5
    assert cfg.train.batch_size == 4
    assert cfg.evaluate.max_examples is None
    assert cfg.run.name == "try-1"
    assert cfg.data.system_prompt == "Answer as a=b style."  # only the first '=' splits key from value


def test_later_overrides_win(project):
    path = write_config(project, "data:\n  train: data/train.jsonl\n")
    cfg = load_config(path, ["train.epochs=1", "train.epochs=4"])
    assert cfg.train.epochs == 4


def test_override_can_set_the_name_and_whole_values(project):
    path = write_config(project, "data:\n  train: data/train.jsonl\n")
    cfg = load_config(path, ["name=nightly", "data.eval_fraction=0.3"])
    assert cfg.name == "nightly" and cfg.data.eval_fraction == 0.3


def test_override_paths_resolve_against_the_current_folder(project):
    Path("mine.jsonl").write_text('{"prompt": "x", "completion": "y"}\n')
    path = write_config(project, "data:\n  train: data/train.jsonl\n")
    cfg = load_config(path, ["data.eval=mine.jsonl", "data.probe=someone/probe-set"])
    assert cfg.data.eval == str(Path("mine.jsonl").resolve())
    assert cfg.data.probe == "someone/probe-set"
    assert cfg.data.train == str((project / "data" / "train.jsonl").resolve())


def test_apply_overrides_builds_missing_sections():
    raw = {"data": {"train": "x"}}
    assert apply_overrides(raw, ["score.batch_size=2", " train.seed = 3"]) == {
        "data": {"train": "x"},
        "score": {"batch_size": 2},
        "train": {"seed": 3},
    }


# ----------------------------------------------------------------------------------------------------------------
# Errors


def test_missing_config_file(tmp_path):
    path = tmp_path / "nope.yaml"
    msg = config_error(path)
    assert str(path) in msg and "not found" in msg and "--config" in msg


def test_invalid_yaml(project):
    path = write_config(project, "data:\n  train: [unclosed\n")
    msg = config_error(path)
    assert str(path) in msg and "not valid YAML" in msg and "line" in msg


def test_config_that_is_not_a_mapping(project):
    path = write_config(project, "- data\n- train\n")
    msg = config_error(path)
    assert str(path) in msg and "expected a mapping of sections" in msg


def test_empty_config_says_data_is_required(project):
    msg = config_error(write_config(project, ""))
    assert "invalid configuration" in msg and "data: Field required" in msg


def test_unknown_key(project):
    path = write_config(project, "data:\n  train: data/train.jsonl\ntrain:\n  learnin_rate: 1e-4\n")
    msg = config_error(path)
    assert str(path) in msg
    assert "train.learnin_rate: unknown key" in msg
    assert "docs/configuration.md" in msg


def test_unknown_section(project):
    msg = config_error(write_config(project, "data:\n  train: data/train.jsonl\ntraining:\n  epochs: 2\n"))
    assert "training: unknown key" in msg


@pytest.mark.parametrize(
    "yaml_text, where, words",
    [
        ("train:\n  epochs: lots\n", "train.epochs", "valid number"),
        ("train:\n  batch_size: 2.5\n", "train.batch_size", "valid integer"),
        ("augment:\n  enabled: maybe\n", "augment.enabled", "valid boolean"),
        ("data:\n  train: data/train.jsonl\n  eval_fraction: 1.5\n", "data.eval_fraction", "less than 1"),
        ("data:\n  train: data/train.jsonl\n  format: sharegpt\n", "data.format", "'messages'"),
        ("model:\n  dtype: int4\n", "model.dtype", "'bfloat16'"),
        ("validate:\n  min_rows: 0\n", "validate.min_rows", "greater than or equal to 1"),
        ("train: fast\n", "train", "valid dictionary"),
    ],
)
def test_wrong_values_name_the_field(project, yaml_text, where, words):
    text = yaml_text if yaml_text.startswith("data:") else "data:\n  train: data/train.jsonl\n" + yaml_text
    msg = config_error(write_config(project, text))
    line = next(line for line in msg.splitlines() if line.strip().startswith(f"{where}:"))
    assert words in line


@pytest.mark.parametrize("text", ["data: train.jsonl\n", "data:\n  train: data/train.jsonl\nmodel: smollm2\n"])
def test_section_that_is_not_a_mapping(project, text):
    msg = config_error(write_config(project, text))
    assert "invalid configuration" in msg and "valid dictionary" in msg


def test_name_with_spaces(project):
    msg = config_error(write_config(project, "data:\n  train: data/train.jsonl\n", name="my config.yaml"))
    assert "name:" in msg and "no spaces or slashes" in msg


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.epochs", "expected key=value"),
        ("=3", "the key needs dotted names"),
        ("train..epochs=3", "the key needs dotted names"),
        ("name.first=x", "'name' is not a section"),
    ],
)
def test_bad_override_syntax(project, override, words):
    msg = config_error(write_config(project, "data:\n  train: data/train.jsonl\n"), [override])
    assert f"--set {override!r}" in msg and words in msg


def test_override_with_wrong_type_or_unknown_key(project):
    path = write_config(project, "data:\n  train: data/train.jsonl\n")
    msg = config_error(path, ["train.epochs=many", "train.learnin_rate=1e-4"])
    assert "train.epochs: Input should be a valid number" in msg
    assert "train.learnin_rate: unknown key" in msg


# ----------------------------------------------------------------------------------------------------------------
# Section hashes (stage cache keys)


def test_section_hash_is_stable(project):
    path = write_config(project, "data:\n  train: data/train.jsonl\ntrain:\n  epochs: 2\n")
    a, b = load_config(path), load_config(path)
    assert a.section_hash("data", "train") == b.section_hash("data", "train")
    assert a.section_hash("data", "train") == a.section_hash("train", "data")  # order of sections does not matter
    assert len(a.section_hash("data")) == 16
    # Writing a default explicitly is the same config.
    explicit = load_config(path, ["train.batch_size=8"])
    assert explicit.section_hash("train") == a.section_hash("train")


def test_section_hash_changes_with_its_sections_only(project):
    path = write_config(project, "data:\n  train: data/train.jsonl\n")
    base = load_config(path)
    tuned = load_config(path, ["train.learning_rate=1e-4"])
    assert tuned.section_hash("train") != base.section_hash("train")
    assert tuned.section_hash("data", "train") != base.section_hash("data", "train")
    assert tuned.section_hash("data", "model") == base.section_hash("data", "model")
    assert base.section_hash("data") != base.section_hash("train")
    assert load_config(path, ["validate.min_rows=2"]).section_hash("validate") != base.section_hash("validate")
