"""A JSON form of an FX graph: what ``fusion-passes dump`` writes and ``diff`` / ``explain`` read.

One file holds one graph at one stage of our passes::

    {"format": "fusion-passes-graph", "version": 1,
     "model": "pkg.mod:make" | null,       # what was compiled (diff refuses two models)
     "graph": "graph_0",                   # which graph of that model (graph breaks make several)
     "stage": "before" | "hoisted" | "fused",
     "torch": "2.14.0",
     "nodes": [{"name": "add", "op": "call_function", "target": "torch.ops.aten.add.Tensor",
                "args": [...], "kwargs": {...},
                "meta": {"val": {"shape": [8, 64], "stride": [64, 1], "dtype": "bfloat16",
                                 "device": "cpu"},
                         "source": "File \\"m.py\\", line 12, in forward", "code": "x = a + b",
                         "stack_trace": "..."}}, ...],
     "report": {...}}                      # optional: the FusionReport of the "fused" stage

Values in ``args`` / ``kwargs`` / ``meta.val`` are JSON scalars, JSON lists (Python
lists), or one-key tagged objects: ``{"node": name}``, ``{"tuple": [...]}``,
``{"dict": {...}}``, ``{"float": "inf"}``, ``{"dtype": "bfloat16"}``, ``{"device":
"cuda:0"}``, ``{"op": "torch.ops.aten.add.Tensor"}``, ``{"sym": "s0"}``, ``{"slice":
[a, b, c]}``, ``{"enum": "torch.contiguous_format"}``, ``{"repr": "..."}`` (anything
else, kept only as text), and for tensor metadata ``{"shape", "stride", "dtype", "device"}``.

SAFETY (DESIGN.md section 8): a dump is data. :func:`load` parses JSON (never pickle,
never ``eval``/``exec``), validates every field, and raises :class:`DumpError` with a
message naming what is wrong. :func:`to_fx` turns a dump back into an FX graph for
analysis only: targets resolve by NAME LOOKUP in ``torch.ops`` (or a fixed table of
Python operators); anything else becomes an :class:`Opaque` stand-in that carries the
name and refuses to run. Nothing here imports a module named by a file or opens a socket.
"""

from __future__ import annotations

import dataclasses
import json
import math
import operator
import re
from typing import Any

import torch
import torch.fx

FORMAT = "fusion-passes-graph"
"""The format marker every dump starts with."""
VERSION = 1
"""The format version this reader understands (and the writer writes)."""
STAGES = ("before", "hoisted", "fused")
"""Stages of one graph: as Inductor handed it to us, after hoisting, after fusion."""
MAX_BYTES = 512 * 2**20
"""Largest dump :func:`load` reads. A 61-layer DeepSeek-V3 post-grad graph is a few
MB as JSON (about 1 KB per node with stack traces); 512 MiB is room to spare, and the
cap keeps a hostile file from exhausting memory."""
MAX_DEPTH = 32
"""Deepest nesting of tagged values (real graphs need 4: a list of tuples of nodes)."""

_OPS = ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TAGS = ("node", "tuple", "dict", "float", "dtype", "device", "op", "sym", "slice", "enum", "repr")

# Python callables that appear as call_function targets in post-grad graphs.
PYTHON_TARGETS: dict[str, Any] = {
    f"operator.{n}": getattr(operator, n)
    for n in ("getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg",
              "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "not_")
}
PYTHON_TARGETS["builtins.getattr"] = getattr


class DumpError(ValueError):
    """A file that is not a valid fusion-passes graph dump (the message says why)."""


# ------------------------------------------------------------------------------ writing


def target_string(target: Any) -> str:
    """``torch.ops.aten.add.Tensor`` / ``torch.ops.higher_order.auto_functionalized`` /
    ``operator.getitem``: a call target as a qualified name (strings stay as they are)."""
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload):
        return f"torch.ops.{target.namespace}.{target._opname}.{target._overloadname}"
    if isinstance(target, torch._ops.OpOverloadPacket):
        return f"torch.ops.{target._qualified_op_name.replace('::', '.')}"
    if isinstance(target, torch._ops.HigherOrderOperator):
        return f"torch.ops.higher_order.{target.name()}"
    if isinstance(target, Opaque):
        return target.qualified
    module = getattr(target, "__module__", None) or "builtins"
    module = {"_operator": "operator"}.get(module, module)
    return f"{module}.{getattr(target, '__qualname__', getattr(target, '__name__', repr(target)))}"


