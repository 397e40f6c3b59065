"""Rewrite: replace a matched :class:`~fusion_passes.match.Site` by one fused op.

Keeps ``node.meta['val']`` consistent (computed by the op's fake implementation under
the graph's fake mode) and carries the norm's stack trace over, so Inductor and
``fusion-passes explain`` see a well-formed graph.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
from torch.fx import Graph, Node

from fusion_passes import _compat, ops, variants
from fusion_passes.recognize.fx import FakeVals
from fusion_passes.match import Site
from fusion_passes.variants import REQUIRED

FUSED_OPS = ops.OPS  # variant name -> the fused op overload


def op_arguments(site: Site, backend: str) -> tuple[tuple, dict]:
    """The fused op's ``(args, kwargs)`` for *site*, in its schema order
    (:data:`fusion_passes.variants.SIGNATURE`). Arguments up to ``backend`` go positionally;
    later ones (added to the schema since) as keywords, only when they differ from their
    default, so a graph printed before they existed reads the same."""
    spec = variants.get(site.family.variant)
    norm, ar = site.norm, site.ar
    values = {"input": ar.input, "residual": site.residual, "weight": norm.weight, "eps": norm.eps,
              "group": ar.group, "return_norm": bool(getattr(site.family, "norm_out", False)), "backend": backend,
              **dataclasses.asdict(norm.flags), **(site.quant.params if site.quant is not None else {})}
    cut = [a.name for a in spec.args].index("backend") + 1
    args: list = []
    kwargs: dict = {}
    for i, a in enumerate(spec.args):
        v = values.get(a.name, a.default)
        if v is REQUIRED:
            raise KeyError(f"{spec.name}: the recognizer gave no {a.name!r}")
        if i < cut:
            args.append(v)
        elif v is not a.default and v != a.default:
            kwargs[a.name] = v
    return tuple(args), kwargs


class Unfused(Exception):
    """The site stays as it is: a fused output would differ in dtype or shape from the value
    it replaces (the pass reports the message as the site's reason; the graph is unchanged)."""


def rewrite(graph: Graph, site: Site, fake_vals: FakeVals, backend: str) -> Node:
    """Replace *site* by the fused op; returns the fused node. Raises :class:`Unfused`
    (graph unchanged) where an output would change type, and on inconsistency (the pass
    catches it and restores the graph)."""
    if site.quant is not None:
        return rewrite_quant(graph, site, fake_vals, backend)
    args, kwargs = op_arguments(site, backend)
    spec = variants.get(site.family.variant)
    edit = _Edit(graph, site, FUSED_OPS[spec.name], args, spec.output_names, fake_vals, kwargs)
    edit.check([("norm_out", edit.outs["norm_out"], site.norm.out)])
    site.norm.out.replace_all_uses_with(edit.outs["norm_out"])
    edit.take_residual()
    edit.finish()
    carry(site, fake_vals)
    hand_unrounded(graph, site, edit.fused, fake_vals)
    return edit.fused


def carry(site: Site, fake_vals: FakeVals) -> None:
    """Where the residual is the sum of a previous fused op read by this site alone
    (``site.carry``), that op returns it unrounded in fp32 (``carry_fp32``), as Inductor's
    compile keeps a residual stream it never stores (docs/design.md)."""
    prev = site.carry
    if prev is None:
        return
    prev.kwargs = {**prev.kwargs, "carry_fp32": True}
    fake_vals.update(prev)
    for u in prev.users:
        fake_vals.update(u)


def hand_unrounded(graph: Graph, site: Site, fused: Node, fake_vals: FakeVals) -> None:
    """Where fp32 upcasts of the site's sum outside the site read it unrounded in the compile
    (``site.upcasts``, :func:`fusion_passes.match._upcasts_unrounded`), *fused* returns the
    sum unrounded in fp32 (``carry_fp32``): those upcasts are replaced by it, and every other
    reader gets it rounded to the activation dtype, the value it had."""
    if not site.upcasts:
        return
    names = variants.get(site.family.variant).output_names
    res = next(u for u in fused.users if u.target is operator.getitem and names[u.args[1]] == "residual_out")
    dtype = res.meta["val"].dtype
    fused.kwargs = {**fused.kwargs, "carry_fp32": True}
    fake_vals.update(fused)
    fake_vals.update(res)
    with graph.inserting_after(res):
        rounded = graph.call_function(torch.ops.prims.convert_element_type.default, (res, dtype))
    rounded.meta["stack_trace"] = res.meta.get("stack_trace")
    res.replace_all_uses_with(rounded, delete_user_cb=lambda u: u is not rounded and u not in site.upcasts)
    fake_vals.update(rounded)
    for up in site.upcasts:  # an fp32 upcast of an fp32 value: the value itself
        up.replace_all_uses_with(res)
        graph.erase_node(up)


def rewrite_quant(graph: Graph, site: Site, fake_vals: FakeVals, backend: str) -> Node:
    """Replace an all-reduce -> [add] -> norm -> quant site by one fused quant op: its
    ``q`` / ``scales`` / ``residual_out`` / ``norm_out`` take over the chain's values."""
    from fusion_passes.recognize.meaning import outputs
    from fusion_passes.recognize import dead_buffers

    quant, norm = site.quant, site.norm
    spec = variants.get(site.family.variant)
    norm_out = bool(getattr(site.family, "norm_out", False))
    created = outputs.materialize(graph, site, fake_vals)  # scales spelled as Python numbers become tensors
    args, kwargs = op_arguments(site, backend)
    edit = _Edit(graph, site, FUSED_OPS[spec.name], args, spec.output_names, fake_vals, kwargs)
    edit.new[:0] = created
    outs = edit.outs
    scales = outs.get("scales")
    if scales is not None and quant.scale_view is not None:  # e.g. NVFP4 scales held as int32
        view = torch.ops.aten.view.dtype
        with graph.inserting_after(scales):
            scales = graph.call_function(view, (outs["scales"], quant.scale_view))
        fake_vals.update(scales)
        edit.new.append(scales)

    adapt = getattr(quant, "adapt", {})  # recognition by meaning: the chain's form of an output
    replace = [("norm_out", outs["norm_out"], norm.out)] if norm_out else []
    for name, out in (("q", outs["q"]), ("scales", scales)):
        old = quant.outputs.get(name)
        if old is not None:
            new = outputs.apply(graph, out, adapt.get(name, ""), old, fake_vals)
            edit.new += _chain_to(new, out)
            replace.append((name, new, old))
    edit.check(replace)
    for name, new, old in replace:
        if name != "norm_out":
            old.replace_all_uses_with(new)
    if quant.outputs.get("scale_alias") is not None:  # a static scale "returned" by a mutating op
        quant.outputs["scale_alias"].replace_all_uses_with(quant.params["scale"])
    if norm_out:
        norm.out.replace_all_uses_with(outs["norm_out"], delete_user_cb=lambda u: u not in edit.removed)
    edit.take_residual()
    edit.finish(dead_buffers(quant))  # buffers found before erasing: erase_node clears kwargs
    carry(site, fake_vals)
    hand_unrounded(graph, site, edit.fused, fake_vals)
    return edit.fused


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
        fake_vals.update(self.fused)
        self.fused.meta["stack_trace"] = site.norm.out.meta.get("stack_trace")
        self.outs: dict[str, Node] = {}
        prev = self.fused
        for i, name in enumerate(names):
            with graph.inserting_after(prev):
                prev = self.outs[name] = graph.call_function(operator.getitem, (self.fused, i))
            fake_vals.update(prev)
            prev.meta["stack_trace"] = self.fused.meta["stack_trace"]
        self.new: list[Node] = [self.fused, *self.outs.values()]  # what undo() erases

    def residual_replaced(self) -> Node | None:
        """The chain's node whose value ``residual_out`` takes over (see take_residual)."""
        site = self.site
        if site.add is not None:
            return site.add
        if site.norm.residual_out is not None:
            return site.norm.residual_out
        return site.ar.value if site.norm.residual is None else None

    def check(self, replace: list[tuple[str, Node, Node]]) -> None:
        """Every ``(name, new, old)`` output keeps the dtype and shape of the value it replaces
        (residual_out included), or the inserted nodes are erased and :class:`Unfused` raised.
        Then the nodes that hold a value of the fused op are redirected to it."""
        old = self.residual_replaced()
        pairs = [*replace, *([("residual_out", self.outs["residual_out"], old)] if old is not None else [])]
        for name, new, was in pairs:
            why = type_change(new, was)
            if why is not None:
                for n in reversed(self.new):
                    if not n.users:
                        self.graph.erase_node(n)
                raise Unfused(f"not fused: the fused op's {name} would be {why}")
        for node, same in self.site.norm.aliases:  # nodes holding a value the fused op returns
            node.replace_all_uses_with(same)

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
            if not _compat.is_erased(n) and n.graph is self.graph and not n.users:
                self.graph.erase_node(n)
        for name in ("norm_out", "scales", "residual_out"):
            n = self.outs.get(name)
            if n is not None and not n.users:
                self.graph.erase_node(n)
        if self.needs_sort:
            _compat.stable_topological_sort(self.graph)


def type_change(new: Node, old: Node) -> str | None:
    """How *new*'s value differs from *old*'s in dtype or shape (``"float32 [8, 512] where
    the graph's mul_3 is bfloat16 [8, 512]"``), or None when both match or one is unknown."""
    a, b = new.meta.get("val"), old.meta.get("val")
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return None
    if a.dtype == b.dtype and [str(d) for d in a.shape] == [str(d) for d in b.shape]:
        return None
    text = lambda t: f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"  # noqa: E731
    return f"{text(a)} where the graph's {old.name} is {text(b)}"


def _chain_to(node: Node, start: Node) -> list[Node]:
    """The adapter nodes from *start* (exclusive) to *node*, in graph order."""
    out = []
    while node is not start:
        out.append(node)
        node = node.args[0]
    return out[::-1]
