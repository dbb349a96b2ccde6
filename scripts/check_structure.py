"""Structure checks over src/codetune that import-linter does not make.

- no import cycle between codetune modules, counting imports made inside functions;
- no run-directory file name spelled outside rundir.py (RunDir owns a run's layout);
- no function longer than 60 lines.

Run it as `python scripts/check_structure.py`; it prints each finding and exits 1 when there is one.
The test suite runs it (tests/test_structure.py).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = "codetune"
MAX_FUNCTION_LINES = 60
# The file names of a run directory: only rundir.py may spell them.
RUN_FILE_NAMES = (
    "recipe.yaml",
    "summary.json",
    "adapter_config.json",
    "train_summary.json",
    "metrics.jsonl",
    "stats.json",
    "report.html",
    ".codetune.json",
    "adapter_model.safetensors",
)
LAYOUT_OWNER = "codetune.rundir"


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _type_checking_only(tree: ast.Module) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:``: annotations only, never executed."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            skipped.update(id(n) for child in node.body for n in ast.walk(child))
    return skipped


def imports_of(root: Path, path: Path, known: set[str]) -> set[str]:
    """Every codetune module `path` imports, at module level or inside a function (not the imports made
    for type annotations only, under ``if TYPE_CHECKING:``, which never run)."""
    module = module_name(root, path)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = _type_checking_only(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, path.name == "__init__.py", node)
            # `from codetune import data` imports the submodule codetune.data
            targets = [f"{target}.{alias.name}" for alias in node.names] + [target]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != module and target.startswith(PACKAGE):
                found.add(target)
    return found


def graph(root: Path) -> dict[str, set[str]]:
    files = {module_name(root, p): p for p in sorted(root.rglob("*.py"))}
    known = set(files)
    result = {}
    for name, path in files.items():
        edges = imports_of(root, path, known)
        # a package's __init__ is imported with any of its modules: that edge is no loop
        result[name] = {t for t in edges if not name.startswith(t + ".")}
    return result


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                item = stack.pop()
                on_stack.discard(item)
                component.append(item)
                if item == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def long_functions(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name}: {length} lines")
    return found


def layout_literals(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        if module_name(root, path) == LAYOUT_OWNER:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for name in RUN_FILE_NAMES:
                    if node.value == name or node.value.endswith("/" + name):
                        found.append(f"{path.relative_to(root.parent)}:{node.lineno} spells {name!r}")
    return found


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parents[1] / "src" / PACKAGE
    problems = [f"import cycle: {' <-> '.join(c)}" for c in cycles(graph(root))]
    problems += [f"function over {MAX_FUNCTION_LINES} lines: {f}" for f in long_functions(root)]
    problems += [f"run file name outside rundir.py: {f}" for f in layout_literals(root)]
    for problem in problems:
        print(problem)
    print(f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
