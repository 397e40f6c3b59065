"""The library's modules import each other without a cycle, along the layers docs/design.md
draws, and the registry is a leaf.

The import graph is read from the sources with ``ast``: every ``import`` and ``from ...
import`` statement counts, at module level or inside a function (a lazy import is still
a dependency, and a cycle through one fails at the first call instead of at import).
Edges go to the named module, or to the package ``__init__`` when a name is taken from
it. Not edges: Python running a package's ``__init__`` before its submodules (the
package mechanism, not a use of its names), and imports of other libraries (vendors'
lazy imports such as ``aiter`` or ``flashinfer`` cannot close a cycle among ours).
``fusion_passes/cli/`` (the command line) sits above the library and is not part of this
graph; no library module imports it (the pass's cache key leaves it out).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fusion_passes"
# modules that need an optional library to import, and that library
NEEDS = {"fusion_passes.backends.triton_kernels": "triton", "fusion_passes.vllm": "vllm"}


def modules(command_line: bool = False) -> dict[str, pathlib.Path]:
    """Every module of the library: name -> file (``fusion_passes.cli`` only if *command_line*)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        if rel.parts[0] == "cli" and not command_line:
            continue
        parts = [p for p in rel.parts if p != "__init__"]
        out[".".join(["fusion_passes", *parts])] = path
    return out


def _resolve(importer: str, node: ast.ImportFrom, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(mods: dict[str, pathlib.Path]) -> dict[str, set[str]]:
    """``module -> the library modules it imports`` (see the module docstring for the rules)."""
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, node, path.name == "__init__.py")
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                while t and t not in mods and "." in t:  # `import a.b.c` of a name inside a.b
                    t = t.rsplit(".", 1)[0]
                if t in mods and t != name:
                    graph[name].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state and (cycle := visit(m)):
                return cycle
        path.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (cycle := visit(n)):
            return cycle
    return None


def test_the_checker_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_graph_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "p"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from p import a\n")
    (pkg / "a.py").write_text("def f():\n    from . import b\n")
    (pkg / "b.py").write_text("from p.a import f\nimport torch\n")
    mods = {"p": pkg / "__init__.py", "p.a": pkg / "a.py", "p.b": pkg / "b.py"}
    graph = import_graph(mods)
    assert graph == {"p": {"p.a"}, "p.a": {"p.b"}, "p.b": {"p.a"}}
    assert find_cycle(graph) == ["p.a", "p.b", "p.a"]


def test_the_library_has_no_import_cycle():
    mods = modules()
    assert {"fusion_passes.ops", "fusion_passes.variants", "fusion_passes.backends.reference",
            "fusion_passes.patterns"} <= set(mods)
    assert not any(m.startswith("fusion_passes.cli") for m in mods)
    cycle = find_cycle(import_graph(mods))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_library_never_imports_the_command_line():
    """What ``FusionPass.uuid()`` leaves out (``fusion_passes/cli/``) cannot change a graph."""
    def in_cli(m: str) -> bool:
        return m == "fusion_passes.cli" or m.startswith("fusion_passes.cli.")

    graph = import_graph(modules(command_line=True))
    up = sorted(f"{m} -> {t}" for m, ts in graph.items() if not in_cli(m) for t in ts if in_cli(t))
    assert not up, up


