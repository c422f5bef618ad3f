"""Docs that are generated from code stay in sync with it."""

from pathlib import Path

from tasks.config import reference_markdown

REPO = Path(__file__).resolve().parent.parent


def test_configuration_reference_is_current():
    current = (REPO / "docs" / "configuration.md").read_text()
    assert current == reference_markdown(), "regenerate with: python -m tasks.config > docs/configuration.md"


def test_demo_config_loads():
    from tasks.config import load_config

    cfg = load_config(REPO / "configs" / "demo.yaml")
    assert Path(cfg.data.train).is_file() and Path(cfg.data.eval).is_file()
    assert cfg.data.probe is None  # the general-ability probe that ships with fewtune is measured by default
    assert cfg.model.base == "smollm2-135m-instruct"
