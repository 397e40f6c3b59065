"""The native aten quantization chains, as ``QuantFP8.forward_native`` (vLLM with
``custom_ops=none``) and hand-written PyTorch emit them.

* static / per token / per tensor: ``convert(f32) * reciprocal(scale)`` (or ``/ scale``)
  ``-> clamp(+-fp8_max) -> convert(fp8)``, with ``abs -> amax`` for dynamic per-token
  scales and ``abs -> max`` (all elements) for dynamic per-tensor scales;
* per group: ``view(-1, G, g) -> abs -> max`` for 1 x g groups (+ ``log2/ceil/exp2`` UE8M0).

Forms and numerics follow vLLM 0.33's own matchers (compilation/passes/fusion/
matcher_utils.py ``MatcherQuantFP8``). :func:`fusion_passes.recognize.quant.find` asks these
recognizers after the custom-op ones (:mod:`fusion_passes.recognize.quant_ops`).
"""

from __future__ import annotations

import torch
from torch.fx import Node

from fusion_passes import epilogue, variants
from fusion_passes.recognize.quant_read import Quant, arg, getitems, is_fp8, static_scale
from fusion_passes.recognize.aten import Miss, _convert_to, dtype_of, is_op, short, val

aten = torch.ops.aten


def _clamp(node: Node) -> tuple[Node, float | None, float | None] | None:
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


def _sat_to_fp8(node: Node) -> tuple[Node, torch.dtype, list[Node]] | Miss:
    """From the scaled fp32 value: ``clamp(+-m) [clamp] -> convert(fp8)``; returns
    ``(convert node, fp8 dtype, nodes)``."""
    nodes: list[Node] = []
    lo = hi = None
    cur = node
    while len(cur.users) == 1 and (c := _clamp(nxt := next(iter(cur.users)))) is not None and c[0] is cur:
        lo = c[1] if c[1] is not None else lo
        hi = c[2] if c[2] is not None else hi
        nodes.append(nxt)
        cur = nxt
    if len(cur.users) != 1:
        return Miss(f"{short(cur)} in the quant chain has {len(cur.users)} users", cur)
    conv = next(iter(cur.users))
    fp8 = conv.args[1] if is_op(conv, torch.ops.prims.convert_element_type.default) else conv.kwargs.get("dtype")
    if not (_convert_to(conv) and is_fp8(fp8)):
        return Miss(f"{short(conv)} does not convert the scaled value to FP8", conv)
    m = epilogue.fp8_max(fp8)
    if lo != -m or hi != m:
        return Miss(f"{short(cur)} clamps to [{lo}, {hi}], not +-{m} of {fp8}", cur)
    return conv, fp8, [*nodes, conv]


def _sole_users(nodes, inside: set[Node]) -> Node | None:
    """The first of *nodes* with a user outside *inside* (None if all stay inside)."""
    for n in nodes:
        if any(u not in inside for u in n.users):
            return n
    return None


def _view_chain(node: Node, shape: list, include_first: bool = False) -> list[Node] | None:
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


def _f32_view(y: Node, x: Node) -> tuple[Node, list[Node]] | None:
    """*x* is ``y`` upcast to fp32: ``(x, [x])``."""
    if _convert_to(x, torch.float32) and x.args[0] is y:
        return x, [x]
    return None


def _scaled(node: Node) -> tuple[Node, Node, list[Node]] | None:
    """``x * reciprocal(s)`` or ``x / s`` -> ``(x, s, [reciprocal])``."""
    if is_op(node, aten.div.Tensor) and isinstance(node.args[1], Node):
        return node.args[0], node.args[1], []
    if is_op(node, aten.mul.Tensor):
        a, b = node.args[:2]
        for x, r in ((a, b), (b, a)):
            if is_op(r, aten.reciprocal.default) and isinstance(x, Node):
                return x, r.args[0], [r]
    return None


# ------------------------------------------------------------- native aten: static, token


