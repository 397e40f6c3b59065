"""Merge identical computations of one value before matching.

A model that quantizes one norm output for several GEMMs (Hugging Face's FP8 linears:
``q_proj``, ``k_proj`` and ``v_proj`` each quantize their input) leaves as many identical
quant chains in the post-grad graph: AOTAutograd does not merge them. The fused op
returns ONE quantized value, so only one chain could be taken over and the others would
remain as separate quant kernels. :func:`merge_identical` makes them one chain with
several readers first.

Two nodes are merged only when they are provably the same value: the same pure aten /
prims op with the same arguments, where a node argument is the same graph node (after
earlier merges) or a constant made by the same op from the same literal arguments
(``full([1], 1.0)`` written twice). Nothing random, mutating or collective is merged, nor
an uninitialized buffer (``empty_like``), and the walk stops at GEMMs (where a quant chain
ends) and at non-aten ops.
"""

from __future__ import annotations

from torch.fx import Graph, Node

from fusion_passes import _compat
from fusion_passes.recognize import fx

_GEMMS = ("aten.mm.", "aten.addmm.", "aten.bmm.", "aten.baddbmm.", "aten._scaled_mm", "aten.linear.",
          "aten.matmul.", "aten.convolution.")
_CONSTANTS = ("aten.full.default", "aten.scalar_tensor.default", "aten.zeros.default", "aten.ones.default")
"""Ops that make a constant from literal arguments only (no tensor input)."""


def _pure(node: Node) -> bool:
    """An aten / prims op without side effects or randomness (a GEMM is pure but ends the walk)."""
    t = node.target
    if node.op != "call_function" or not isinstance(t, _compat.OpOverload) or t.namespace not in ("aten", "prims"):
        return False
    schema = _compat.op_schema(t)
    if schema.is_mutable or any(tag in t.tags for tag in _nondeterministic_tags()):
        return False
    name = fx.op_name(t)
    # two uninitialized buffers (empty_like, new_empty) are two buffers, not one value
    return not name.startswith(_GEMMS) and "empty" not in name.split(".")[1]


def _nondeterministic_tags():
    import torch

    return (torch.Tag.nondeterministic_seeded, torch.Tag.nondeterministic_bitwise)


def _key(node: Node, mapping: dict | None = None):
    """What makes *node*'s value: its op and arguments, each node argument by identity
    (through *mapping*) or, for a literal constant, by the op and literals that make it."""
    mapping = mapping or {}

    def arg(a):
        if isinstance(a, Node):
            a = mapping.get(a, a)
            if fx.op_name(a.target) in _CONSTANTS and not a.all_input_nodes:
                return ("const", a.target, _frozen(a.args), _frozen(a.kwargs))
            return ("node", a)
        if isinstance(a, (list, tuple)):
            return (type(a).__name__, *(arg(x) for x in a))
        return _frozen(a)

    return (node.target, tuple(arg(a) for a in node.args),
            tuple(sorted((k, arg(v)) for k, v in node.kwargs.items())))


def _frozen(a):
    if isinstance(a, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in a.items()))
    return (type(a).__name__, repr(a))


def _region(seeds: list[Node]) -> set[Node]:
    """The pure nodes computed from *seeds*, up to GEMMs and other impure readers."""
    out: set[Node] = set()
    stack = list(seeds)
    while stack:
        for u in stack.pop().users:
            if u not in out and _pure(u):
                out.add(u)
                stack.append(u)
    return out


def _candidates(graph: Graph, region: set[Node]) -> dict[Node, Node]:
    """``copy -> first node computing the same value``, in graph order (common
    subexpressions of the region)."""
    mapping: dict[Node, Node] = {}
    first: dict = {}
    for n in graph.nodes:
        if n in region:
            rep = first.setdefault(_key(n, mapping), n)
            if rep is not n:
                mapping[n] = rep
    return mapping


def _whole_chains(mapping: dict[Node, Node]) -> dict[Node, Node]:
    """Keep only copies whose whole computation is copied: a copy one of whose pure
    readers is no copy (the chains part ways after it) stays, and so does what then no
    longer reads the same arguments. A shared prefix alone is therefore never merged."""
    changed = True
    while changed:
        changed = False
        for v, w in list(mapping.items()):
            if any(_pure(u) and u not in mapping for u in v.users) or _key(v, mapping) != _key(w, mapping):
                del mapping[v]
                changed = True
    return mapping


def merge_identical(graph: Graph, seeds: list[Node]) -> int:
    """Merge identical chains computed from *seeds* (up to the next GEMM): a chain is
    merged only when it is the same computation as an earlier one node for node, all of
    it. Returns how many nodes were removed."""
    mapping = _whole_chains(_candidates(graph, _region(seeds)))
    order = {n: i for i, n in enumerate(graph.nodes)}
    for v in sorted(mapping, key=order.__getitem__, reverse=True):  # readers first
        v.replace_all_uses_with(mapping[v])
        graph.erase_node(v)
    return len(mapping)


__all__ = ["merge_identical"]
