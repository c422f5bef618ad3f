"""The run report: `report.html` of a real run opens offline in headless Chromium, is not blank, and shows the key
numbers; `fewtune report` rebuilds it and explains a folder that is not a run folder.

The run folder comes from the real flow (every stage, registration included) on the tiny in-process model and a
slice of the demo data. The browser check needs the Debian packages `chromium` and `chromium-driver` (CI installs
them); without Chromium it is skipped, and the offline and CLI checks still run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from tasks.common.records import read_jsonl, write_jsonl
from tasks.report.summary import criterion_cells

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = next((path for name in ("chromium", "chromium-browser") if (path := shutil.which(name))), None)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless Chromium is not installed: `apt-get install chromium chromium-driver` (Debian) to render report.html",
)
BROWSER_SECONDS = 180  # a cold Chromium start on a busy 2-core machine takes seconds; a hang fails the test instead


# ---------------------------------------------------------------------------------------------------------------
# A real run folder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The folder of one real `finetune` run (tiny model, 48 training rows, 8 test rows, 6 probe rows)."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.finetune import finetune

    tmp = tmp_path_factory.mktemp("report-run")
    write_jsonl(tmp / "train.jsonl", read_jsonl(REPO / "examples/support/train.jsonl")[:48])
    write_jsonl(tmp / "test.jsonl", read_jsonl(REPO / "examples/support/test.jsonl")[:8])
    write_jsonl(tmp / "probe.jsonl", read_jsonl(REPO / "examples/probe/general.jsonl")[:6])
    config = {
        "name": "reporttest",
        "data": {"train": "train.jsonl", "eval": "test.jsonl", "probe": "probe.jsonl"},
        "model": {"base": str(tiny_model_dir), "max_length": 96},
        "train": {"epochs": 1, "batch_size": 8, "learning_rate": 1e-3, "evals_per_epoch": 2},
        "evaluate": {"max_new_tokens": 8, "batch_size": 8, "bootstrap_samples": 200},
        "register": {"model_name": "reporttest-model"},
        "run": {"runs_dir": str(tmp / "runs"), "name": "report"},
    }
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    with prefect_test_harness(server_startup_timeout=180):
        summary = finetune(config_path=str(tmp / "config.yaml"))
    return Path(summary["run_dir"])


def key_numbers(run_dir: Path) -> dict[str, str]:
    """The figures a reader looks for first, formatted as the report shows them."""
    summary = json.loads((run_dir / "summary.json").read_text())
    evaluation = json.loads((run_dir / "eval_results.json").read_text())
    name = evaluation["primary_metric"]
    primary, ppl = evaluation["intervals"][name], evaluation["intervals"]["eval_ppl"]
    register = summary["register"]
    gate = {c["name"]: criterion_cells(c) for c in register["gate"]["criteria"]}

    def row(label: str, iv: dict[str, Any]) -> str:  # a row of the metrics table, cells in order
        return f"{label} {iv['baseline']:.4f} {iv['tuned']:.4f} {iv['delta']:+.4f} {iv['low']:+.4f} to {iv['high']:+.4f}"

    return {
        "primary metric baseline": f"{primary['baseline']:.4f}",
        "primary metric tuned": f"{primary['tuned']:.4f}",
        "primary metric row": row(f"{name} (gate)", primary),
        "test perplexity row": row("eval_ppl", ppl),
        "gate headline": "Promoted to champion" if register["promoted"] else "Not promoted",
        "gate decision": register["decision"],
        "task gain criterion": f"{gate['task_gain']['status_text']} {gate['task_gain']['value_text']}",
        "general-text perplexity criterion": f"{gate['forgetting_ppl']['status_text']} {gate['forgetting_ppl']['value_text']}",
        "champion criterion": f"{gate['champion']['status_text']}",
        "registered version": f"{register['model_name']} version {register['version']}",
    }


class _Page(HTMLParser):
    """A page's visible text, every URL it loads (scripts, styles, images, frames, media), its links and its CSS."""

    LOADS = {("script", "src"), ("link", "href"), ("img", "src"), ("iframe", "src"), ("source", "src"),
             ("video", "src"), ("audio", "src"), ("embed", "src"), ("object", "data"), ("input", "src")}
    HIDDEN = ("head", "script", "style")

    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.loads: list[str] = []
        self.links: list[str] = []
        self.css: list[str] = []
        self._hidden = 0
        self._in_style = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if value and (tag, name) in self.LOADS:
                self.loads.append(value)
            elif value and (tag, name) == ("a", "href"):
                self.links.append(value)
            elif value and name == "style":
                self.css.append(value)
        self._hidden += tag in self.HIDDEN
        self._in_style = self._in_style or tag == "style"

    def handle_endtag(self, tag: str) -> None:
        self._hidden -= tag in self.HIDDEN
        self._in_style = self._in_style and tag != "style"

    def handle_data(self, data: str) -> None:
        if self._in_style:
            self.css.append(data)
        if not self._hidden:
            self.text.append(data)

    def visible_text(self) -> str:
        return " ".join(" ".join(self.text).split())


