"""Rewrite: replace a matched :class:`~fusion_passes.match.Site` by one fused op.

Keeps ``node.meta['val']`` consistent (computed by the op's fake implementation under
the graph's fake mode) and carries the norm's stack trace over, so Inductor and
``fusion-passes explain`` see a well-formed graph.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import Graph, Node

from fusion_passes import _compat
from fusion_passes.match import Site
from fusion_passes.recognize import val

FUSED_OPS = {"add_rmsnorm": torch.ops.fusion_passes.allreduce_add_rmsnorm.default}


class FakeVals:
    """Computes ``meta['val']`` for new nodes under the graph's fake mode."""

    def __init__(self, graph: Graph):
        self.mode = _compat.detect_fake_mode(graph) or _compat.FakeTensorMode(allow_non_fake_inputs=True)

    def __call__(self, op, args: tuple):
        def fake(a):
            if isinstance(a, Node):
                v = val(a)
                if isinstance(v, torch.Tensor) and not isinstance(v, _compat.FakeTensor):
                    return self.mode.from_tensor(v)
                return v
            return a

        with self.mode:
            return op(*[fake(a) for a in args])


def rewrite(graph: Graph, site: Site, fake_vals: FakeVals, backend: str) -> Node:
    """Replace *site* by the fused op; returns the fused node. Raises on inconsistency
    (the pass catches it and restores the graph)."""
    op = FUSED_OPS[site.family.variant]
    norm, ar = site.norm, site.ar
    args = (ar.input, site.residual, norm.weight, norm.eps, ar.group, norm.gemma, norm.weight_in_fp32, backend)
    removed = site.removed
    order = {n: i for i, n in enumerate(graph.nodes)}
    first = min((n for n in removed if n not in ar.nodes), key=order.__getitem__)
    inputs = [a for a in args if isinstance(a, Node)]
    late = max(inputs, key=order.__getitem__)
    needs_sort = order[late] >= order[first]
    with graph.inserting_after(late) if needs_sort else graph.inserting_before(first):
        fused = graph.call_function(op, args)
    fused.meta["val"] = fake_vals(op, args)
    fused.meta["stack_trace"] = norm.out.meta.get("stack_trace")
    with graph.inserting_after(fused):
        out = graph.call_function(operator.getitem, (fused, 0))
    with graph.inserting_after(out):
        res = graph.call_function(operator.getitem, (fused, 1))
    for i, n in enumerate((out, res)):
        n.meta["val"] = fused.meta["val"][i]
        n.meta["stack_trace"] = fused.meta["stack_trace"]

    norm.out.replace_all_uses_with(out)
    if site.add is not None:
        site.add.replace_all_uses_with(res)
    elif norm.residual_out is not None:
        norm.residual_out.replace_all_uses_with(res)
    elif norm.residual is None:
        ar.value.replace_all_uses_with(res)
    for n in sorted(removed, key=order.__getitem__, reverse=True):
        if n.users:
            raise RuntimeError(f"cannot remove {n.name}: still used by {[u.name for u in n.users]}")
        graph.erase_node(n)
    if not res.users:
        graph.erase_node(res)
    if needs_sort:
        _compat.stable_topological_sort(graph)
    return fused
