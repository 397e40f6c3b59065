"""FP8 quantization with one scale per group of ``g`` consecutive values of a row (1 x g
blocks, DeepSeek-style; optionally UE8M0 power-of-two scales, column-major scales), in
every spelling of that kind.

* the native aten chain: ``view(-1, G, g) -> abs -> max`` (+ ``log2/ceil/exp2`` UE8M0),
  as ``QuantFP8.forward_native`` emits it;
* vLLM's ``_C.per_token_group_fp8_quant`` through ``auto_functionalized(_v2)``;
* ROCm: ``vllm.rocm_aiter_group_fp8_quant``.

Forms follow vLLM 0.33's own matchers (compilation/passes/fusion/matcher_utils.py
``MatcherQuantFP8``, rms_quant_fusion.py). The tables at the end give
:func:`fusion_passes.recognize.find_quant` the readers of this kind.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from fusion_passes import epilogue, variants
from fusion_passes.recognize.fx import converts_to, dtype_of, is_op, short, val
from fusion_passes.recognize.quant_read import arg, c_op, clamp_of, first_leak, getitems, sat_to_fp8, view_chain
from fusion_passes.recognize.roles import Miss, Quant

aten = torch.ops.aten

C_PER_GROUP = "_C.per_token_group_fp8_quant.default"
AITER_GROUP = "vllm.rocm_aiter_group_fp8_quant.default"


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
    leak = first_leak([n for n in nodes if n not in (q, sc)], inside)
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
    if len(cur.users) == 1 and converts_to(conv := next(iter(cur.users)), torch.float32):
        nodes.append(conv)
        cur = conv
    d = next(iter(cur.users)) if len(cur.users) == 1 else None
    if d is None or not is_op(d, aten.div.Tensor) or d.args[0] is not cur:
        return Miss(f"{short(cur)}: the group amax is not divided by fp8_max", cur)
    clampn = next(iter(d.users)) if len(d.users) == 1 else None
    c = clamp_of(clampn) if clampn is not None else None
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
    sat = sat_to_fp8(div)
    if isinstance(sat, Miss):
        return sat
    qconv, fp8, tail = sat
    fp8_max_v = d.args[1]
    if fp8_max_v != epilogue.fp8_max(fp8):
        return Miss(f"{short(d)} divides by {fp8_max_v}, not fp8_max {epilogue.fp8_max(fp8)}", d)
    views = view_chain(qconv, list(val(y).shape))
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
    views = view_chain(others[0], want, include_first=True)
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


def _c_per_group(y: Node, u: Node, items: dict[int, Node], kw: dict) -> Quant | Miss:
    fp8 = dtype_of(kw["output_q"])
    g = kw["group_size"]
    if val(y).shape[-1] % g:
        return Miss(f"{short(u)}: group size {g} does not divide hidden {val(y).shape[-1]}", u)
    if kw.get("fp8_max") != epilogue.fp8_max(fp8) or kw.get("fp8_min") != -epilogue.fp8_max(fp8):
        return Miss(f"{short(u)}: fp8 range [{kw.get('fp8_min')}, {kw.get('fp8_max')}] is not "
                    f"+-{epilogue.fp8_max(fp8)}", u)
    if kw.get("dummy_is_tma_aligned"):
        return Miss(f"{short(u)}: TMA-aligned scale layout is not a fused-op output layout", u)
    ue8m0 = bool(kw.get("scale_ue8m0"))
    params = {"group_size": g, "ue8m0": ue8m0, "column_major": bool(kw.get("dummy_is_scale_transposed")),
              # the kernel's floors (variants.SCALE_MIN_KERNEL), as values: the graph says them
              "amax_eps": float(kw.get("eps", variants.KERNEL_GROUP_EPS)),
              "scale_min": variants.KERNEL_GROUP_EPS if ue8m0 else 0.0,
              "fp8_dtype": fp8}
    return Quant("fp8_per_group", params, (u, *items.values()), {"q": items.get(1), "scales": items.get(2)})


def _aiter_group(y: Node, u: Node) -> Quant | Miss | None:
    """``vllm.rocm_aiter_group_fp8_quant(x, group_size, transpose_scale)`` -> (q, scales)."""
    if arg(u, "x", 0) is not y:
        return None
    g = arg(u, "group_size", 1)
    if val(y).shape[-1] % g:
        return Miss(f"{short(u)}: group size {g} does not divide hidden {val(y).shape[-1]}", u)
    items = getitems(u)
    if isinstance(items, Miss):
        return items
    params = {"group_size": g, "ue8m0": False, "column_major": bool(arg(u, "transpose_scale", 2, False)),
              "amax_eps": 0.0, "scale_min": 0.0, "fp8_dtype": dtype_of(items[0]) if 0 in items else None}
    return Quant("fp8_per_group", params, (u, *items.values()), {"q": items.get(0), "scales": items.get(1)})


FUNCTIONALIZED = {C_PER_GROUP: c_op(_c_per_group)}
"""op called through ``auto_functionalized(_v2)`` -> ``reader(y, u, call)``."""
OPS = {AITER_GROUP: _aiter_group}
"""op called directly -> ``reader(y, u)``."""
NATIVE = (native_group,)
"""readers of the native aten chains: ``reader(y, u)``."""
