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

_fp = torch.ops.fusion_passes
FUSED_OPS = {
    "add_rmsnorm": _fp.allreduce_add_rmsnorm.default,
    "add_rmsnorm_fp8_static": _fp.allreduce_add_rmsnorm_fp8_static.default,
    "add_rmsnorm_fp8_per_token": _fp.allreduce_add_rmsnorm_fp8_per_token.default,
    "add_rmsnorm_fp8_per_group": _fp.allreduce_add_rmsnorm_fp8_per_group.default,
    "add_rmsnorm_fp8_per_tensor": _fp.allreduce_add_rmsnorm_fp8_per_tensor.default,
    "add_rmsnorm_nvfp4": _fp.allreduce_add_rmsnorm_nvfp4.default,
    "add_rmsnorm_mxfp4": _fp.allreduce_add_rmsnorm_mxfp4.default,
}

# quant params of each variant, in the fused op's argument order (fusion_passes.ops)
QUANT_ARGS = {
    "add_rmsnorm_fp8_static": ("scale", "fp8_dtype"),
    "add_rmsnorm_fp8_per_token": ("scale_ub", "fp8_dtype"),
    "add_rmsnorm_fp8_per_group": ("group_size", "ue8m0", "column_major", "amax_eps", "scale_min", "fp8_dtype"),
    "add_rmsnorm_fp8_per_tensor": ("scale_min", "fp8_dtype"),
    "add_rmsnorm_nvfp4": ("global_scale", "swizzle"),
    "add_rmsnorm_mxfp4": (),
}


class FakeVals:
    """Computes ``meta['val']`` for new nodes under the graph's fake mode."""

    def __init__(self, graph: Graph):
        self.mode = _compat.detect_fake_mode(graph) or _compat.FakeTensorMode(allow_non_fake_inputs=True)

    def __call__(self, op, args: tuple, kwargs: dict | None = None):
        def fake(a):
            if isinstance(a, Node):
                v = val(a)
                if isinstance(v, torch.Tensor) and not isinstance(v, _compat.FakeTensor):
                    return self.mode.from_tensor(v)
                return v
            return a

        with self.mode:
            return op(*[fake(a) for a in args], **(kwargs or {}))


def rewrite(graph: Graph, site: Site, fake_vals: FakeVals, backend: str) -> Node:
    """Replace *site* by the fused op; returns the fused node. Raises on inconsistency
    (the pass catches it and restores the graph)."""
    if site.quant is not None:
        return rewrite_quant(graph, site, fake_vals, backend)
    norm, ar = site.norm, site.ar
    args = (ar.input, site.residual, norm.weight, norm.eps, ar.group, norm.gemma, norm.weight_in_fp32, backend)
    edit = _Edit(graph, site, FUSED_OPS[site.family.variant], args, ("norm_out", "residual_out"), fake_vals,
                 _kwargs(site))
    norm.out.replace_all_uses_with(edit.outs["norm_out"])
    edit.take_residual()
    edit.finish()
    return edit.fused