def native_static_or_token(y: Node, u: Node) -> Quant | Miss | None:
    """``convert(y, f32) * reciprocal(s) -> clamp -> convert(fp8)``, s static or per-token."""
    if dtype_of(y) == torch.float32:  # no upcast: the scaling multiplies y itself
        x32, pre, candidates = y, [], [u]
    else:
        up = _f32_view(y, u)
        if up is None:
            return None
        x32, pre = up
        candidates = list(x32.users)
    for m in candidates:
        sc = _scaled(m)
        if sc is None or sc[0] is not x32:
            continue
        _, s, recip = sc
        sat = _sat_to_fp8(m)
        if isinstance(sat, Miss):
            return sat
        q, fp8, tail = sat
        token = _dynamic_scale(y, s, fp8)
        if isinstance(token, tuple):
            kind, scale_nodes, scale_ub = token
            nodes = [*pre, *recip, m, *tail, *scale_nodes]
            inside = set(nodes)
            leak = _sole_users([n for n in nodes if n not in (q, s)], inside)
            what = "per-token" if kind == "fp8_per_token" else "per-tensor"
            if leak is not None:
                return Miss(f"{short(leak)} of the {what} quant has a user outside it", leak)
            params = {"scale_ub": scale_ub} if kind == "fp8_per_token" else {"scale_min": variants.SCALE_MIN_NATIVE}
            return Quant(kind, {**params, "fp8_dtype": fp8}, tuple(nodes), {"q": q, "scales": s})
        static = static_scale(s, y)
        if isinstance(static, Miss):
            return token if isinstance(token, Miss) and token.node is not None else static
        nodes = [*pre, *recip, m, *tail]
        leak = _sole_users([n for n in nodes if n is not q], set(nodes))
        if leak is not None:
            return Miss(f"{short(leak)} of the static quant has a user outside it", leak)
        return Quant("fp8_static", {"scale": static, "fp8_dtype": fp8}, tuple(nodes), {"q": q, "scales": None})
    return None


def _dynamic_scale(y: Node, s: Node, fp8) -> tuple[str, list[Node], Node | None] | Miss | None:
    """``clamp_min(div(convert(unsqueeze(amax(abs(y), [-1]))) [min ub], fp8_max), 1/(fp8_max*512))``
    (per token) or the same over ``max(abs(y))`` of all elements (per tensor; no upper
    bound: vLLM's ``QuantFP8`` allows ``scale_ub`` only per token) ->
    ``(kind, nodes, scale_ub)``."""
    c = _clamp(s)
    if c is None:
        return None
    d, lo, hi = c
    if hi is not None or lo != epilogue.fp8_min_scaling_factor(fp8):
        return Miss(f"{short(s)} floors the scale at {lo}, not 1/(fp8_max*512)", s)
    if not (is_op(d, aten.div.Tensor) and d.args[1] == epilogue.fp8_max(fp8)):
        return Miss(f"{short(d)} does not divide the amax by {epilogue.fp8_max(fp8)}", d)
    nodes, cur, scale_ub = [s, d], d.args[0], None
    ub = _clamp(cur) if is_op(cur, aten.clamp.Tensor, aten.clamp_max.Tensor) else None
    if is_op(cur, aten.clamp.Tensor) and arg(cur, "min", 1) is None:
        scale_ub, nodes, cur = arg(cur, "max", 2), nodes + [cur], cur.args[0]
    elif is_op(cur, aten.clamp_max.Tensor, aten.minimum.default):
        scale_ub, nodes, cur = cur.args[1], nodes + [cur], cur.args[0]
    del ub
    if _convert_to(cur, torch.float32):
        nodes, cur = nodes + [cur], cur.args[0]
    if is_op(cur, aten.unsqueeze.default):
        nodes, cur = nodes + [cur], cur.args[0]
    if is_op(cur, aten.max.default):  # one max over every element: per tensor
        if scale_ub is not None:
            return Miss(f"{short(nodes[-1])}: an upper bound on a per-tensor scale is no vLLM form "
                        "(QuantFP8 takes scale_ub per token only)", nodes[-1])
        ab = cur.args[0]
        miss = _not_abs_of(ab, y, "per-tensor")
        return miss if miss is not None else ("fp8_per_tensor", [*nodes, cur, ab], None)
    if not (is_op(cur, aten.amax.default) and list(arg(cur, "dim", 1, [])) in ([-1], [len(val(y).shape) - 1])):
        return Miss(f"{short(cur)} is not amax over the hidden dim", cur)
    ub_val = val(scale_ub)
    if scale_ub is not None and not (isinstance(ub_val, torch.Tensor) and ub_val.numel() == 1):
        shape = tuple(ub_val.shape) if isinstance(ub_val, torch.Tensor) else "?"
        ub_name = getattr(scale_ub, "name", scale_ub)
        return Miss(f"{short(nodes[2])}: the upper bound {ub_name} has shape {shape}, not one element "
                    "(vLLM's QuantFP8 asserts scale_ub.numel() == 1)", nodes[2])
    ab = cur.args[0]
    miss = _not_abs_of(ab, y, "per-token")
    return miss if miss is not None else ("fp8_per_token", [*nodes, cur, ab], scale_ub)