def parse(html: str) -> _Page:
    page = _Page()
    page.feed(html)
    page.close()
    return page


# ---------------------------------------------------------------------------------------------------------------
# Offline: everything the page needs is inside it


def test_report_is_self_contained(run_dir: Path) -> None:
    html = (run_dir / "report.html").read_text(encoding="utf-8")
    page = parse(html)
    remote = [u for u in page.loads if urlparse(u.strip()).scheme not in ("", "data")]
    assert remote == [], f"report.html loads resources from the network: {remote}"
    assert "<script" not in html.lower()
    css = " ".join(page.css).lower()
    assert "url(" not in css and "@import" not in css, "styles must not fetch anything"
    images = [u for u in page.loads if u.startswith("data:image/png;base64,")]
    assert len(images) >= 4, "the plots are inline PNG images (training, deltas, perplexity, histogram, forgetting...)"
    # Links to the run's own files (Data Docs, quarantine, predictions...) are relative and the files exist.
    local = [h for h in page.links if not urlparse(h).scheme]
    assert "data_docs/index.html" in local and "data/quarantine.jsonl" in local
    assert all((run_dir / h).exists() for h in local), local
    text = page.visible_text()
    for label, value in key_numbers(run_dir).items():
        assert value in text, f"{label} {value!r} is not in report.html"


# ---------------------------------------------------------------------------------------------------------------
# In a real browser


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    """Headless Chromium with no network at all: a page that needed one would render broken."""
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
        "--hide-scrollbars", "--force-device-scale-factor=1", "--force-color-profile=srgb",
        "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={profile}", *args,
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=BROWSER_SECONDS)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"Chromium did not finish in {BROWSER_SECONDS} s: {' '.join(command)}\n{exc.stderr or ''}")
    assert done.returncode == 0, f"Chromium failed ({done.returncode}): {' '.join(command)}\n{done.stderr[-3000:]}"
    return done


def _rgb(colour: str) -> tuple[int, int, int]:
    return tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


