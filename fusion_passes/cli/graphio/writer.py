"""Writing: an FX graph as a dump document, and the document as text."""

from __future__ import annotations

import json
import math
from typing import Any

import torch
import torch.fx

from fusion_passes import _compat
from fusion_passes.cli.graphio.format import FORMAT, STAGES, VERSION
from fusion_passes.cli.graphio.rebuild import Opaque
from fusion_passes.recognize.fx import source_of  # noqa: F401  (re-exported: explain and the recorder read it here)


def target_string(target: Any) -> str:
    """``torch.ops.aten.add.Tensor`` / ``torch.ops.higher_order.auto_functionalized`` /
    ``operator.getitem``: a call target as a qualified name (strings stay as they are)."""
    if isinstance(target, str):
        return target
    if isinstance(target, _compat.OpOverload):
        return f"torch.ops.{target.namespace}.{target._opname}.{target._overloadname}"
    if isinstance(target, _compat.OpOverloadPacket):
        return f"torch.ops.{target._qualified_op_name.replace('::', '.')}"
    if isinstance(target, _compat.HigherOrderOperator):
        return f"torch.ops.higher_order.{target.name()}"
    if isinstance(target, Opaque):
        return target.qualified
    module = getattr(target, "__module__", None) or "builtins"
    module = {"_operator": "operator"}.get(module, module)
    return f"{module}.{getattr(target, '__qualname__', getattr(target, '__name__', repr(target)))}"


def encode(value: Any) -> Any:
    """A node argument or ``meta['val']`` as JSON (see the package docstring for the tags)."""
    if isinstance(value, torch.fx.Node):
        return {"node": value.name}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, (list, tuple, dict, slice)):
        return _encode_container(value)
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, (_compat.OpOverload, _compat.OpOverloadPacket, _compat.HigherOrderOperator)):
        return {"op": target_string(value)}
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return {"sym": str(value)}
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


def _encode_container(value: list | tuple | dict | slice) -> Any:
    if isinstance(value, list):
        return [encode(v) for v in value]
    if isinstance(value, tuple):
        return {"tuple": [encode(v) for v in value]}
    if isinstance(value, dict):
        return {"dict": {str(k): encode(v) for k, v in value.items()}}
    return {"slice": [encode(value.start), encode(value.stop), encode(value.step)]}


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
    """The whole dump document for *graph* at *stage* (see the package docstring)."""
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
    The file appears complete or not at all (written under a temporary name, then renamed).
    """
    from fusion_passes.cli.outputs import write_atomic

    graph = graph_or_module.graph if isinstance(graph_or_module, torch.fx.GraphModule) else graph_or_module
    if stage is None:
        fused = any(target_string(n.target).startswith("torch.ops.fusion_passes.") for n in graph.nodes)
        stage = "fused" if fused else "before"
    write_atomic(path, dumps(graph_to_dict(graph, stage=stage, model=model, graph_name=graph_name)))


def readable(graph: torch.fx.Graph) -> str:
    """``print_readable`` text of *graph*, as TORCH_COMPILE_DEBUG writes ``fx_graph_*.py``."""
    gm = graph.owning_module
    if isinstance(gm, torch.fx.GraphModule) and gm.graph is graph:
        return gm.print_readable(print_output=False, include_stride=True, include_device=True)
    return graph.python_code(root_module="self", verbose=True, include_stride=True, include_device=True).src
