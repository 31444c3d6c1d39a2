"""The project's own import graph, read from the source (no imports run): which files a stage's code reaches
(dvc.yaml's deps are generated from it, tests/unit/test_layers.py checks them) and which packages each module
imports (the layer rules).

Every `import` counts, at module level or inside a function (a lazy import still runs when the stage does), and
so does a string literal that names a module of the project ("alignflow.rewards:accuracy_reward"), since
registries import by name. The stage table's own strings are the exception: each names one stage's code."""
from __future__ import annotations

import ast
import re
from functools import lru_cache
from pathlib import Path

PACKAGES = ("alignflow", "flows", "tasks")  # the project's code; everything else is a third-party import
_MODULE_STRING = re.compile(r"^((?:alignflow|flows|tasks)(?:\.\w+)+)(?::\w+)?$")


def module_file(root: Path, module: str) -> Path | None:
    """alignflow.ope.vsdr -> alignflow/ope/vsdr.py (or the package's __init__.py); None when not ours."""
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@lru_cache(maxsize=None)
def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def imported_names(path: Path, root: Path, module_level_only: bool = False, strings: bool = True) -> set[str]:
    """Dotted module names this file imports (absolute; relative imports resolved). With `module_level_only`,
    imports inside functions are skipped."""
    tree = _parse(path)
    package = module_name(root, path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    nodes = tree.body if module_level_only else ast.walk(tree)
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            for alias in node.names:  # `from pkg import sub` imports pkg/sub.py; `from pkg import fn`, pkg
                sub = f"{base}.{alias.name}"
                names.add(sub if module_file(root, sub) is not None else base)
        elif strings and isinstance(node, ast.Constant) and isinstance(node.value, str):
            match = _MODULE_STRING.match(node.value)
            if match:
                names.add(match.group(1))
    return names


def project_imports(path: Path, root: Path, parents: bool = True, **kwargs) -> set[Path]:
    """The project files `path` imports, with (`parents`) the __init__.py of every package on the way (Python runs
    them first); without, only the module each import names."""
    files: set[Path] = set()
    for name in imported_names(path, root, **kwargs):
        if name.split(".")[0] not in PACKAGES:
            continue
        parts = name.split(".")
        found = [module_file(root, ".".join(parts[:i])) for i in range(1, len(parts) + 1)] if parents else \
            [module_file(root, name)]
        files.update(f for f in found if f is not None)
    files.discard(path)
    return files


def closure(root: Path, start: list[Path], skip_strings_in: tuple[Path, ...] = ()) -> set[Path]:
    """Every project file reachable from `start` through imports (the files themselves included)."""
    seen: set[Path] = set()
    todo = list(start)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo.extend(project_imports(path, root, strings=path not in skip_strings_in) - seen)
    return seen


def third_party(path: Path, root: Path) -> set[str]:
    """Top-level names of the packages outside the project that `path` imports anywhere."""
    return {name.split(".")[0] for name in imported_names(path, root, strings=False)} - set(PACKAGES)


def cycles(root: Path, files: list[Path], module_level_only: bool = True) -> list[list[str]]:
    """Import circles, as lists of module names: among module-level imports (what Python runs on import), or
    among all imports (a lazy import that closes a circle still couples the two modules both ways)."""
    graph = {f: project_imports(f, root, parents=False, module_level_only=module_level_only, strings=False)
             for f in files}
    found, state = [], {}

    def visit(node: Path, stack: list[Path]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == "open":
                found.append([module_name(root, p) for p in stack[stack.index(nxt):]] + [module_name(root, nxt)])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for f in sorted(graph):
        if f not in state:
            visit(f, [f])
    return found