@needs_chromium
def test_report_renders_in_headless_chromium(run_dir: Path, tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    report = (run_dir / "report.html").resolve()
    shot = tmp_path / "report.png"
    chromium(f"--screenshot={shot}", "--window-size=1280,2600", report.as_uri(), profile=tmp_path / "profile-1")
    assert shot.is_file(), "Chromium wrote no screenshot"
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
    assert pixels.shape == (2600, 1280, 3)

    def share(colour: str, tolerance: int = 3) -> float:
        return float((np.abs(pixels - _rgb(colour)) <= tolerance).all(axis=-1).mean())

    # Not blank: real contrast, many colours (text, tables, plots), and a large share of non-background pixels.
    assert pixels.mean(axis=-1).std() > 15
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    assert colours > 200, f"only {colours} distinct colours: the page looks blank"
    background = share("#ffffff", 2) + share("#f6f7f9", 2)
    assert background < 0.95, f"{background:.1%} of the page is background"

    # The styles applied (the decision banner's fill) and the plots decoded (the tuned model's solid bars and line).
    promoted = json.loads((run_dir / "summary.json").read_text())["register"]["promoted"]
    assert share("#e6f4ea" if promoted else "#fff4e5") > 0.005, "the decision banner is not drawn: CSS not applied"
    assert share("#4c72b0") > 0.0001, "no plot is drawn: the inline PNG images are not shown"

    # The key numbers are on the rendered page.
    dom = chromium("--dump-dom", report.as_uri(), profile=tmp_path / "profile-2").stdout
    text = parse(dom).visible_text()
    assert "Promotion gate" in text
    for label, value in key_numbers(run_dir).items():
        assert value in text, f"{label} {value!r} is not on the rendered page"


def test_report_and_data_docs_are_logged_with_the_mlflow_run(run_dir: Path) -> None:
    from mlflow import MlflowClient

    register = json.loads((run_dir / "summary.json").read_text())["register"]
    client = MlflowClient(register["tracking_uri"])
    logged = {a.path for a in client.list_artifacts(register["run_id"])}
    assert {"report.html", "data_docs", "data", "gate.json", "evaluation.json"} <= logged, logged
    assert "index.html" in {Path(a.path).name for a in client.list_artifacts(register["run_id"], "data_docs")}


# ---------------------------------------------------------------------------------------------------------------
# The gate table: every status, value with interval, threshold, rows that would decide it


def test_report_shows_each_criterion_status_interval_threshold_and_rows(tmp_path: Path) -> None:
    from gate_helpers import config, evaluation, memorization

    from tasks.register import gate_decision
    from tasks.report import render_report

    # Style up, facts unsure (insufficient), forgetting not measured (ERROR), memorization n/a, no registry (off).
    ev = evaluation(delta=(0.05, -0.01, 0.11), forgetting=None, memorization=memorization(status="not_applicable", reason="labels only"))
    ev.update({"baseline": {"fact_accuracy": 0.4}, "tuned": {"fact_accuracy": 0.45}, "gain": 0.05})
    gate = gate_decision(ev, config(), {"off": "not compared: registration is off"}).to_dict()
    (tmp_path / "summary.json").write_text(json.dumps({"run_name": "r", "run_dir": str(tmp_path), "base_model": "tiny",
                                                       "register": None, "gate": gate}))
    (tmp_path / "eval_results.json").write_text(json.dumps(ev))
    text = parse(render_report(tmp_path)).visible_text()
    assert "The gate does not pass (registration off: nothing registered)" in text and gate["decision"] in text
    assert "Task gain (primary metric) insufficient +0.05 [-0.01, +0.11] > +0 about 144 test rows" in text
    assert "Forgetting: general-text perplexity rise ERROR – <= +0.2" in text
    assert "not measured: the evaluation has no forgetting signals" in text
    assert "Memorization excess n/a" in text and "labels only" in text
    assert "Beats the current champion off" in text


# ---------------------------------------------------------------------------------------------------------------
# `fewtune report RUN_DIR`


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """Run `fewtune ARGS`; returns (exit code, output on one line)."""
    from flows import cli as cli_module

    monkeypatch.setattr(cli_module.console, "width", 1000)  # no wrapping inside long paths

    def run(*args: str) -> tuple[int, str]:
        code = cli_module.main(list(args))
        return code, " ".join(capsys.readouterr().out.split())

    return run


def test_report_command_rebuilds_the_page(run_dir: Path, cli) -> None:
    page = run_dir / "report.html"
    page.unlink()
    code, out = cli("report", str(run_dir))
    assert code == 0 and f"report: {page}" in out
    assert key_numbers(run_dir)["gate decision"] in parse(page.read_text(encoding="utf-8")).visible_text()


def test_report_command_explains_what_is_missing(run_dir: Path, tmp_path: Path, cli) -> None:
    missing = tmp_path / "runs" / "no-such-run"
    code, out = cli("report", str(missing))
    assert code == 2 and f"{missing} is not a folder" in out and "Traceback" not in out

    empty = tmp_path / "empty"
    empty.mkdir()
    code, out = cli("report", str(empty))
    assert code == 2 and f"{empty / 'summary.json'} not found" in out and "fewtune run folder" in out

    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(run_dir / "summary.json", partial / "summary.json")
    code, out = cli("report", str(partial))
    assert code == 2 and f"{partial / 'eval_results.json'} not found" in out

    (partial / "eval_results.json").write_text('{"primary_metric": ')
    code, out = cli("report", str(partial))
    assert code == 2 and "eval_results.json: not valid JSON" in out and "re-run `fewtune run`" in out
    assert not (partial / "report.html").exists()


# ---------------------------------------------------------------------------------------------------------------
# `fewtune models list` without versions


def test_models_list_explains_an_empty_registry(tmp_path: Path, cli) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'registry' / 'mlflow.db'}"  # the folder does not exist yet
    code, out = cli("models", "list", "--set", f"register.tracking_uri={uri}", "--name", "nothing-yet")
    assert code == 2 and "no registered model 'nothing-yet'" in out and "run `fewtune run` first" in out

    MlflowClient(uri).create_registered_model("nothing-yet")  # registered, but every version deleted since
    code, out = cli("models", "list", "--set", f"register.tracking_uri={uri}", "--name", "nothing-yet")
    assert code == 0 and "nothing-yet has no versions yet" in out
