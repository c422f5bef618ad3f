"""Cache keys: what a stage's result depends on, hashed.

A stage's key combines its inputs' content hashes, its config sections, the base model's fingerprint and the code
the stage runs. That code is computed, never listed by hand: the stage's package plus every project module it
imports, directly or through others (imports inside functions included), plus the package data those packages read
(report templates, the metric scripts under `metrics/`). Editing any of them changes the key, so a cached result is
never served by code that would now compute something else.
"""

from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROJECT_PACKAGES = ("tasks", "flows", "data_checks", "metrics", "deployments")


def module_file(name: str, root: Path = REPO_ROOT) -> Path | None:
    """The source file of project module `name` (a package's `__init__.py`), or None when it is not one."""
    if name.split(".")[0] not in PROJECT_PACKAGES:
        return None
    base = root.joinpath(*name.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _is_package(name: str, root: Path) -> bool:
    file = module_file(name, root)
    return file is not None and file.name == "__init__.py"


def _resolve_relative(name: str, module: str | None, level: int, root: Path) -> str:
    package = name if _is_package(name, root) else name.rpartition(".")[0]
    for _ in range(level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{module}" if module else package


def imports_of(name: str, root: Path = REPO_ROOT) -> set[str]:
    """Project modules that module `name` imports anywhere in its source (top level, functions, type-checking
    blocks), as dotted names; `from package import submodule` counts as importing the submodule."""
    file = module_file(name, root)
    if file is None:
        return set()
    found: set[str] = set()
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"), filename=str(file))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve_relative(name, node.module, node.level, root) if node.level else node.module or ""
            candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
        else:
            continue
        for candidate in candidates:
            # `import a.b.c` imports a.b.c; keep the deepest name that is a project module
            while candidate and module_file(candidate, root) is None:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                found.add(candidate)
    return found


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_closure(*names: str, root: Path = REPO_ROOT) -> set[str]:
    """The modules `names` run when imported: themselves, what they import, transitively, and the packages
    (`__init__.py`) that Python executes on the way."""
    seen: set[str] = set()
    todo = [n for n in names if module_file(n, root) is not None]
    missing = [n for n in names if module_file(n, root) is None]
    if missing:
        raise ValueError(f"not a module of this project: {', '.join(missing)}")
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo.extend(m for m in imports_of(current, root) | set(_parents(current)) if m not in seen)
    return seen


def _data_files(package: str, root: Path) -> list[Path]:
    """Files a package reads or runs besides its modules: everything under its folder that belongs to no subpackage
    and is not one of its own importable modules (templates, `__main__.py`, the metric scripts in folders without
    `__init__.py`), caches excluded."""
    folder = root.joinpath(*package.split("."))
    out = []
    for path in folder.rglob("*"):
        if not path.is_file() or "__pycache__" in path.parts or path.suffix == ".pyc":
            continue
        rel = path.relative_to(folder)
        if len(rel.parts) == 1 and path.suffix == ".py" and path.name != "__main__.py":
            continue  # a module of this package: hashed when imported
        between = [folder.joinpath(*rel.parts[:i]) for i in range(1, len(rel.parts))]
        if any((d / "__init__.py").is_file() for d in between):
            continue  # inside a subpackage: hashed when that subpackage is imported
        out.append(path)
    return out


def _script_imports(path: Path, root: Path) -> set[str]:
    """Project modules a data file that is Python source (a metric script loaded by path) imports."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for candidate in names:
            while candidate and module_file(candidate, root) is None:
                candidate = candidate.rpartition(".")[0]
            if candidate:
                found.add(candidate)
    return found


@lru_cache(maxsize=64)
def _code_hash_cached(names: tuple[str, ...], root: Path) -> str:
    files: set[Path] = set()
    modules: set[str] = set()
    todo = list(names)
    while todo:  # data files that are Python scripts may import more project modules: follow them too
        modules |= import_closure(*todo, root=root)
        todo = []
        for m in sorted(modules):
            file = module_file(m, root)
            if file is not None:
                files.add(file)
            if _is_package(m, root):
                for data in _data_files(m, root):
                    if data not in files and data.suffix == ".py":
                        todo += [s for s in _script_imports(data, root) if s not in modules]
                    files.add(data)
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def code_hash(*modules: str, root: Path = REPO_ROOT) -> str:
    """Hash of the source of `modules` and their import closure (see the module docstring). Computed once per process
    for the installed tree; pass `root` to hash another copy of the tree (tests do)."""
    return _code_hash_cached(tuple(sorted(modules)), Path(root).resolve())


# The code each cached stage runs: its package (and for cross-validation, the wiring that trains and evaluates folds).
STAGE_MODULES: dict[str, tuple[str, ...]] = {
    "validate": ("tasks.validate",),
    "score": ("tasks.score",),
    "augment": ("tasks.augment",),
    "train": ("tasks.train",),
    "cv": ("flows.cv",),
    "evaluate": ("tasks.evaluate",),
}


def stage_code_hash(stage: str, root: Path = REPO_ROOT) -> str:
    """The code part of stage `stage`'s cache key."""
    return code_hash(*STAGE_MODULES[stage], root=root)
