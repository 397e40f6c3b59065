"""The node readers every quant reader shares: arguments, ``getitem`` users, static scales,
the saturating cast to FP8, and the prelude of a vLLM ``_C`` custom op (:func:`c_op`).

The readers by quant kind (:mod:`~fusion_passes.recognize.quant_scaled`,
:mod:`~fusion_passes.recognize.quant_group`, :mod:`~fusion_passes.recognize.quant_fp4`)
use them; :func:`fusion_passes.recognize.find_quant` asks those.
"""

from __future__ import annotations

import operator
from typing import Callable

import torch
from torch.fx import Node

from fusion_passes import epilogue
from fusion_passes.recognize.fx import converts_to, is_op, short, val
from fusion_passes.recognize.inplace import Call, partial_view_miss
from fusion_passes.recognize.roles import Miss, Quant

aten = torch.ops.aten


def arg(node: Node, name: str, pos: int | None = None, default=None):
    """Argument *name* of *node*: its keyword, else positional argument *pos*, else *default*."""
    if name in node.kwargs:
        return node.kwargs[name]
    if pos is not None and len(node.args) > pos:
        return node.args[pos]
    return default


def getitems(node: Node) -> dict[int, Node] | Miss:
    """The ``getitem`` users of a multi-output *node* by index; a Miss if another op uses it."""
    out: dict[int, Node] = {}
    for u in node.users:
        if u.target is not operator.getitem:
            return Miss(f"{short(node)} is used by {short(u)}, not only through getitem", u)
        out[u.args[1]] = u
    return out


def is_fp8(dtype) -> bool:
    """Whether *dtype* is one of the FP8 dtypes a fused op writes."""
    return dtype in epilogue.FP8_DTYPES


def _ancestors(node: Node, limit: int = 64) -> set[Node]:
    seen, todo = set(), [node]
    while todo and len(seen) < limit:
        n = todo.pop()
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                todo.append(a)
    return seen


_LAYOUT = (aten.view.default, aten.reshape.default, aten.expand.default, aten.squeeze.default,
           aten.squeeze.dim, aten.unsqueeze.default, aten.clone.default)


def static_scale(s: object, y: Node) -> Node | Miss:
    """A per-tensor scale that is a model parameter (placeholder / get_attr through
    layout ops and fp32 converts), not computed in the graph."""
    if not isinstance(s, Node):
        return Miss(f"static scale {s!r} is not a tensor", None)
    base = s
    while base.op == "call_function" and (is_op(base, *_LAYOUT) or converts_to(base, torch.float32)):
        base = base.args[0]
    if base is y or y in _ancestors(base):
        return Miss(f"the scale {s.name} is computed from the norm output by an unrecognized chain", s)
    if base.op not in ("placeholder", "get_attr"):
        return Miss(f"the scale {s.name} is computed (by {short(base)}) from another tensor, "
                    "not a static parameter", base)
    v = val(s)
    if not isinstance(v, torch.Tensor) or v.numel() != 1:
        return Miss(f"the scale {s.name} has shape {getattr(v, 'shape', '?')}: per-tensor FP8 needs 1 element", s)
    return s


def clamp_of(node: Node) -> tuple[Node, float | None, float | None] | None:
    """``clamp(x, lo, hi)`` / ``clamp_min`` / ``clamp_max`` with constant bounds -> ``(x, lo, hi)``."""
    if is_op(node, aten.clamp.default):
        lo = arg(node, "min", 1)
        hi = arg(node, "max", 2)
        return node.args[0], lo, hi
    if is_op(node, aten.clamp_min.default):
        return node.args[0], node.args[1], None
    if is_op(node, aten.clamp_max.default):
        return node.args[0], None, node.args[1]
    return None


def sat_to_fp8(node: Node) -> tuple[Node, torch.dtype, list[Node]] | Miss:
    """From the scaled fp32 value: ``clamp(+-m) [clamp] -> convert(fp8)``; returns
    ``(convert node, fp8 dtype, nodes)``."""
    nodes: list[Node] = []
    lo = hi = None
    cur = node
    while len(cur.users) == 1 and (c := clamp_of(nxt := next(iter(cur.users)))) is not None and c[0] is cur:
        lo = c[1] if c[1] is not None else lo
        hi = c[2] if c[2] is not None else hi
        nodes.append(nxt)
        cur = nxt
    if len(cur.users) != 1:
        return Miss(f"{short(cur)} in the quant chain has {len(cur.users)} users", cur)
    conv = next(iter(cur.users))
    fp8 = conv.args[1] if is_op(conv, torch.ops.prims.convert_element_type.default) else conv.kwargs.get("dtype")
    if not (converts_to(conv) and is_fp8(fp8)):
        return Miss(f"{short(conv)} does not convert the scaled value to FP8", conv)
    m = epilogue.fp8_max(fp8)
    if lo != -m or hi != m:
        return Miss(f"{short(cur)} clamps to [{lo}, {hi}], not +-{m} of {fp8}", cur)
    return conv, fp8, [*nodes, conv]


def first_leak(nodes, inside: set[Node]) -> Node | None:
    """The first of *nodes* with a user outside *inside* (None if all stay inside)."""
    for n in nodes:
        if any(u not in inside for u in n.users):
            return n
    return None


def view_chain(node: Node, shape: list, include_first: bool = False) -> list[Node] | None:
    """The longest run of single-user view / reshape / squeeze nodes after *node* (with
    *node* itself if ``include_first``) that ends at *shape*; None if none does."""
    chain, best = ([node] if include_first else []), None
    cur = node
    if list(val(cur).shape) == shape:
        best = len(chain)
    while len(cur.users) == 1 and is_op(nxt := next(iter(cur.users)), aten.view.default, aten.reshape.default,
                                         aten.squeeze.dim, aten.squeeze.default):
        chain.append(nxt)
        cur = nxt
        if list(val(cur).shape) == shape:
            best = len(chain)
    if best is None or (best == 0 and include_first):
        return None
    return chain[:best] or [node]


def c_op(reader: Callable) -> Callable:
    """A reader of a vLLM ``_C`` quant op called through ``auto_functionalized(_v2)``:
    ``reader(y, u, items, kwargs)`` is asked when the op quantizes *y* (its ``input`` /
    ``x``), with the ``getitem`` users of *u* by their v1 index (1: q, 2: scales;
    :func:`fusion_passes.recognize.inplace.functionalized_call`)."""

    def read(y: Node, u: Node, call: Call) -> Quant | Miss | None:
        kw = call.args
        if kw.get("input", kw.get("x")) is not y:
            return None
        if call.partial_views:
            return partial_view_miss(u, call)
        items = getitems(u)
        if isinstance(items, Miss):
            return items
        at = {here: v1 for v1, here in call.v1_index.items()}
        return reader(y, u, {at[i]: g for i, g in items.items() if i in at}, kw)

    return read
