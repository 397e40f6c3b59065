"""The candidate region of an all-reduce: the nodes that compute on its value and could be
one fused epilogue (elementwise ops, casts, last-dim reductions, layout ops).

:func:`grow` walks forward from the all-reduced value in graph order and admits a user when
its op is in :data:`VOCAB` and every input is either admitted already or a *leaf*: a value
that does not depend on the all-reduce (a weight, the residual, a scale, a constant). A
leaf must also be the same on every rank (replicated): a value computed from a rank's
partial sum is refused, or the fused op would quantize each rank with its own scale.
The region is only a candidate: :mod:`fusion_passes.recognize.meaning` decides by evaluation which
part of it is the chain and what the chain computes.
"""

from __future__ import annotations

import dataclasses
import heapq
import operator

import torch
from torch.fx import Node

from fusion_passes import _compat
from fusion_passes.recognize.fx import op_name, short, val
from fusion_passes.recognize.roles import Miss
from fusion_passes.recognize.vllm_ir import VLLM_ALL_REDUCE

# ops a fused epilogue can contain, by qualified name (fusion_passes.recognize.fx.op_name)
VOCAB = frozenset({
    *(f"aten.{op}.{ov}" for op in ("add", "sub", "mul", "div") for ov in ("Tensor", "Scalar")),
    *(f"aten.{op}.default" for op in (
        "neg", "abs", "reciprocal", "rsqrt", "sqrt", "sign", "log2", "exp2", "ceil", "floor", "round",
        "clamp", "clamp_min", "clamp_max", "minimum", "maximum", "where", "logical_and", "logical_or",
        "logical_not", "bitwise_and", "bitwise_or", "amax", "amin", "max", "min", "aminmax", "clone",
        "view", "reshape", "_unsafe_view", "expand", "squeeze", "unsqueeze", "permute", "alias",
        "full_like", "zeros_like", "ones_like", "index_put", "copy", "masked_fill", "lift_fresh_copy",
        "_to_copy", "square")),
    *(f"aten.{op}.Tensor" for op in ("pow", "clamp", "clamp_min", "clamp_max", "masked_fill",
                                     "bitwise_and", "bitwise_or", "bitwise_left_shift",
                                     "bitwise_right_shift")),
    *(f"aten.{op}.{ov}" for op in ("eq", "ne", "gt", "ge", "lt", "le") for ov in ("Tensor", "Scalar")),
    "aten.pow.Tensor_Scalar", "aten.mean.dim", "aten.sum.dim_IntList", "aten.max.dim", "aten.min.dim",
    "aten.squeeze.dim", "aten.squeeze.dims", "aten.transpose.int", "aten.where.self", "aten.view.dtype",
    "aten.where.ScalarSelf", "aten.where.ScalarOther", "aten.where.Scalar", "aten.clamp.Tensor",
    "aten.masked_fill.Scalar", "prims.convert_element_type.default", "aten.index_put.default",
    "aten.scalar_tensor.default", "aten.full.default", "aten.amax.default", "getitem",
})

COLLECTIVE_NAMESPACES = ("_c10d_functional", "c10d_functional", "fusion_passes")
COLLECTIVE_OPS = (VLLM_ALL_REDUCE,)  # collectives in a namespace that also holds other ops
MAX_NODES = 256  # a fused epilogue is a few dozen nodes; a larger region is not one chain
MAX_DEPTH = 24  # how far a leaf's inputs are followed to prove it independent / replicated


@dataclasses.dataclass
class Region:
    """``root``: the all-reduced value; ``nodes``: admitted nodes in graph order; ``leaves``:
    nodes outside read by them, in first-use order; ``bases``: the inputs the leaves are
    computed from (placeholders, parameters, values before the all-reduce), in the order a
    probe assigns them; ``leaf_nodes``: the independent nodes between bases and leaves, in
    graph order (evaluated to get the leaves' probe values); ``stops``: users of admitted
    nodes that were refused (the first names the op that ended the region)."""

    root: Node
    nodes: list[Node]
    leaves: list[Node]
    bases: list[Node]
    leaf_nodes: list[Node]
    stops: list[tuple[Node, str]]


class Leaves:
    """Answers, for one all-reduce, whether a node is a usable leaf (memoized).

    ``partial``: the graph's per-rank values (:func:`partial_values`)."""

    def __init__(self, anchor: Node, partial: set[Node]):
        self.anchor = anchor
        self.partial = partial
        self.memo: dict[Node, bool] = {}

    def why_not(self, node: Node) -> str | None:
        """None when *node* is independent of the all-reduce and replicated, else why not."""
        if is_size(node):
            return None  # a size (a token-dynamic graph's): every rank's tensors have the same
        if node in self.partial:
            return f"{node.name} is computed from a rank's partial sum: it differs across ranks"
        if not self.independent(node, 0):
            return f"{node.name} could not be shown independent of the all-reduce"
        return None

    def independent(self, node: Node, depth: int) -> bool:
        if node in self.memo:
            return self.memo[node]
        ok = (node.op in ("placeholder", "get_attr") or node < self.anchor) or (
            node.op == "call_function" and depth < MAX_DEPTH and not _is_collective(node)
            and not _is_collective_item(node) and all(self.independent(a, depth + 1) for a in node.all_input_nodes))
        self.memo[node] = ok
        return ok