def short_target(target: str) -> str:
    """``torch.ops.aten.add.Tensor`` -> ``aten.add.Tensor`` (how reports name ops)."""
    return target[len("torch.ops."):] if target.startswith("torch.ops.") else target


def encode(value: Any) -> Any:
    """A node argument or ``meta['val']`` as JSON (see the module docstring for the tags)."""
    if isinstance(value, torch.fx.Node):
        return {"node": value.name}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, list):
        return [encode(v) for v in value]
    if isinstance(value, tuple):
        return {"tuple": [encode(v) for v in value]}
    if isinstance(value, dict):
        return {"dict": {str(k): encode(v) for k, v in value.items()}}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, (torch._ops.OpOverload, torch._ops.OpOverloadPacket, torch._ops.HigherOrderOperator)):
        return {"op": target_string(value)}
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return {"sym": str(value)}
    if isinstance(value, slice):
        return {"slice": [encode(value.start), encode(value.stop), encode(value.step)]}
    if isinstance(value, (torch.memory_format, torch.layout)):
        return {"enum": str(value)}
    if isinstance(value, torch.Tensor):
        return {
            "shape": [encode(s) for s in value.shape],
            "stride": [encode(s) for s in value.stride()] if value.layout == torch.strided else None,
            "dtype": str(value.dtype).removeprefix("torch."),
            "device": str(value.device),
        }
    return {"repr": repr(value)[:200]}


def source_of(stack_trace: str | None) -> tuple[str | None, str | None]:
    """From a node's stack trace: the last ``File "...", line N, in f`` and the code on it.

    That frame is the model source the node came from (torch records the user frames,
    innermost last).
    """
    if not stack_trace:
        return None, None
    lines = [ln.rstrip() for ln in stack_trace.strip().splitlines() if ln.strip()]
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].strip().startswith("File "):
            code = lines[i + 1].strip() if i + 1 < len(lines) and not lines[i + 1].strip().startswith("File ") else None
            return lines[i].strip(), code
    return None, None


def node_to_dict(node: torch.fx.Node) -> dict[str, Any]:
    """One node in the JSON form."""
    meta: dict[str, Any] = {"val": encode(node.meta.get("val"))}
    trace = node.meta.get("stack_trace")
    source, code = source_of(trace)
    if source:
        meta.update(source=source, code=code, stack_trace=trace)
    return {
        "name": node.name,
        "op": node.op,
        "target": target_string(node.target),
        "args": encode(list(node.args)),
        "kwargs": {k: encode(v) for k, v in node.kwargs.items()},
        "meta": meta,
    }


