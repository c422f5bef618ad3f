"""The floor plan, enforced: flows → tasks/<stage> → tasks/common, tasks/config, data_checks, metrics.

A stage never imports another stage or `flows`; the ground floor imports nothing above it; no import cycles (imports
inside functions count); no source file over 400 lines; and every stage's cache key changes when any module in its
import closure changes, and only then.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

from flows import keys

REPO = Path(__file__).resolve().parent.parent
GROUND = ("tasks.common", "tasks.config", "data_checks", "metrics")
SOURCE_DIRS = ("tasks", "flows", "data_checks", "metrics", "deployments", "tests", "benchmarks", "examples")
MAX_LINES = 400


def project_modules() -> list[str]:
    out = []
    for package in keys.PROJECT_PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            rel = path.relative_to(REPO).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            name = ".".join(parts)
            if keys.module_file(name) == path:  # importable (metric scripts in folders without __init__ are not)
                out.append(name)
    return out


def stages() -> list[str]:
    return sorted(
        p.name for p in (REPO / "tasks").iterdir()
        if (p / "__init__.py").is_file() and p.name not in ("common", "config")
    )


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_the_project_has_the_expected_floors():
    assert {"validate", "score", "augment", "train", "evaluate", "register", "report", "health"} <= set(stages())
    assert keys.module_file("tasks.common") and keys.module_file("tasks.config")


@pytest.mark.parametrize("module", project_modules())
def test_imports_follow_the_floor_plan(module: str):
    imported = keys.imports_of(module)
    if within(module, "tasks.config"):
        allowed = ("tasks.config",)
    elif within(module, "tasks.common"):
        allowed = GROUND
    elif module.startswith("tasks."):
        stage = ".".join(module.split(".")[:2])
        allowed = (stage, *GROUND)
    elif within(module, "data_checks") or within(module, "metrics"):
        allowed = ("data_checks", "metrics")
    else:  # flows, deployments: the wiring may use anything below it; deployments may start flows
        allowed = ("flows", "tasks", "data_checks", "metrics", "deployments")
    wrong = sorted(m for m in imported if m != "tasks" and not any(within(m, a) for a in allowed))
    assert not wrong, f"{module} imports {wrong}; it may import only {', '.join(allowed)} (move shared code down)"


@pytest.mark.parametrize("stage", stages())
def test_a_stage_runs_no_other_stage(stage: str):
    others = [s for s in stages() if s != stage]
    closure = keys.import_closure(f"tasks.{stage}")
    leaked = sorted(m for m in closure if any(within(m, f"tasks.{o}") for o in others) or within(m, "flows"))
    assert not leaked, f"tasks.{stage} pulls in {leaked}"


def test_no_import_cycles():
    graph = {m: {i for i in keys.imports_of(m)} for m in project_modules()}
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_source_file_over_the_limit():
    long = []
    for folder in SOURCE_DIRS:
        for path in (REPO / folder).rglob("*.py"):
            if "__pycache__" in path.parts:
                continue
            n = len(path.read_text(encoding="utf-8").splitlines())
            if n > MAX_LINES:
                long.append(f"{path.relative_to(REPO)} ({n} lines)")
    assert not long, f"over {MAX_LINES} lines: {', '.join(sorted(long))}"


def test_the_flow_reads_as_the_dag():
    source = (REPO / "flows" / "finetune.py").read_text(encoding="utf-8")
    assert len(source.splitlines()) < 150
    flow = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "finetune")
    assert flow.end_lineno - flow.lineno < 60, "the flow function should only call the stages in order"


# ----------------------------------------------------------------------------------------------------------------
# Cache keys hash the code each stage runs


@pytest.fixture(scope="module")
def tree_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tree")
    for package in keys.PROJECT_PACKAGES:
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _hash(stage: str, root: Path) -> str:
    keys._code_hash_cached.cache_clear()
    return keys.stage_code_hash(stage, root=root)


@pytest.mark.parametrize("stage", sorted(keys.STAGE_MODULES))
def test_a_stage_key_changes_with_every_module_it_runs(stage: str, tree_copy: Path):
    before = _hash(stage, tree_copy)
    assert before == _hash(stage, REPO)  # the copy hashes like the original: the key does not depend on location
    closure = keys.import_closure(*keys.STAGE_MODULES[stage], root=tree_copy)
    assert keys.STAGE_MODULES[stage][0] in closure and "tasks.common.models" in closure
    unchanged = []
    for module in sorted(closure):
        path = keys.module_file(module, tree_copy)
        original = path.read_bytes()
        try:
            path.write_bytes(original + b"\n# an edit\n")
            if _hash(stage, tree_copy) == before:
                unchanged.append(module)
        finally:
            path.write_bytes(original)
    assert not unchanged, f"the {stage} key ignores edits to {unchanged}"
    assert _hash(stage, tree_copy) == before


def test_keys_follow_imports_inside_functions_and_package_data(tree_copy: Path):
    # evaluate loads its metric scripts by path (metrics/<name>/<name>.py): they are part of its key
    before = _hash("evaluate", tree_copy)
    script = tree_copy / "metrics" / "rouge_l" / "rouge_l.py"
    original = script.read_bytes()
    try:
        script.write_bytes(original + b"\n# an edit\n")
        assert _hash("evaluate", tree_copy) != before
    finally:
        script.write_bytes(original)
    # ... and what those scripts import (the shared metric helpers)
    for helper, stage in (("metrics/_common.py", "evaluate"), ("metrics/_text.py", "cv"), ("tasks/train/__main__.py", "train")):
        path = tree_copy / helper
        original = path.read_bytes()
        before = _hash(stage, tree_copy)
        try:
            path.write_bytes(original + b"\n# an edit\n")
            assert _hash(stage, tree_copy) != before, f"the {stage} key ignores {helper}"
        finally:
            path.write_bytes(original)
    # a module imported only inside a function counts
    lazy = tree_copy / "tasks" / "common" / "lazy_probe.py"
    lazy.write_text("VALUE = 1\n")
    host = keys.module_file("tasks.common.models", tree_copy)
    original = host.read_bytes()
    try:
        host.write_bytes(original + b"\n\ndef _probe():\n    from tasks.common import lazy_probe\n\n    return lazy_probe\n")
        with_import = _hash("score", tree_copy)
        lazy.write_text("VALUE = 2\n")
        assert _hash("score", tree_copy) != with_import
    finally:
        host.write_bytes(original)
        lazy.unlink()


@pytest.mark.parametrize("outside", ["tasks/register/__init__.py", "tasks/report/templates/report.html", "flows/cli/run.py"])
def test_a_stage_key_ignores_code_it_does_not_run(outside: str, tree_copy: Path):
    before = _hash("score", tree_copy)
    path = tree_copy / outside
    original = path.read_bytes()
    try:
        path.write_bytes(original + b"\n<!-- an edit -->\n" if path.suffix == ".html" else original + b"\n# an edit\n")
        assert _hash("score", tree_copy) == before, f"the score key changes with {outside}, which scoring never runs"
    finally:
        path.write_bytes(original)