def rewrite_quant(graph: Graph, site: Site, fake_vals: FakeVals, backend: str) -> Node:
    """Replace an all-reduce -> [add] -> norm -> quant site by one fused quant op: its
    ``q`` / ``scales`` / ``residual_out`` / ``norm_out`` take over the chain's values."""
    from fusion_passes.quant import dead_buffers

    quant, norm, ar = site.quant, site.norm, site.ar
    variant = site.family.variant
    norm_out = bool(getattr(site.family, "norm_out", False))
    args = (ar.input, site.residual, norm.weight, norm.eps, ar.group,
            *(quant.params[k] for k in QUANT_ARGS[variant]),
            norm.gemma, norm.weight_in_fp32, norm_out, backend)
    names = ("q", "residual_out", "norm_out") if variant == "add_rmsnorm_fp8_static" else (
        "q", "scales", "residual_out", "norm_out")
    edit = _Edit(graph, site, FUSED_OPS[variant], args, names, fake_vals, _kwargs(site))
    outs = edit.outs
    scales = outs.get("scales")
    if scales is not None and quant.scale_view is not None:  # e.g. NVFP4 scales held as int32
        view = torch.ops.aten.view.dtype
        with graph.inserting_after(scales):
            scales = graph.call_function(view, (outs["scales"], quant.scale_view))
        scales.meta["val"] = fake_vals(view, (outs["scales"], quant.scale_view))

    if quant.outputs.get("q") is not None:
        quant.outputs["q"].replace_all_uses_with(outs["q"])
    if quant.outputs.get("scales") is not None:
        quant.outputs["scales"].replace_all_uses_with(scales)
    if quant.outputs.get("scale_alias") is not None:  # a static scale "returned" by a mutating op
        quant.outputs["scale_alias"].replace_all_uses_with(quant.params["scale"])
    if norm_out:
        norm.out.replace_all_uses_with(outs["norm_out"], delete_user_cb=lambda u: u not in edit.removed)
    edit.take_residual()
    edit.finish(dead_buffers(quant))  # buffers found before erasing: erase_node clears kwargs
    return edit.fused


def _kwargs(site: Site) -> dict:
    """Keyword arguments of the fused node: only those that differ from the op's defaults
    (a graph printed before this flag existed reads the same)."""
    if site.norm.residual_in_fp32 and site.residual is not None:
        return {"residual_in_fp32": True}
    return {}


class _Edit:
    """One site's rewrite: the fused node and its getitems inserted after all inputs and
    before the chain; then the chain erased (it must have no users left)."""

    def __init__(self, graph: Graph, site: Site, op, args: tuple, names: tuple[str, ...], fake_vals: FakeVals,
                 kwargs: dict | None = None):
        self.graph, self.site, self.removed = graph, site, site.removed
        # FX nodes compare by their position in the graph (Node._sort_key): no per-site scan
        # of the whole graph, which made the pass quadratic in layers
        first = min(n for n in self.removed if n not in site.ar.nodes)
        late = max(a for a in args if isinstance(a, Node))
        # an input defined after the chain starts (a weight cast placed late): insert after
        # it and restore topological order at the end
        self.needs_sort = not late < first
        with graph.inserting_after(late) if self.needs_sort else graph.inserting_before(first):
            self.fused = graph.call_function(op, args, kwargs or {})
        self.fused.meta["val"] = fake_vals(op, args, kwargs)
        self.fused.meta["stack_trace"] = site.norm.out.meta.get("stack_trace")
        self.outs: dict[str, Node] = {}
        prev = self.fused
        for i, name in enumerate(names):
            with graph.inserting_after(prev):
                prev = self.outs[name] = graph.call_function(operator.getitem, (self.fused, i))
            prev.meta["val"] = self.fused.meta["val"][i]
            prev.meta["stack_trace"] = self.fused.meta["stack_trace"]

    def take_residual(self) -> None:
        """``residual_out`` replaces the sum (plain add, vLLM's residual output, or the
        reduced value itself when there is no residual)."""
        site, res, keep = self.site, self.outs["residual_out"], lambda u: u not in self.removed
        if site.add is not None:
            site.add.replace_all_uses_with(res, delete_user_cb=keep)
        elif site.norm.residual_out is not None:
            site.norm.residual_out.replace_all_uses_with(res)
        elif site.norm.residual is None:
            site.ar.value.replace_all_uses_with(res, delete_user_cb=keep)

    def finish(self, dead: tuple[Node, ...] | list[Node] = ()) -> None:
        for n in sorted(self.removed, reverse=True):
            if n.users:
                raise RuntimeError(f"cannot remove {n.name}: still used by {[u.name for u in n.users]}")
            self.graph.erase_node(n)
        for n in dead:
            if not n._erased and n.graph is self.graph and not n.users:
                self.graph.erase_node(n)
        for name in ("norm_out", "scales", "residual_out"):
            n = self.outs.get(name)
            if n is not None and not n.users:
                self.graph.erase_node(n)
        if self.needs_sort:
            _compat.stable_topological_sort(self.graph)