def partial_values(graph) -> set[Node]:
    """Every value that holds a rank's summand: the inputs of the graph's all-reduces and
    whatever is computed from them without passing through a collective or a fused op."""
    from fusion_passes.recognize import AllReduce, all_reduce

    ars = [a for n in graph.nodes if isinstance(a := all_reduce(n), AllReduce)]
    partial = {a.input for a in ars if isinstance(a.input, Node)}
    inner = {n for a in ars for n in a.nodes}
    for n in graph.nodes:
        if n in inner or n in partial or _is_collective(n) or _is_collective_item(n) or is_size(n):
            continue
        if any(a in partial for a in n.all_input_nodes):
            partial.add(n)
    return partial


def _is_collective(node: object) -> bool:
    """A collective's (or a fused op's) value: a probe input, never evaluated on probes."""
    if not isinstance(node, Node):
        return False
    return getattr(node.target, "namespace", "") in COLLECTIVE_NAMESPACES or op_name(node.target) in COLLECTIVE_OPS


def _admissible(u: Node) -> str | None:
    if u.op != "call_function":
        return f"{u.name} is a graph output" if u.op == "output" else f"{u.name} is not an op"
    if op_name(u.target) not in VOCAB:
        return f"{short(u)} is not an elementwise, cast, reduction or layout op a fused epilogue computes"
    return None


def grow(root: Node, anchor: Node, leaves: Leaves) -> Region | Miss:
    """The region of *root* (the all-reduced value; *anchor*: the all-reduce node)."""
    inside: set[Node] = {root}
    order: list[Node] = []
    found_leaves: dict[Node, None] = {}
    stops: list[tuple[Node, str]] = []
    heap = [(_compat.graph_order(u), id(u), u) for u in root.users] if _compat.graph_order(root) is not None else None
    if heap is None:  # torch without Node._sort_key: graph order by index
        return Miss("this torch's FX nodes carry no graph position", root)
    heapq.heapify(heap)
    seen: set[Node] = set()
    while heap:
        _, _, u = heapq.heappop(heap)
        if u in seen:
            continue
        seen.add(u)
        why = _admissible(u) or _inputs_ok(u, inside, leaves, found_leaves)
        if why is not None:
            stops.append((u, why))
            continue
        inside.add(u)
        order.append(u)
        if len(order) > MAX_NODES:
            return Miss(f"the chain after {root.name} has over {MAX_NODES} elementwise ops", u)
        for w in u.users:
            if w not in seen:
                heapq.heappush(heap, (_compat.graph_order(w), id(w), w))
    bases, leaf_nodes = _leaf_inputs(list(found_leaves), anchor)
    return Region(root, order, list(found_leaves), bases, leaf_nodes, stops)


def _inputs_ok(u: Node, inside: set[Node], leaves: Leaves, found: dict[Node, None]) -> str | None:
    new = []
    for a in u.all_input_nodes:
        if a in inside:
            continue
        why = leaves.why_not(a)
        if why is not None:
            return f"{short(u)} reads {a.name}: {why}"
        new.append(a)
    for a in new:
        found.setdefault(a, None)
    return None


def _leaf_inputs(leaves: list[Node], anchor: Node) -> tuple[list[Node], list[Node]]:
    """``(bases, nodes)``: what the leaves are computed from, and the computation in order."""
    bases: dict[Node, None] = {}
    nodes: set[Node] = set()
    todo = list(leaves)
    while todo:
        n = todo.pop()
        if n in nodes or n in bases:
            continue
        if n.op != "call_function" or n < anchor or _is_collective(n) or _is_collective_item(n) or is_size(n):
            bases[n] = None  # a size is a base too: the probe gives it its value at the probed count
            continue
        nodes.add(n)
        todo.extend(n.all_input_nodes)
    return sorted(bases, key=_compat.graph_order), sorted(nodes, key=_compat.graph_order)


def is_size(node: Node) -> bool:
    """Whether *node* holds a size (a symbolic or plain integer: ``sym_size``, ``s0 * 256``)."""
    v = val(node)
    return isinstance(v, (torch.SymInt, int)) and not isinstance(v, bool)


def _is_collective_item(n: Node) -> bool:
    return n.target is operator.getitem and _is_collective(n.args[0])


def shape_of(node: object) -> tuple | None:
    """The shape of a node's tensor value, a symbolic size as its text (``"s0"``); None
    when it holds no tensor."""
    v = val(node)
    if not isinstance(v, torch.Tensor):
        return None
    return tuple(s if isinstance(s, int) else str(s) for s in v.shape)