def test_the_variant_registry_is_a_leaf():
    """fusion_passes.variants imports torch and the standard library only."""
    tree = ast.parse(modules()["fusion_passes.variants"].read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported - {"__future__"} <= {"torch"} | set(sys.stdlib_module_names), imported


R = "fusion_passes.recognize"
RECOGNITION_LAYERS = (
    (f"{R}.roles",),  # the leaf: Miss, AllReduce, Norm, Quant
    (f"{R}.fx",),  # FX helpers and the fake-value mechanism
    (f"{R}.aten", f"{R}.vllm_ir"),  # a reader per dialect
    (f"{R}.inplace",),  # in-place kernels (vLLM IR's maybe_inplace reads vllm_ir's weight order)
    (f"{R}.quant_read",),  # what the quant readers share
    (f"{R}.quant_scaled", f"{R}.quant_group", f"{R}.quant_fp4"),  # quant readers by kind
    (R,),  # the dispatch: all_reduce, rms_norm, find_quant
)
"""docs/design.md's layers of recognition, bottom up: a module imports recognition modules
of LOWER layers only (none of its own layer), so no reader calls up. Recognition by
meaning (``recognize.meaning.*``) sits above them all."""
BELOW_RECOGNITION = {"fusion_passes._compat", "fusion_passes.variants", "fusion_passes.epilogue",
                     "fusion_passes.groups", "fusion_passes.fp8_forms"}
"""The library modules outside recognition that it may import (none of the engine above it)."""


def recognition_violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a recognition module that is not down (see RECOGNITION_LAYERS)."""
    layer = {m: i for i, group in enumerate(RECOGNITION_LAYERS) for m in group}
    top = len(RECOGNITION_LAYERS)

    def level(m: str) -> int:
        return top if m.startswith(f"{R}.meaning") else layer[m]

    out = []
    for m in sorted(n for n in graph if n == R or n.startswith(R + ".")):
        for dep in sorted(graph[m]):
            if dep == R or dep.startswith(R + "."):
                if not (level(dep) < level(m) or level(dep) == level(m) == top):
                    out.append(f"{m} imports {dep}: not below it")
            elif dep not in BELOW_RECOGNITION:
                out.append(f"{m} imports {dep}, above recognition")
    return out


def test_recognition_imports_only_down():
    mods = modules()
    layered = {m for group in RECOGNITION_LAYERS for m in group}
    recognition = {m for m in mods if m == R or m.startswith(R + ".")}
    assert recognition - layered == {m for m in recognition if m.startswith(f"{R}.meaning")}, \
        "every recognition module outside meaning has a layer"
    assert layered <= recognition
    assert recognition_violations(import_graph(mods)) == []


def test_the_layer_check_finds_a_planted_upward_import():
    graph = import_graph(modules())
    graph[f"{R}.roles"].add(f"{R}.fx")  # the leaf calling up
    graph[f"{R}.aten"].add(R)  # a reader importing the dispatch
    graph[f"{R}.quant_scaled"].add(f"{R}.quant_group")  # a sibling of its own layer
    graph[f"{R}.vllm_ir"].add(f"{R}.meaning.region")  # a reader calling recognition by meaning
    graph[f"{R}.fx"].add("fusion_passes.match")  # the engine above
    assert recognition_violations(graph) == [
        f"{R}.aten imports {R}: not below it",
        f"{R}.fx imports fusion_passes.match, above recognition",
        f"{R}.quant_scaled imports {R}.quant_group: not below it",
        f"{R}.roles imports {R}.fx: not below it",
        f"{R}.vllm_ir imports {R}.meaning.region: not below it",
    ]



@pytest.mark.parametrize("name", sorted(m for m in modules(command_line=True) if not m.endswith("__main__")))
def test_every_module_imports(name):
    need = NEEDS.get(name)
    if need is not None and importlib.util.find_spec(need) is None:
        pytest.skip(f"{name} needs {need}, which is not installed")
    importlib.import_module(name)


DESIGN = ROOT / "docs" / "design.md"
MARKER = "<!-- layers: read by tests/test_layering.py"


def design_layers() -> list[list[str]]:
    """docs/design.md's layer drawing, bottom row first: each row's module names as written
    (``recognize/`` a whole subpackage, ``__init__`` the package itself)."""
    text = DESIGN.read_text()
    block = text[text.index(MARKER):].split("```text\n", 1)[1].split("```", 1)[0]
    rows = [line.split("#", 1)[0].split() for line in block.splitlines() if line.strip()]
    return rows[::-1]


def layer_of(module: str, rows: list[list[str]]) -> int | None:
    """The row of *module* (``fusion_passes.x.y``) in the drawing, or None."""
    rel = module.removeprefix("fusion_passes").lstrip(".") or "__init__"
    for i, row in enumerate(rows):
        for name in row:
            if name.endswith("/") and (rel == name[:-1] or rel.startswith(name[:-1] + ".")):
                return i
            if rel == name:
                return i
    return None


def layer_violations(graph: dict[str, set[str]], rows: list[list[str]]) -> list[str]:
    out = [f"{m}: in no row of docs/design.md's layers" for m in sorted(graph) if layer_of(m, rows) is None]
    for m in sorted(graph):
        for dep in sorted(graph[m]):
            lm, ld = layer_of(m, rows), layer_of(dep, rows)
            if lm is not None and ld is not None and ld > lm:
                out.append(f"{m} imports {dep}: a layer above it")
    return out


def test_the_import_graph_is_the_layers_of_the_design_doc():
    rows = design_layers()
    assert rows[-1] == ["cli/"] and len(rows) >= 10, rows
    assert layer_violations(import_graph(modules()), rows) == []


def test_the_layer_check_finds_an_upward_import_and_an_unplaced_module():
    rows = design_layers()
    graph = import_graph(modules())
    graph["fusion_passes.epilogue"].add("fusion_passes.recognize.meaning")  # the oracle reading recognition
    graph["fusion_passes.backends.selector"].add("fusion_passes.match")  # the selector calling the matcher
    graph["fusion_passes.new_module"] = set()
    assert layer_violations(graph, rows) == [
        "fusion_passes.new_module: in no row of docs/design.md's layers",
        "fusion_passes.backends.selector imports fusion_passes.match: a layer above it",
        "fusion_passes.epilogue imports fusion_passes.recognize.meaning: a layer above it",
    ]


def private_imports(mods: dict[str, pathlib.Path]) -> list[str]:
    """Every ``from fusion_passes.X import _name`` across modules (``_compat``, the module of
    torch's private names, is a module name, not a private one)."""
    out = []
    for name, path in sorted(mods.items()):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fusion_passes"):
                out += [f"{name} imports {node.module}.{a.name}" for a in node.names
                        if a.name.startswith("_") and a.name != "_compat" and not a.name.startswith("__")]
    return out


def test_no_module_imports_another_modules_private_names(tmp_path):
    assert private_imports(modules(command_line=True)) == []
    planted = tmp_path / "m.py"
    planted.write_text("def f():\n    from fusion_passes.backends.triton_kernels import _row\n")
    assert private_imports({"m": planted}) == ["m imports fusion_passes.backends.triton_kernels._row"]
