"""Back to an FX graph, for analysis only: targets by name lookup, values as fakes.

Targets resolve by NAME LOOKUP in ``torch.ops`` (or a fixed table of Python operators);
anything else, and a registered op that draws random numbers, prints or opens a file
(:func:`inert`), becomes an :class:`Opaque` stand-in that carries the name and refuses to
run. Nothing here imports a module named by a file.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

import torch
import torch.fx

from fusion_passes import _compat
from fusion_passes.cli.graphio.format import NAME, short_target

if TYPE_CHECKING:
    from fusion_passes.cli.graphio.reader import GraphDump

PYTHON_TARGETS: dict[str, Any] = {
    f"operator.{n}": getattr(operator, n)
    for n in ("getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg",
              "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "not_")
}
"""Python callables that appear as call_function targets in post-grad graphs."""
PYTHON_TARGETS["builtins.getattr"] = getattr


class Opaque:
    """Stands in for a call target that cannot be found here by name (an op of a library
    that is not loaded, a Python function): carries the name, refuses to run.

    ``__name__`` is the short op name, so :func:`fusion_passes.recognize.fx.op_name`
    (and with it the recognizers) see ``vllm.all_reduce.default`` as they would the op.
    """

    def __init__(self, qualified: str):
        self.qualified = qualified
        self.__name__ = short_target(qualified)

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self.qualified} is a name read from a graph dump; it cannot run")

    def __repr__(self) -> str:
        return f"Opaque({self.qualified})"


FILE_ARGUMENTS = ("filename", "file", "path", "f")
"""Argument names of ops that open a file (``aten::from_file(str filename, ...)``)."""


def inert(op) -> bool:
    """Ops a dump may name that stay :class:`Opaque` even when registered (defence in depth:
    the probes run only their own allowlist, fusion_passes/recognize/meaning/safe_eval.py): ones that draw
    random numbers, print, or take a file name."""
    schema = op._schema
    return (torch.Tag.nondeterministic_seeded in op.tags or schema.name == "aten::_print"
            or any(a.name in FILE_ARGUMENTS and str(a.type) in ("str", "Optional[str]") for a in schema.arguments))


def resolve_target(target: str):
    """The call target named *target*: an op found by attribute lookup in ``torch.ops``,
    an entry of :data:`PYTHON_TARGETS`, or an :class:`Opaque` stand-in. Never imports."""
    if target in PYTHON_TARGETS:
        return PYTHON_TARGETS[target]
    parts = target.split(".")
    if target.startswith("torch.ops.") and all(NAME.match(p) and not p.startswith("__") for p in parts[2:]):
        parts = parts[2:]
        try:
            if parts[0] == "higher_order" and len(parts) == 2:
                found = getattr(torch.ops.higher_order, parts[1])
                if isinstance(found, _compat.HigherOrderOperator):
                    return found
            elif len(parts) == 3:
                found = getattr(getattr(getattr(torch.ops, parts[0]), parts[1]), parts[2])
                if isinstance(found, _compat.OpOverload) and not inert(found):
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
    if tag == "slice":
        return slice(*(_decode(v, env) for v in inner))
    scalar = _SCALARS.get(tag)
    return scalar(inner) if scalar is not None else inner  # sym / enum / repr: kept as their text


_SCALARS = {"float": float, "dtype": lambda s: getattr(torch, s), "device": torch.device, "op": resolve_target}


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
        device = torch.device(value.get("device") or "cpu")  # validated on load
        with mode:
            if stride is not None:
                return torch.empty_strided(shape, stride, dtype=getattr(torch, value["dtype"]), device=device)
            return torch.empty(shape, dtype=getattr(torch, value["dtype"]), device=device)
    if "tuple" in value:
        return tuple(_fake_val(v, mode, sizes) for v in value["tuple"])
    if "sym" in value:
        return sizes(value)
    return None


def to_fx(dump: "GraphDump") -> torch.fx.Graph:
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
