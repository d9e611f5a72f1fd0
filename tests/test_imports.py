"""Guards on the package's shape: the import graph follows the stages of the data flow, without cycles.

Every module under ``moe_jax/`` is parsed (nothing is imported): imports at module level and
inside functions count, those under ``if TYPE_CHECKING:`` do not (they never run). Stage
order (docs/design.md, "Module map"): a module may import from its own stage or a lower one,
never a higher one; ``moe_jax/__init__.py``, the public API, is exempt.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "moe_jax"

RANK = {"errors": 0, "units": 0, "files": 0, "names": 0, "compat": 0,
        "config": 1, "hardware": 1,
        "parallel": 2,
        "model": 3,
        "programs": 4, "checkpoints": 4,
        "costs": 5,
        "perf": 6,
        "runtime": 7, "reporting": 7,
        "planner": 8,
        "cli": 9}
"""Each top-level module or package of moe_jax and its stage: a stage imports only from stages at or below it."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Imports(ast.NodeVisitor):
    """(line, imported moe_jax module) for every import that runs, resolved to the module it loads."""

    def __init__(self, name: str, is_package: bool):
        self.package = name if is_package else name.rpartition(".")[0]
        self.found: list[tuple[int, str]] = []

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for child in node.orelse:              # the else branch of `if TYPE_CHECKING:` does run
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node.lineno, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:                             # relative: resolve against this module's package
            parent = self.package.split(".")
            parent = parent[:len(parent) - node.level + 1]
            base = ".".join(parent + ([base] if base else []))
        for alias in node.names:
            full = f"{base}.{alias.name}"
            self._add(node.lineno, full if full in MODULES else base)   # a submodule, or a name from `base`

    def _add(self, line: int, target: str) -> None:
        if target == "moe_jax" or target.startswith("moe_jax."):
            while target not in MODULES:           # `import moe_jax.a.b` of a name: the closest module
                target = target.rpartition(".")[0]
            self.found.append((line, target))


def _graph() -> dict[str, list[tuple[int, str]]]:
    graph = {}
    for name, path in MODULES.items():
        visitor = _Imports(name, path.name == "__init__.py")
        visitor.visit(ast.parse(path.read_text(), filename=str(path)))
        graph[name] = [(line, target) for line, target in visitor.found if target != name]
    return graph


GRAPH = _graph()


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None    # None: the package root (the public API)


def _where(module: str, line: int) -> str:
    return f"{MODULES[module].relative_to(ROOT)}:{line}"


def test_every_module_has_a_stage():
    unranked = sorted({_stage(m) for m in MODULES} - set(RANK) - {None})
    assert not unranked, f"moe_jax/{unranked[0]} has no stage: add it to RANK here and to docs/design.md's module map"


def test_no_import_cycle():
    """Depth-first search over the module graph; a cycle is reported as its chain of modules."""
    edges = {m: sorted({t for _, t in targets}) for m, targets in GRAPH.items()}
    state: dict[str, int] = {}                     # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in edges[module]:
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(edges):
        if module not in state and (cycle := visit(module)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_no_import_from_a_higher_stage():
    bad = []
    for module, targets in GRAPH.items():
        stage = _stage(module)
        if stage is None:                          # moe_jax/__init__.py: the public API gathers every stage
            continue
        for line, target in targets:
            to = _stage(target)
            if to is None:
                bad.append(f"{_where(module, line)}: {module} imports the package root (the public API, which "
                           "imports every stage); import from the module that defines the name")
            elif RANK[to] > RANK[stage]:
                bad.append(f"{_where(module, line)}: {module} (stage {stage}, rank {RANK[stage]}) imports {target} "
                           f"(stage {to}, rank {RANK[to]})")
    assert not bad, "imports against the stage order:\n" + "\n".join(bad)


def test_the_model_never_imports_costs_perf_or_planner():
    bad = [f"{_where(m, line)}: {m} imports {t}" for m, targets in GRAPH.items() if _stage(m) == "model"
           for line, t in targets if _stage(t) in ("costs", "perf", "planner")]
    assert not bad, "\n".join(bad)


def test_private_jax_apis_only_in_compat():
    """``jax._src`` is reached through moe_jax/compat.py alone (tests/test_compat.py checks it against jax)."""
    bad = []
    for name, path in MODULES.items():
        if name == "moe_jax.compat":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            bad += [f"{_where(name, node.lineno)}: {n}" for n in names if n == "jax._src" or n.startswith("jax._src.")]
    assert not bad, "private jax APIs outside moe_jax/compat.py:\n" + "\n".join(bad)


def test_shipped_code_holds_no_test_hooks():
    hook = "MOE_JAX_" + "TEST"
    bad = [str(p.relative_to(ROOT)) for p in MODULES.values() if hook in p.read_text()]
    assert not bad, f"test-only switches ({hook}_*) in shipped code: {bad}; inject faults from the tests"


def _texts():
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *MODULES.values(),
             *sorted((ROOT / "tests").glob("*.py")), *sorted((ROOT / "bench").glob("*.py")),
             *sorted((ROOT / "bench").glob("*.md"))]
    return [(p, p.read_text()) for p in files if p.exists()]


def test_nothing_cites_files_outside_the_repository():
    outside = re.compile(r"\.\./shared|\bshared/reference\b|(?<![\w/])DESIGN\.md|(?<![\w/])reference/[\w-]+\.md")
    bad = [f"{p.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
           for p, text in _texts() for m in outside.finditer(text)]
    assert not bad, "citations of files outside the repository (cite docs/ instead):\n" + "\n".join(bad)


def test_cited_docs_exist():
    cited = {m.group(0) for _, text in _texts() for m in re.finditer(r"\bdocs/[\w.-]+\.md", text)}
    missing = sorted(c for c in cited if not (ROOT / c).exists())
    assert cited and not missing, f"cited but missing: {missing}"
