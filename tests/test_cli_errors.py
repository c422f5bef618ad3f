"""Every user error the CLI reports comes out as one message, exactly as the code wrote it: brackets are not read as
rich markup (a `--set 'key=[a, b]'` hint, a path with `[1]` in it), quotes and newlines stay, long lines are not
re-wrapped at the terminal's width, the exit code is 2 and no traceback is printed.

Each user-error class (`USER_ERRORS` and their subclasses) is rendered by the CLI's error printer with hostile text,
and each one a command can hit is raised for real through `flows.cli.main` and compared with the message of the
same error raised directly."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from flows.cli import EXIT_USER_ERROR, main, print_user_error
from flows.finetune import USER_ERRORS
from tasks.augment.generators import GeneratorError
from tasks.common.judge import JudgeError
from tasks.common.models import ModelError, resolve_base_model
from tasks.common.readers import DataError
from tasks.common.registry import RegistryError
from tasks.config import ConfigError, FewtuneConfig, load_config
from tasks.report.page import ReportError
from tasks.validate import ValidationFailed

# Markup-like brackets (opening, closing, a bare `[/]` that rich refuses), a link tag, both quotes, a backslash
# before a bracket and at the end, a blank line, and more than 80 characters on one line.
HOSTILE = (
    "[bold]not markup[/bold] [/] [link=https://example.com]x[/link] 'single' \"double\" C:\\runs\\[1]\\ "
    "--set 'webhook.allowed_uris=[/data/landing, s3://my-bucket/landing/]'\n"
    "  fix: the second line [red]stays[/red] [/data]\n"
    "\n"
    "third line after a blank one \\"
)
WEBHOOK_HINT = "--set 'webhook.allowed_uris=[/data/landing, s3://my-bucket/landing/]'"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _printed(capsys) -> tuple[str, str]:
    out, err = capsys.readouterr()
    return ANSI.sub("", out), ANSI.sub("", err)


def _all_subclasses(classes) -> set[type]:
    found: set[type] = set()
    todo = list(classes)
    while todo:
        cls = todo.pop()
        if cls not in found:
            found.add(cls)
            todo.extend(cls.__subclasses__())
    return found


def _instance(cls: type, tmp_path: Path) -> BaseException:
    from tasks.common.landing import DatasetRefused

    if cls is DatasetRefused:
        return cls(f"file://{tmp_path}/we[ir]d 'name'.jsonl", "outside", HOSTILE, HOSTILE)
    if issubclass(cls, DataError):
        return cls(tmp_path / "we[ir]d 'name'.jsonl", HOSTILE, line=3, fix=HOSTILE)
    if issubclass(cls, ValidationFailed):
        return cls([HOSTILE, "second [problem]"], tmp_path / "[report].json", tmp_path / "quarantine 'q'.jsonl")
    return cls(HOSTILE)


ERROR_CLASSES = sorted(_all_subclasses(USER_ERRORS), key=lambda c: f"{c.__module__}.{c.__name__}")


def test_user_errors_cover_every_error_the_stages_raise_for_users():
    assert {ConfigError, DataError, ModelError, ValidationFailed} <= set(USER_ERRORS)
    assert {RegistryError, ReportError, GeneratorError, JudgeError} <= set(ERROR_CLASSES)


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
def test_every_user_error_class_prints_verbatim(cls, tmp_path, capsys):
    exc = _instance(cls, tmp_path)
    assert "[" in str(exc) and "\n" in str(exc) and "'" in str(exc)
    print_user_error(exc)
    out, err = _printed(capsys)
    assert out == f"error: {exc}\n" and err == ""


def _run(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    out, err = _printed(capsys)
    assert "Traceback" not in out + err
    return code, out


def _expect_printed(exc: BaseException, out: str) -> None:
    assert f"error: {exc}\n" in out, out


def test_config_errors_through_the_cli(tmp_path, capsys):
    folder = tmp_path / "conf [v2] 'x'"
    folder.mkdir()
    bad = folder / "bad.yaml"
    bad.write_text("name: x\ndata: {train: '-'}\ntrain: {epochs: '[3]'}\nnmae: typo\n")
    with pytest.raises(ConfigError) as raised:
        load_config(bad)
    assert str(bad) in str(raised.value) and "\n" in str(raised.value)
    code, out = _run(["models", "list", "--config", str(bad)], capsys)
    assert code == EXIT_USER_ERROR
    _expect_printed(raised.value, out)

    broken = folder / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError) as raised:
        load_config(broken)
    code, out = _run(["doctor", "--config", str(broken)], capsys)
    assert code == EXIT_USER_ERROR
    _expect_printed(raised.value, out)

    overrides = ["train.epochs=[x, 'y']"]
    with pytest.raises(ConfigError) as raised:
        load_config(None, overrides)
    code, out = _run(["run", "--set", overrides[0]], capsys)  # stops before any Prefect server starts
    assert code == EXIT_USER_ERROR
    _expect_printed(raised.value, out)


def test_registry_and_report_errors_through_the_cli(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"name": "x", "data": {"train": "-"},
                                  "register": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}}))
    code, out = _run(["models", "promote", "--config", str(config)], capsys)
    assert code == EXIT_USER_ERROR
    _expect_printed(RegistryError("usage: fewtune models promote VERSION (see `fewtune models list`)"), out)

    missing = tmp_path / "runs [old]" / "demo-'1'"
    from tasks.report import write_report

    with pytest.raises(ConfigError) as raised:
        write_report(missing)
    code, out = _run(["report", str(missing)], capsys)
    assert code == EXIT_USER_ERROR
    _expect_printed(raised.value, out)


def test_data_model_validation_and_encoding_errors_through_the_cli(tmp_path, tiny_model_dir, capsys):
    folder = tmp_path / "data [2024] 'eu'"
    folder.mkdir()
    missing = folder / "rows.jsonl"
    with pytest.raises(DataError) as raised:
        from tasks.common.records import load_records

        load_records(str(missing))
    code, out = _run(["validate", str(missing), "--out", str(tmp_path / "v")], capsys)
    assert code == EXIT_USER_ERROR
    _expect_printed(raised.value, out)

    no_model = str(folder / "model [q4]")
    with pytest.raises(ModelError) as raised:
        resolve_base_model(no_model)
    rows = folder / "few.jsonl"
    rows.write_text("".join(json.dumps({"id": f"[r{i}]", "messages": [
        {"role": "user", "content": f"Question [{i}]?"}, {"role": "assistant", "content": f"Answer '{i}' [/b]."}]}) + "\n"
        for i in range(3)))
    code, out = _run(["score", str(rows), "--model", no_model, "--out", str(tmp_path / "s")], capsys)
    assert code == EXIT_USER_ERROR
    _expect_printed(raised.value, out)

    # Three rows are fewer than validate.min_rows: the run would stop; the report path holds brackets and quotes.
    code, out = _run(["validate", str(rows), "--out", str(folder / "out [1]")], capsys)
    assert code == EXIT_USER_ERROR
    report = folder / "out [1]" / "validation.json"
    quarantine = folder / "out [1]" / "quarantine.jsonl"
    assert "not usable: the data is not usable:\n" in out
    assert f"\nreport: {report}\nquarantined rows: {quarantine}\n" in out

    # A row whose answer starts after model.max_length tokens cannot be scored; its id is printed as written.
    long = folder / "long.jsonl"
    long.write_text(json.dumps({"id": "[long] 'one'", "messages": [
        {"role": "user", "content": "Where is the shop? " * 20}, {"role": "assistant", "content": "[/b] Here."}]}) + "\n")
    code, out = _run(["score", str(long), "--model", str(tiny_model_dir), "--set", "model.max_length=16",
                      "--out", str(tmp_path / "s2")], capsys)
    assert code == EXIT_USER_ERROR
    assert "error: row \"[long] 'one'\" has no trainable token: its answer starts after token 16 (model.max_length)" in out


def test_webhook_without_allowed_uris_prints_the_fix_verbatim(tmp_path, capsys, monkeypatch):
    config = tmp_path / "config.yaml"
    config.write_text("name: hook\ndata: {train: '-'}\n")
    assert FewtuneConfig(data={"train": "-"}).webhook.allowed_uris == []

    monkeypatch.setenv("FEWTUNE_WEBHOOK_SECRET", "x")
    code, out = _run(["webhook", "--config", str(config)], capsys)
    assert code == EXIT_USER_ERROR
    assert out == (
        "error: webhook: set the environment variable FEWTUNE_WEBHOOK_SECRET to the shared secret (at least 16 "
        "characters, e.g. from `openssl rand -hex 32`)\n"
    )

    monkeypatch.setenv("FEWTUNE_WEBHOOK_SECRET", "0123456789abcdef" * 2)
    code, out = _run(["webhook", "--config", str(config)], capsys)
    assert code == EXIT_USER_ERROR
    assert out == (
        "error: webhook.allowed_uris is empty: list the folders and object-store prefixes datasets may land in, "
        f"e.g. {WEBHOOK_HINT}\n"
    )