def _not_abs_of(ab, y: Node, kind: str) -> Miss | None:
    """A Miss unless *ab* is ``abs(y)``: a dynamic scale must come from the norm output."""
    if is_op(ab, aten.abs.default) and ab.args[0] is y:
        return None
    src = ab.args[0] if is_op(ab, aten.abs.default) else ab
    return Miss(f"the {kind} scale is computed from {getattr(src, 'name', src)}, not from the norm output {y.name}", ab)


# ------------------------------------------------------------------ native aten: per group


def native_group(y: Node, u: Node) -> Quant | Miss | None:
    """``view(y, [-1, G, g]) -> abs -> max/amax(-1, keepdim) -> convert -> / fp8_max ->
    clamp_min [-> log2 -> ceil -> exp2]``; ``view / scale -> clamp -> convert(fp8) -> view``;
    scales ``squeeze -> view [-> transpose -> clone -> transpose]``."""
    if is_op(u, aten.constant_pad_nd.default):
        return Miss(f"{short(u)} pads the norm output: hidden {val(y).shape[-1]} is not a multiple "
                    "of the quant group size", u)
    if not is_op(u, aten.view.default, aten.reshape.default):
        return None
    shape = list(val(u).shape)
    hidden = val(y).shape[-1]
    if len(shape) != 3 or shape[1] * shape[2] != hidden:
        return None
    g = int(shape[2])
    absn = next((a for a in u.users if is_op(a, aten.abs.default)), None)
    div = next((d for d in u.users if is_op(d, aten.div.Tensor) and d.args[0] is u), None)
    if absn is None or div is None or len(u.users) != 2:
        return Miss(f"{short(u)} groups the norm output but is not followed by abs and a divide", u)
    scale = _group_scale(u, absn)
    if isinstance(scale, Miss):
        return scale
    nodes, s, d, scale_min, ue8m0 = scale
    values = _group_values(y, div, s, d)
    if isinstance(values, Miss):
        return values
    q, fp8, value_nodes = values
    scales = _group_scales_out(y, div, s, hidden // g)
    if isinstance(scales, Miss):
        return scales
    sc, column_major, scale_nodes = scales
    nodes += value_nodes + scale_nodes
    inside = set(nodes)
    leak = _sole_users([n for n in nodes if n not in (q, sc)], inside)
    if leak is not None:
        return Miss(f"{short(leak)} of the per-group quant has a user outside it", leak)
    params = {"group_size": g, "ue8m0": ue8m0, "column_major": column_major, "amax_eps": 0.0,
              "scale_min": float(scale_min), "fp8_dtype": fp8}
    return Quant("fp8_per_group", params, tuple(nodes), {"q": q, "scales": sc})


def _group_scale(u: Node, absn: Node) -> tuple[list[Node], Node, Node, object, bool] | Miss:
    """From ``abs`` of the grouped view *u*: ``max/amax(-1, keepdim) [-> convert] -> / fp8_max
    -> clamp_min [-> log2 -> ceil -> exp2]`` -> ``(nodes, scale, divide, floor, ue8m0)``."""
    red = next(iter(absn.users)) if len(absn.users) == 1 else None
    nodes = [u, absn]
    if is_op(red, aten.max.dim) and red.args[1] in (-1, 2) and arg(red, "keepdim", 2, False):
        gi = getitems(red)
        if isinstance(gi, Miss) or set(gi) - {0, 1} or 0 not in gi or gi.get(1) is not None and gi[1].users:
            return Miss(f"{short(red)}: the group max's indices are used", red)
        nodes += [red, *gi.values()]
        cur = gi[0]
    elif is_op(red, aten.amax.default) and list(arg(red, "dim", 1, [])) in ([-1], [2]) and arg(red, "keepdim", 2, False):
        nodes.append(red)
        cur = red
    else:
        return Miss(f"{short(red or absn)} is not a max over each group", red or absn)
    if len(cur.users) == 1 and _convert_to(conv := next(iter(cur.users)), torch.float32):
        nodes.append(conv)
        cur = conv
    d = next(iter(cur.users)) if len(cur.users) == 1 else None
    if d is None or not is_op(d, aten.div.Tensor) or d.args[0] is not cur:
        return Miss(f"{short(cur)}: the group amax is not divided by fp8_max", cur)
    clampn = next(iter(d.users)) if len(d.users) == 1 else None
    c = _clamp(clampn) if clampn is not None else None
    if c is None or c[2] is not None:
        return Miss(f"{short(clampn or d)} does not floor the group scale", clampn or d)
    nodes += [d, clampn]
    s = clampn
    ue8m0 = False
    if len(s.users) == 1 and is_op(l2 := next(iter(s.users)), aten.log2.default):
        ce = next(iter(l2.users)) if len(l2.users) == 1 else None
        e2 = next(iter(ce.users)) if ce is not None and len(ce.users) == 1 else None
        if not (is_op(ce, aten.ceil.default) and is_op(e2, aten.exp2.default)):
            return Miss(f"{short(l2)}: UE8M0 rounding is not log2 -> ceil -> exp2", l2)
        nodes += [l2, ce, e2]
        s, ue8m0 = e2, True
    return nodes, s, d, c[1], ue8m0


def _group_values(y: Node, div: Node, s: Node, d: Node) -> tuple[Node, torch.dtype, list[Node]] | Miss:
    """The groups divided by their scale *s*: ``div -> clamp -> convert(fp8) -> view back
    to y's shape`` -> ``(q, fp8 dtype, nodes)``; *d* divided the amax by fp8_max."""
    if div.args[1] is not s:
        return Miss(f"{short(div)} divides the groups by {getattr(div.args[1], 'name', div.args[1])}, "
                    "not by the scale computed from them", div)
    sat = _sat_to_fp8(div)
    if isinstance(sat, Miss):
        return sat
    qconv, fp8, tail = sat
    fp8_max_v = d.args[1]
    if fp8_max_v != epilogue.fp8_max(fp8):
        return Miss(f"{short(d)} divides by {fp8_max_v}, not fp8_max {epilogue.fp8_max(fp8)}", d)
    views = _view_chain(qconv, list(val(y).shape))
    if views is None:
        return Miss(f"{short(qconv)}: the quantized groups are not viewed back to {list(val(y).shape)}", qconv)
    return views[-1], fp8, [div, *tail, *views]


def _group_scales_out(y: Node, div: Node, s: Node, groups: int) -> tuple[Node, bool, list[Node]] | Miss:
    """The scales as returned: ``s -> squeeze(-1) -> view(lead + [G]) [-> transpose -> clone
    -> transpose]`` -> ``(scales node, column_major, nodes)``."""
    others = [n for n in s.users if n is not div]
    if len(others) != 1 or not is_op(others[0], aten.squeeze.dim, aten.squeeze.default, aten.view.default,
                                     aten.reshape.default):
        return Miss(f"{short(s)}: the group scales are not returned as [..., {groups}]", s)
    want = list(val(y).shape[:-1]) + [groups]
    views = _view_chain(others[0], want, include_first=True)
    if views is None:
        return Miss(f"{short(others[0])}: group scales are not returned as {want}", others[0])
    nodes = list(views)
    sc = views[-1]
    column_major = False
    if len(sc.users) == 1 and is_op(t1 := next(iter(sc.users)), aten.transpose.int):
        cl = next(iter(t1.users)) if len(t1.users) == 1 else None
        t2 = next(iter(cl.users)) if cl is not None and len(cl.users) == 1 else None
        if is_op(cl, aten.clone.default) and is_op(t2, aten.transpose.int):
            nodes += [t1, cl, t2]
            sc, column_major = t2, True
    return sc, column_major, nodes


__all__ = ["native_static_or_token", "native_group"]