def graph_to_dict(
    graph: torch.fx.Graph, *, stage: str, model: str | None = None, graph_name: str = "graph_0",
    report: dict | None = None,
) -> dict[str, Any]:
    """The whole dump document for *graph* at *stage* (see the module docstring)."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    doc: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "model": model, "graph": graph_name, "stage": stage,
        "torch": torch.__version__.split("+")[0],
        "nodes": [node_to_dict(n) for n in graph.nodes],
    }
    if report is not None:
        doc["report"] = report
    return doc


def dumps(doc: dict[str, Any]) -> str:
    """The document as JSON text, one node per line, so a dump also reads and greps well."""
    lines = ["{"]
    for key in sorted(k for k in doc if k != "nodes"):
        lines.append(f" {json.dumps(key)}: {json.dumps(doc[key], sort_keys=True, allow_nan=False)},")
    lines.append(' "nodes": [')
    nodes = doc["nodes"]
    for i, n in enumerate(nodes):
        lines.append("  " + json.dumps(n, sort_keys=True, allow_nan=False) + ("," if i < len(nodes) - 1 else ""))
    lines += [" ]", "}"]
    return "\n".join(lines) + "\n"


def write(graph_or_module, path, *, stage: str | None = None, model: str | None = None,
          graph_name: str = "graph_0") -> None:
    """Write the dump of an FX ``Graph`` / ``GraphModule`` to *path* (the API other tools use).

    *stage* defaults to ``"fused"`` when the graph holds a fused op and ``"before"`` otherwise.
    """
    graph = graph_or_module.graph if isinstance(graph_or_module, torch.fx.GraphModule) else graph_or_module
    if stage is None:
        fused = any(target_string(n.target).startswith("torch.ops.fusion_passes.") for n in graph.nodes)
        stage = "fused" if fused else "before"
    with open(path, "w", encoding="utf-8") as f:
        f.write(dumps(graph_to_dict(graph, stage=stage, model=model, graph_name=graph_name)))


def readable(graph: torch.fx.Graph) -> str:
    """``print_readable`` text of *graph*, as TORCH_COMPILE_DEBUG writes ``fx_graph_*.py``."""
    gm = graph.owning_module
    if isinstance(gm, torch.fx.GraphModule) and gm.graph is graph:
        return gm.print_readable(print_output=False, include_stride=True, include_device=True)
    return graph.python_code(root_module="self", verbose=True, include_stride=True, include_device=True).src


# ------------------------------------------------------------------------------ reading


@dataclasses.dataclass
class NodeRecord:
    """One node of a loaded dump (validated; ``args`` still in the tagged JSON form)."""

    name: str
    op: str
    target: str
    args: list
    kwargs: dict
    val: Any = None
    source: str | None = None
    code: str | None = None
    stack_trace: str | None = None

    def inputs(self) -> list[str]:
        """Names of the nodes this one reads, in argument order (with repeats)."""
        out: list[str] = []
        _collect_refs(self.args, out)
        _collect_refs(self.kwargs, out)
        return out

    @property
    def short_target(self) -> str:
        return short_target(self.target)


@dataclasses.dataclass
class GraphDump:
    """A loaded, validated dump: one graph at one stage."""

    model: str | None
    graph: str
    stage: str
    torch_version: str
    nodes: list[NodeRecord]
    report: dict | None = None
    path: str | None = None

    def by_name(self) -> dict[str, NodeRecord]:
        return {n.name: n for n in self.nodes}

    def signature(self) -> list[tuple[str, Any]]:
        """The graph inputs (placeholder names and metadata): our passes never change them,
        so two stages of one graph share it and two different models almost never do."""
        return [(n.name, n.val) for n in self.nodes if n.op == "placeholder"]


def _collect_refs(value: Any, out: list[str]) -> None:
    if isinstance(value, list):
        for v in value:
            _collect_refs(v, out)
    elif isinstance(value, dict):
        if "node" in value and len(value) == 1:
            out.append(value["node"])
        else:
            for v in value.values():
                _collect_refs(v, out)


def _check_value(value: Any, where: str, known: set[str] | None, depth: int = 0) -> None:
    """Validate one tagged value; *known* are the node names it may reference."""
    if depth > MAX_DEPTH:
        raise DumpError(f"{where}: values nested deeper than {MAX_DEPTH}")
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, list):
        for v in value:
            _check_value(v, where, known, depth + 1)
        return
    if not isinstance(value, dict):
        raise DumpError(f"{where}: unexpected JSON value {type(value).__name__}")
    if set(value) >= {"shape", "dtype"}:  # tensor metadata
        for key in ("shape", "stride"):
            dims = value.get(key)
            if dims is not None and (not isinstance(dims, list) or not all(
                    isinstance(d, int) or (isinstance(d, dict) and set(d) == {"sym"} and isinstance(d["sym"], str))
                    for d in dims)):
                raise DumpError(f"{where}: tensor {key} must be a list of ints or {{'sym': str}}")
        if not isinstance(value["dtype"], str) or not isinstance(getattr(torch, value["dtype"], None), torch.dtype):
            raise DumpError(f"{where}: unknown dtype {value['dtype']!r}")
        if not isinstance(value.get("device", "cpu"), str):
            raise DumpError(f"{where}: tensor device must be a string")
        return
    if len(value) != 1 or next(iter(value)) not in _TAGS:
        raise DumpError(f"{where}: unknown value object with keys {sorted(value)[:5]}")
    tag, inner = next(iter(value.items()))
    if tag == "node":
        if not isinstance(inner, str):
            raise DumpError(f"{where}: node reference must be a name")
        if known is not None and inner not in known:
            raise DumpError(f"{where}: reference to node {inner!r} that is not defined before it")
    elif tag in ("tuple", "slice"):
        if not isinstance(inner, list):
            raise DumpError(f"{where}: {tag} must hold a list")
        _check_value(inner, where, known, depth + 1)
    elif tag == "dict":
        if not isinstance(inner, dict):
            raise DumpError(f"{where}: dict must hold an object")
        for v in inner.values():
            _check_value(v, where, known, depth + 1)
    elif tag == "float":
        if inner not in ("inf", "-inf", "nan"):
            raise DumpError(f"{where}: bad float {inner!r}")
    elif tag == "dtype":
        if not isinstance(inner, str) or not isinstance(getattr(torch, inner, None), torch.dtype):
            raise DumpError(f"{where}: unknown dtype {inner!r}")
    elif not isinstance(inner, str):
        raise DumpError(f"{where}: {tag} must be a string")


def from_dict(doc: Any, path: str | None = None) -> GraphDump:
    """Validate a parsed dump document; :class:`DumpError` names the first problem."""
    what = path or "dump"
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise DumpError(f"{what} is not a fusion-passes graph dump (no \"format\": \"{FORMAT}\" marker); "
                        "write one with `fusion-passes dump`")
    if doc.get("version") != VERSION:
        raise DumpError(f"{what}: dump format version {doc.get('version')!r}; this fusion-passes reads version {VERSION}")
    for key, kinds in (("model", (str, type(None))), ("graph", (str,)), ("stage", (str,)), ("torch", (str,)),
                       ("nodes", (list,)), ("report", (dict, type(None)))):
        if not isinstance(doc.get(key), kinds):
            raise DumpError(f"{what}: field {key!r} is missing or has the wrong type")
    if doc["stage"] not in STAGES:
        raise DumpError(f"{what}: stage {doc['stage']!r} is not one of {', '.join(STAGES)}")
    nodes: list[NodeRecord] = []
    seen: set[str] = set()
    for i, raw in enumerate(doc["nodes"]):
        where = f"{what}: node #{i}"
        if not isinstance(raw, dict):
            raise DumpError(f"{where} is not an object")
        name, op, target = raw.get("name"), raw.get("op"), raw.get("target")
        if not isinstance(name, str) or not _NAME.match(name):
            raise DumpError(f"{where}: bad node name {name!r}")
        where = f"{what}: node {name}"
        if name in seen:
            raise DumpError(f"{where}: defined twice")
        if op not in _OPS:
            raise DumpError(f"{where}: unknown op {op!r} (expected one of {', '.join(_OPS)})")
        if not isinstance(target, str) or len(target) > 500:
            raise DumpError(f"{where}: target must be a qualified name string")
        args, kwargs, meta = raw.get("args", []), raw.get("kwargs", {}), raw.get("meta", {})
        if not isinstance(args, list) or not isinstance(kwargs, dict) or not isinstance(meta, dict):
            raise DumpError(f"{where}: args must be a list, kwargs and meta objects")
        _check_value(args, where, seen)
        _check_value(list(kwargs.values()), where, seen)
        _check_value(meta.get("val"), where + " meta.val", None)
        for key in ("source", "code", "stack_trace"):
            if not isinstance(meta.get(key), (str, type(None))):
                raise DumpError(f"{where}: meta.{key} must be a string")
        seen.add(name)
        nodes.append(NodeRecord(name, op, target, args, kwargs, meta.get("val"), meta.get("source"),
                                meta.get("code"), meta.get("stack_trace")))
    outputs = [n for n in nodes if n.op == "output"]
    if len(outputs) != 1 or nodes[-1].op != "output":
        raise DumpError(f"{what}: a graph has exactly one output node, last")
    return GraphDump(doc["model"], doc["graph"], doc["stage"], doc["torch"], nodes, doc.get("report"), path)


def load(path: str) -> GraphDump:
    """Read and validate the dump at *path* (JSON only; see the module docstring)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise DumpError(f"cannot read {path}: {e.strerror or e}") from None
    if len(data) > MAX_BYTES:
        raise DumpError(f"{path} is larger than {MAX_BYTES >> 20} MiB; not a graph dump")
    try:
        doc = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, DumpError) as e:
        raise DumpError(f"{path} is not a fusion-passes graph dump (not JSON: {e})") from None
    return from_dict(doc, path)


