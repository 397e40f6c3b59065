"""FX helpers every part of the library shares: op names, node tests, values, source
lines, and the one mechanism that keeps ``meta['val']`` right (:class:`FakeVals`).

A leaf of :mod:`fusion_passes.recognize`: it imports no other module of it.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch.fx import Graph, Node

from fusion_passes import _compat

aten = torch.ops.aten
prims = torch.ops.prims

_NAMES: dict = {}  # target -> name: every node of every graph asks (the all-reduce scans)


def op_name(target: Any) -> str:
    """``aten.mul.Tensor``-style name of a call target (no import of its library); other
    callables by ``__name__`` (``getitem`` for ``operator.getitem``, ``auto_functionalized``);
    a node's own is ``op_name(node.target)``. The one op-name helper of the library."""
    try:
        return _NAMES[target]
    except (KeyError, TypeError):  # TypeError: an unhashable target, named each time
        pass
    if isinstance(target, _compat.OpOverload):
        name = _compat.op_overload_name(target)
    else:
        name = getattr(target, "__name__", str(target))
    if not isinstance(target, str):  # a placeholder's target is its own name: not kept
        try:
            _NAMES[target] = name
        except TypeError:
            pass
    return name


def short(node: Node) -> str:
    """``mul_3 (aten.mul.Tensor)``: how reasons name a node."""
    return f"{node.name} ({op_name(node.target)})" if node.op == "call_function" else node.name


def is_op(node: object, *targets) -> bool:
    """Whether *node* is a call of one of *targets*."""
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def is_named(node: object, name: str) -> bool:
    """Whether *node* is a call of the op named *name* (:func:`op_name`)."""
    return isinstance(node, Node) and node.op == "call_function" and op_name(node.target) == name


def val(node: object):
    """A node's ``meta['val']`` (None for anything else)."""
    return node.meta.get("val") if isinstance(node, Node) else None


def dtype_of(node: object) -> torch.dtype | None:
    """The dtype of a node's tensor value (None without one)."""
    v = val(node)
    return v.dtype if isinstance(v, torch.Tensor) else None


def converts_to(node: object, dtype: torch.dtype | None = None) -> bool:
    """Whether *node* is a dtype conversion (``prims.convert_element_type``, ``aten._to_copy``)
    to *dtype* (to any dtype when None)."""
    if is_op(node, prims.convert_element_type.default):
        return dtype is None or node.args[1] == dtype
    if is_op(node, aten._to_copy.default):
        return dtype is None or node.kwargs.get("dtype") == dtype
    return False


def source_of(stack_trace: str | None) -> tuple[str | None, str | None]:
    """From a node's stack trace: the last ``File "...", line N, in f`` and the code on it.

    That frame is the model source the node came from (torch records the user frames,
    innermost last).
    """
    if not stack_trace:
        return None, None
    lines = [ln.strip() for ln in stack_trace.strip().splitlines() if ln.strip()]
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("File "):
            code = lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith("File ") else None
            return lines[i], code
    return None, None


def fake_value(mode: _compat.FakeTensorMode, a: Any) -> Any:
    """What *a* is while tracing under *mode*: a node's ``meta['val']`` (a real tensor there
    converted into *mode*), anything else as it is."""
    if not isinstance(a, Node):
        return a
    v = a.meta.get("val")
    if isinstance(v, torch.Tensor) and not isinstance(v, _compat.FakeTensor):
        return mode.from_tensor(v)
    return v


class FakeVals:
    """Keeps ``meta['val']`` right for the nodes the passes create or move: every write of
    one goes through :meth:`update`, which runs the node's op on its arguments' values
    under the graph's fake mode (a ``getitem``: the item of its source's value).

    Inductor's ``FakeTensorUpdater`` (torch/_inductor/fx_utils.py) is not used: it needs a
    ``GraphModule`` and Inductor's ``V.fake_mode`` (absent when a graph is traced with fake
    process groups or read from a file by the command line), and its
    ``incremental_update`` walks the whole graph each call, where a site's rewrite needs
    its new values at once (whether an output keeps its type decides the rewrite): one
    walk per site makes the pass quadratic in layers."""

    def __init__(self, graph: Graph):
        self.mode = _compat.detect_fake_mode(graph) or _compat.FakeTensorMode(allow_non_fake_inputs=True)

    def fake(self, a):
        """*a* as a value under the graph's fake mode (a node's ``meta['val']``)."""
        return fake_value(self.mode, a)

    def __call__(self, op, args: tuple, kwargs: dict | None = None):
        """What ``op(*args, **kwargs)`` returns under the graph's fake mode."""
        with self.mode:
            return op(*torch.fx.node.map_arg(args, self.fake), **torch.fx.node.map_arg(kwargs or {}, self.fake))

    def update(self, node: Node, value: Any = None) -> Any:
        """Set ``node.meta['val']``: *value* when given (a value the caller computed the
        way the op's fake implementation does), else computed from the node; returns it."""
        if value is None:
            if node.target is operator.getitem:
                value = val(node.args[0])[node.args[1]]
            else:
                value = self(node.target, node.args, node.kwargs)
        node.meta["val"] = value
        return value

