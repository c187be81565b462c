"""The package's layout contract: imports point down the layers only, with no cycle; the pure-math modules import
torch and the standard library only; `dam --help`, `dam merge` and `dam kinship` start without the heavy
libraries.

Layers, bottom to top (a module may import its own layer and those below, never above)::

    errors, progress  <  io, testing  <  merge  <  adaptive  <  training  <  evaluation  <  search  <  demo  <  cli

Every import counts, at module level or inside a function: a lazy import upward is still an upward dependency.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dam.testing import make_family

PACKAGE = Path(__file__).resolve().parent.parent / "dam"
LAYERS = {
    "dam": 0,
    "dam.errors": 0,
    "dam.progress": 0,
    "dam.io": 1,
    "dam.testing": 1,
    "dam.merge": 2,
    "dam.adaptive": 3,
    "dam.training": 4,
    "dam.evaluation": 5,
    "dam.search": 6,
    "dam.demo": 7,
    "dam.cli": 8,
}
PURE_MATH = ("dam.merge.methods", "dam.adaptive.layers", "dam.adaptive.losses")
HEAVY = ("transformers", "datasets", "accelerate")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, int]]:
    """Every module ``path`` imports, absolute (relative imports resolved), with its line."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.append((base, node.lineno))
            # `from dam.x import y` may name a submodule y
            found += [
                (f"{base}.{alias.name}", node.lineno) for alias in node.names if _is_module(f"{base}.{alias.name}")
            ]
    return found


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (PACKAGE.parent / rel.with_suffix(".py")).is_file() or (PACKAGE.parent / rel / "__init__.py").is_file()


def _layer(module: str) -> int:
    match = max((k for k in LAYERS if module == k or module.startswith(k + ".")), key=len, default=None)
    if match is None:
        raise AssertionError(f"{module} is in no layer of the contract: add its subpackage to LAYERS")
    return LAYERS[match]


def _graph() -> dict[str, list[tuple[str, int]]]:
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        graph[_module_name(path)] = [(m, line) for m, line in _imports(path) if m == "dam" or m.startswith("dam.")]
    return graph


def upward_imports(graph: dict[str, list[tuple[str, int]]]) -> list[str]:
    return [
        f"{module}:{line} imports {target} (layer {_layer(target)} above {_layer(module)})"
        for module, targets in graph.items()
        for target, line in targets
        if _layer(target) > _layer(module)
    ]


def import_cycles(graph: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """Cycles between modules (an import of a package counts as an edge to its ``__init__``)."""
    edges = {m: sorted({t for t, _ in targets if t in graph and t != m}) for m, targets in graph.items()}
    cycles, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in edges[node]:
            if state.get(nxt) == "open":
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in edges:
        if node not in state:
            visit(node)
    return cycles


def impure_imports(graph_files: list[Path]) -> list[str]:
    allowed = set(sys.stdlib_module_names) | {"torch", "__future__"}
    bad = []
    for path in graph_files:
        module = _module_name(path)
        if not module.startswith(PURE_MATH):
            continue
        for target, line in _imports(path):
            top = target.split(".")[0]
            if top not in allowed and not target.startswith(PURE_MATH):
                bad.append(f"{module}:{line} imports {target}")
    return bad


def test_every_module_is_in_a_layer_and_imports_point_down() -> None:
    graph = _graph()
    assert len(graph) > 30  # the walk found the package
    assert upward_imports(graph) == []


def test_no_import_cycles() -> None:
    assert import_cycles(_graph()) == []


def test_pure_math_modules_import_torch_and_the_standard_library_only() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    assert any(_module_name(p).startswith("dam.merge.methods.") for p in files)
    assert impure_imports(files) == []


def test_the_checks_catch_violations() -> None:
    """The three checks fail on a graph or file that breaks the contract (so a pass means something)."""
    upward = {"dam.io.checkpoint": [("dam.training.loop", 3)], "dam.training.loop": []}
    assert upward_imports(upward) == ["dam.io.checkpoint:3 imports dam.training.loop (layer 4 above 1)"]
    cyclic = {"dam.merge.a": [("dam.merge.b", 1)], "dam.merge.b": [("dam.merge.a", 1)]}
    assert import_cycles(cyclic) == [["dam.merge.a", "dam.merge.b", "dam.merge.a"]]


def test_impure_check_flags_a_third_party_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "dam" / "merge" / "methods" / "bad.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("import numpy\nimport torch\nfrom dam.errors import DamError\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "dam")
    assert impure_imports([fake]) == [
        "dam.merge.methods.bad:1 imports numpy",
        "dam.merge.methods.bad:3 imports dam.errors",
    ]


# ------------------------------------------------------------------------------------------- light start-up

_PROBE = """
import json, sys
from dam.cli import main
argv, heavy = json.loads(sys.argv[1]), json.loads(sys.argv[2])
try:
    code = main(argv)
except SystemExit as e:  # --help
    code = e.code
print(json.dumps({"code": code, "heavy": sorted(m for m in heavy if m in sys.modules)}))
"""


def _probe(argv: list[str]) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(argv), json.dumps(HEAVY)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    return make_family(tmp_path_factory.mktemp("layout"), 2)


def test_help_imports_no_heavy_library() -> None:
    assert _probe(["--help"]) == {"code": 0, "heavy": []}


def test_merge_and_kinship_run_without_heavy_libraries(family: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, (a, b) = family
    config = tmp_path / "linear.yaml"
    config.write_text(
        f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1.0}}\n"
        f"  - model: {b}\n    parameters: {{weight: 1.0}}\n"
    )
    out = tmp_path / "merged"
    assert _probe(["merge", str(config), str(out), "--quiet"]) == {"code": 0, "heavy": []}
    assert (out / "config.json").is_file()
    assert _probe(["kinship", str(a), str(b), "--base", str(base), "--json"]) == {"code": 0, "heavy": []}