def _reject_constant(name: str):
    raise DumpError(f"non-standard JSON constant {name}")


# --------------------------------------------------------------------- back to an FX graph


class Opaque:
    """Stands in for a call target that cannot be found here by name (an op of a library
    that is not loaded, a Python function): carries the name, refuses to run.

    ``__name__`` is the short op name, so :func:`fusion_passes.recognize.target_name`
    (and with it the recognizers) see ``vllm.all_reduce.default`` as they would the op.
    """

    def __init__(self, qualified: str):
        self.qualified = qualified
        self.__name__ = short_target(qualified)

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self.qualified} is a name read from a graph dump; it cannot run")

    def __repr__(self) -> str:
        return f"Opaque({self.qualified})"


def resolve_target(target: str):
    """The call target named *target*: an op found by attribute lookup in ``torch.ops``,
    an entry of :data:`PYTHON_TARGETS`, or an :class:`Opaque` stand-in. Never imports."""
    if target in PYTHON_TARGETS:
        return PYTHON_TARGETS[target]
    parts = target.split(".")
    if target.startswith("torch.ops.") and all(_NAME.match(p) and not p.startswith("__") for p in parts[2:]):
        parts = parts[2:]
        try:
            if parts[0] == "higher_order" and len(parts) == 2:
                found = getattr(torch.ops.higher_order, parts[1])
                if isinstance(found, torch._ops.HigherOrderOperator):
                    return found
            elif len(parts) == 3:
                found = getattr(getattr(getattr(torch.ops, parts[0]), parts[1]), parts[2])
                if isinstance(found, torch._ops.OpOverload):
                    return found
        except (AttributeError, RuntimeError):
            pass
    return Opaque(target)


def _decode(value: Any, env: dict[str, torch.fx.Node]) -> Any:
    if isinstance(value, list):
        return [_decode(v, env) for v in value]
    if not isinstance(value, dict):
        return value
    tag, inner = next(iter(value.items()))
    if tag == "node":
        return env[inner]
    if tag == "tuple":
        return tuple(_decode(v, env) for v in inner)
    if tag == "dict":
        return {k: _decode(v, env) for k, v in inner.items()}
    if tag == "float":
        return float(inner)
    if tag == "dtype":
        return getattr(torch, inner)
    if tag == "device":
        return torch.device(inner)
    if tag == "op":
        return resolve_target(inner)
    if tag == "slice":
        return slice(*(_decode(v, env) for v in inner))
    return inner  # sym / enum / repr: kept as their text


class _Sizes:
    """Concrete stand-ins for symbolic sizes: each distinct expression gets its own int
    (8191, 8193, ...: odd and large, so they never equal a real hidden size by accident)."""

    def __init__(self):
        self.ints: dict[str, int] = {}

    def __call__(self, d) -> int:
        if isinstance(d, int):
            return d
        return self.ints.setdefault(d["sym"], 8191 + 2 * len(self.ints))


def _fake_val(value: Any, mode, sizes: _Sizes):
    if isinstance(value, list):
        return [_fake_val(v, mode, sizes) for v in value]
    if not isinstance(value, dict):
        return value
    if "shape" in value and "dtype" in value:
        shape = [sizes(d) for d in value["shape"]]
        stride = [sizes(d) for d in value["stride"]] if value.get("stride") else None
        device = value.get("device") or "cpu"
        try:
            device = torch.device(device)
        except RuntimeError:
            device = torch.device("meta")
        with mode:
            if stride is not None and len(stride) == len(shape):
                return torch.empty_strided(shape, stride, dtype=getattr(torch, value["dtype"]), device=device)
            return torch.empty(shape, dtype=getattr(torch, value["dtype"]), device=device)
    if "tuple" in value:
        return tuple(_fake_val(v, mode, sizes) for v in value["tuple"])
    if "sym" in value:
        return sizes(value)
    return None


def to_fx(dump: GraphDump) -> torch.fx.Graph:
    """An FX graph with the dump's nodes, names, resolved targets and fake ``meta['val']``
    (for analysis by our passes, never for running; see :func:`resolve_target`)."""
    from fusion_passes import _compat

    graph = torch.fx.Graph()
    env: dict[str, torch.fx.Node] = {}
    mode = _compat.FakeTensorMode(allow_non_fake_inputs=True)
    sizes = _Sizes()
    for rec in dump.nodes:
        args = tuple(_decode(rec.args, env))
        kwargs = {k: _decode(v, env) for k, v in rec.kwargs.items()}
        target = resolve_target(rec.target) if rec.op == "call_function" else rec.target
        # FX made these names legal and unique when it traced; it keeps them as they are
        node = graph.create_node(rec.op, target, args, kwargs, name=rec.name)
        env[rec.name] = node
        try:
            node.meta["val"] = _fake_val(rec.val, mode, sizes)
        except Exception:  # noqa: BLE001 - metadata we cannot rebuild is left out; recognizers report it
            pass
        if rec.stack_trace:
            node.meta["stack_trace"] = rec.stack_trace
    return graph
