"""Recognize the quantization of a norm output: the :class:`Quant` role.

vLLM quantizes the norm output right away for the next GEMM; plain PyTorch code does
the same in aten. :func:`find` looks at the users of the norm output and returns the one
quantization that consumes it, in any of the forms it takes in real graphs:

* the native aten chains, as ``QuantFP8.forward_native`` (vLLM with ``custom_ops=none``)
  and hand-written PyTorch emit them: ``convert(f32) * reciprocal(scale)`` (or ``/ scale``)
  ``-> clamp(+-fp8_max) -> convert(fp8)``, with ``abs -> amax`` for dynamic per-token
  scales, ``abs -> max`` (all elements) for dynamic per-tensor scales and
  ``view(-1, G, g) -> abs -> max`` for 1 x g groups (+ ``log2/ceil/exp2`` UE8M0);
* vLLM's custom ops through ``auto_functionalized``: ``_C.static_scaled_fp8_quant``,
  ``_C.dynamic_scaled_fp8_quant`` (per tensor), ``_C.dynamic_per_token_scaled_fp8_quant``,
  ``_C.per_token_group_fp8_quant``, ``_C.scaled_fp4_quant.out``;
* ROCm: ``vllm.rocm_aiter_per_tensor_quant`` (auto_functionalized, static),
  ``vllm.rocm_aiter_per_token_quant``, ``vllm.rocm_aiter_group_fp8_quant``;
* MXFP4: no unfused form is matched. vLLM 0.33 has no standalone MXFP4 activation quant
  on CUDA/ROCm (ROCm quantizes inside its GEMM op, ``triton_fp4_gemm_dynamic_quant``), and
  XPU's ``vllm.xpu_mxfp4_quantize`` rounds differently (eps floor, e8m0fnu dtypes), so
  fusing it would change numerics. The fused op exists for direct use and backends.

Forms and numerics follow vLLM 0.33's own matchers (compilation/passes/fusion/
matcher_utils.py ``MatcherQuantFP8``, rms_quant_fusion.py). Every non-match is a
:class:`~fusion_passes.recognize.Miss` naming the node that blocked it.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
from torch.fx import Node

from fusion_passes import epilogue, fx_util, variants
from fusion_passes.recognize import Miss, _convert_to, dtype_of, is_named, is_op, short, val

aten = torch.ops.aten

# quant kinds -> fused-op variant (fusion_passes.variants)
VARIANTS = {kind: v.name for kind, v in variants.BY_KIND.items()}

AUTO_FUNCTIONALIZED = "auto_functionalized"
C_STATIC = "_C.static_scaled_fp8_quant.default"
C_PER_TENSOR = "_C.dynamic_scaled_fp8_quant.default"
C_PER_TOKEN = "_C.dynamic_per_token_scaled_fp8_quant.default"
C_PER_GROUP = "_C.per_token_group_fp8_quant.default"
C_NVFP4 = "_C.scaled_fp4_quant.out"
AITER_PER_TENSOR = "vllm.rocm_aiter_per_tensor_quant.default"
AITER_PER_TOKEN = "vllm.rocm_aiter_per_token_quant.default"
AITER_GROUP = "vllm.rocm_aiter_group_fp8_quant.default"


@dataclasses.dataclass
class Quant:
    """One quantization of the norm output.

    ``kind``: a key of :data:`VARIANTS`; ``params``: the fused op's quant arguments by
    name (nodes or constants; one omitted takes its default, ``fusion_passes.variants``); ``nodes``: every node the fused op replaces (all used only
    inside the quant or through ``outputs``); ``outputs``: ``"q"`` and ``"scales"`` (None
    when the chain exposes no scale, e.g. static) -> the node carrying that value;
    ``scale_view``: the dtype the graph's scale output has when it differs from the fused
    op's (NVFP4's ``scaled_fp4_quant.out`` writes its FP8 scales into int32 / uint8).
    """

    kind: str
    params: dict[str, Any]
    nodes: tuple[Node, ...]
    outputs: dict[str, Node | None]
    scale_view: torch.dtype | None = None

    @property
    def variant(self) -> str:
        return variants.BY_KIND[self.kind].name


def find(y: Node) -> Quant | Miss | None:
    """The quantization of norm output *y*: a :class:`Quant`, a :class:`Miss` when a user
    looks like one but cannot fuse (the reason names the node), or None when no user
    quantizes *y*."""
    miss = None
    for u in list(y.users):
        for rec in (_custom_op, _aiter_op, _native_static_or_token, _native_group):
            found = rec(y, u)
            if isinstance(found, Quant):
                return found
            if isinstance(found, Miss) and miss is None:
                miss = found
    return miss


# --------------------------------------------------------------------------- helpers


def _kw(node: Node, name: str, pos: int | None = None, default=None):
    if name in node.kwargs:
        return node.kwargs[name]
    if pos is not None and len(node.args) > pos:
        return node.args[pos]
    return default


def _getitems(node: Node) -> dict[int, Node] | Miss:
    out: dict[int, Node] = {}
    for u in node.users:
        if u.target is not operator.getitem:
            return Miss(f"{short(node)} is used by {short(u)}, not only through getitem", u)
        out[u.args[1]] = u
    return out


def _is_fp8(dtype) -> bool:
    return dtype in epilogue.FP8_DTYPES


def _clamp(node: Node) -> tuple[Node, float | None, float | None] | None:
    """``clamp(x, lo, hi)`` / ``clamp_min`` / ``clamp_max`` with constant bounds -> ``(x, lo, hi)``."""
    if is_op(node, aten.clamp.default):
        lo = _kw(node, "min", 1)
        hi = _kw(node, "max", 2)
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
    if not (_convert_to(conv) and _is_fp8(fp8)):
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


def _static_scale(s: object, y: Node) -> Node | Miss:
    """A per-tensor scale that is a model parameter (placeholder / get_attr through
    layout ops and fp32 converts), not computed in the graph."""
    if not isinstance(s, Node):
        return Miss(f"static scale {s!r} is not a tensor", None)
    base = s
    while base.op == "call_function" and (is_op(base, *_LAYOUT) or _convert_to(base, torch.float32)):
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


def _native_static_or_token(y: Node, u: Node) -> Quant | Miss | None:
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
        static = _static_scale(s, y)
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
    if is_op(cur, aten.clamp.Tensor) and _kw(cur, "min", 1) is None:
        scale_ub, nodes, cur = _kw(cur, "max", 2), nodes + [cur], cur.args[0]
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
    if not (is_op(cur, aten.amax.default) and list(_kw(cur, "dim", 1, [])) in ([-1], [len(val(y).shape) - 1])):
        return Miss(f"{short(cur)} is not amax over the hidden dim", cur)
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


def _native_group(y: Node, u: Node) -> Quant | Miss | None:
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
    red = next(iter(absn.users)) if len(absn.users) == 1 else None
    nodes = [u, absn]
    if is_op(red, aten.max.dim) and red.args[1] in (-1, 2) and _kw(red, "keepdim", 2, False):
        gi = _getitems(red)
        if isinstance(gi, Miss) or set(gi) - {0, 1} or 0 not in gi or gi.get(1) is not None and gi[1].users:
            return Miss(f"{short(red)}: the group max's indices are used", red)
        nodes += [red, *gi.values()]
        cur = gi[0]
    elif is_op(red, aten.amax.default) and list(_kw(red, "dim", 1, [])) in ([-1], [2]) and _kw(red, "keepdim", 2, False):
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
    fp8_max_v = d.args[1]
    clampn = next(iter(d.users)) if len(d.users) == 1 else None
    c = _clamp(clampn) if clampn is not None else None
    if c is None or c[2] is not None:
        return Miss(f"{short(clampn or d)} does not floor the group scale", clampn or d)
    scale_min = c[1]
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
    if div.args[1] is not s:
        return Miss(f"{short(div)} divides the groups by {getattr(div.args[1], 'name', div.args[1])}, "
                    "not by the scale computed from them", div)
    sat = _sat_to_fp8(div)
    if isinstance(sat, Miss):
        return sat
    qconv, fp8, tail = sat
    if fp8_max_v != epilogue.fp8_max(fp8):
        return Miss(f"{short(d)} divides by {fp8_max_v}, not fp8_max {epilogue.fp8_max(fp8)}", d)
    nodes += [div, *tail]
    views = _view_chain(qconv, list(val(y).shape))
    if views is None:
        return Miss(f"{short(qconv)}: the quantized groups are not viewed back to {list(val(y).shape)}", qconv)
    nodes += views
    q = views[-1]
    # scales: s -> squeeze(-1) -> view(lead + [G]) [-> transpose -> clone -> transpose]
    others = [n for n in s.users if n is not div]
    if len(others) != 1 or not is_op(others[0], aten.squeeze.dim, aten.squeeze.default, aten.view.default,
                                     aten.reshape.default):
        return Miss(f"{short(s)}: the group scales are not returned as [..., {hidden // g}]", s)
    want = list(val(y).shape[:-1]) + [hidden // g]
    views = _view_chain(others[0], want, include_first=True)
    if views is None:
        return Miss(f"{short(others[0])}: group scales are not returned as {want}", others[0])
    nodes += views
    sc = views[-1]
    column_major = False
    if len(sc.users) == 1 and is_op(t1 := next(iter(sc.users)), aten.transpose.int):
        cl = next(iter(t1.users)) if len(t1.users) == 1 else None
        t2 = next(iter(cl.users)) if cl is not None and len(cl.users) == 1 else None
        if is_op(cl, aten.clone.default) and is_op(t2, aten.transpose.int):
            nodes += [t1, cl, t2]
            sc, column_major = t2, True
    inside = set(nodes)
    leak = _sole_users([n for n in nodes if n not in (q, sc)], inside)
    if leak is not None:
        return Miss(f"{short(leak)} of the per-group quant has a user outside it", leak)
    params = {"group_size": g, "ue8m0": ue8m0, "column_major": column_major, "amax_eps": 0.0,
              "scale_min": float(scale_min), "fp8_dtype": fp8}
    return Quant("fp8_per_group", params, tuple(nodes), {"q": q, "scales": sc})


# -------------------------------------------------------------------- vLLM custom ops


def _af_target(node: Node) -> str | None:
    if node.op == "call_function" and getattr(node.target, "__name__", "") == "auto_functionalized_v2":
        return "v2"
    if node.op != "call_function" or getattr(node.target, "__name__", "") != AUTO_FUNCTIONALIZED:
        return None
    return fx_util.op_name(node.args[0])


def _custom_op(y: Node, u: Node) -> Quant | Miss | None:
    """``auto_functionalized(_C.<quant>, input=y, ...)`` -> getitem 1 (q) [, 2 (scale)]."""
    name = _af_target(u)
    if name is None:
        return None
    if name == "v2":
        return Miss(f"{short(u)}: auto_functionalized_v2 quant ops are not matched "
                    "(vLLM disables v2; so does this pass)", u)
    kw = u.kwargs
    if kw.get("input", kw.get("x")) is not y:
        return None
    items = _getitems(u)
    if isinstance(items, Miss):
        return items
    nodes = (u, *items.values())
    if name == C_STATIC:
        gs = kw.get("group_shape")
        if gs not in (None, [-1, -1], (-1, -1)):
            return Miss(f"{short(u)}: static FP8 with group shape {gs} (only per-tensor fuses)", u)
        static = _static_scale(kw["scale"], y)
        if isinstance(static, Miss):
            return static
        fp8 = dtype_of(kw["result"])
        return Quant("fp8_static", {"scale": static, "fp8_dtype": fp8}, nodes, {"q": items.get(1), "scales": None},
                     ) if 1 in items else Miss(f"{short(u)}: quantized result unused", u)
    if name == C_PER_TOKEN:
        fp8 = dtype_of(kw["result"])
        return Quant("fp8_per_token", {"scale_ub": kw.get("scale_ub"), "fp8_dtype": fp8}, nodes,
                     {"q": items.get(1), "scales": items.get(2)})
    if name == C_PER_TENSOR:
        scale = kw.get("scale")
        shape = list(val(scale).shape) if isinstance(scale, Node) else None
        if shape != [1]:
            return Miss(f"{short(u)}: per-tensor scale buffer of shape {shape}, not the [1] of "
                        "ops.scaled_fp8_quant (the fused op's scale)", u)
        # the kernel does not floor the scale (csrc/quantization/w8a8/fp8/common.cu): scale_min 0
        return Quant("fp8_per_tensor", {"scale_min": 0.0, "fp8_dtype": dtype_of(kw["result"])}, nodes,
                     {"q": items.get(1), "scales": items.get(2)})
    if name == C_PER_GROUP:
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
        return Quant("fp8_per_group", params, nodes, {"q": items.get(1), "scales": items.get(2)})
    if name == C_NVFP4:
        if dtype_of(y) not in variants.BY_KIND["nvfp4"].input_dtypes:
            return Miss(f"{short(u)}: NVFP4 quantizes fp16/bf16, the norm output is {dtype_of(y)}", u)
        sdt = dtype_of(kw["output_scale"])
        params = {"global_scale": kw["input_scale"], "swizzle": bool(kw["is_sf_swizzled_layout"])}
        q = Quant("nvfp4", params, nodes, {"q": items.get(1), "scales": items.get(2)},
                  scale_view=None if sdt == torch.float8_e4m3fn else sdt)
        return q
    return None


def dead_buffers(quant: Quant) -> list[Node]:
    """The ``empty`` output buffers a functionalized custom op wrote into (dead after rewrite)."""
    af = next((n for n in quant.nodes if _af_target(n) not in (None, "v2")), None)
    if af is None:
        return []
    out = []
    for k, n in af.kwargs.items():
        if isinstance(n, Node) and k in ("result", "output_q", "output_s", "output", "output_scale", "out"):
            chain = [n]
            while is_op(chain[-1], aten.permute.default, aten.transpose.int, aten.view.default):
                chain.append(chain[-1].args[0])
            out += chain
    scale = af.kwargs.get("scale")
    if _af_target(af) == C_PER_TENSOR and is_op(scale, aten.empty.memory_format):
        out.append(scale)  # its scale is an output buffer too (static's scale is a parameter)
    return out


# ----------------------------------------------------------------------------- ROCm / XPU


def _aiter_op(y: Node, u: Node) -> Quant | Miss | None:
    """ROCm AITER quant ops, as vLLM registers them (vllm/_aiter_ops.py). Their numerics are
    AITER's kernels'; the fused op on ROCm runs AITER's fused kernel (backends/aiter.py)."""
    if is_named(u, AITER_PER_TOKEN) and _kw(u, "x", 0) is y:
        if _kw(u, "scale", 2) is not None:
            return Miss(f"{short(u)}: per-token quant with a given scale is a static quant", u)
        items = _getitems(u)
        if isinstance(items, Miss):
            return items
        fp8 = _kw(u, "quant_dtype", 1)
        if not _is_fp8(fp8):
            return Miss(f"{short(u)}: quant dtype {fp8} is not FP8", u)
        return Quant("fp8_per_token", {"scale_ub": None, "fp8_dtype": fp8}, (u, *items.values()),
                     {"q": items.get(0), "scales": items.get(1)})
    if is_named(u, AITER_GROUP) and _kw(u, "x", 0) is y:
        g = _kw(u, "group_size", 1)
        if val(y).shape[-1] % g:
            return Miss(f"{short(u)}: group size {g} does not divide hidden {val(y).shape[-1]}", u)
        items = _getitems(u)
        if isinstance(items, Miss):
            return items
        params = {"group_size": g, "ue8m0": False, "column_major": bool(_kw(u, "transpose_scale", 2, False)),
                  "amax_eps": 0.0, "scale_min": 0.0, "fp8_dtype": dtype_of(items[0]) if 0 in items else None}
        return Quant("fp8_per_group", params, (u, *items.values()), {"q": items.get(0), "scales": items.get(1)})
    if _af_target(u) == AITER_PER_TENSOR and u.kwargs.get("x") is y:
        if u.kwargs.get("is_dynamic"):
            return Miss(f"{short(u)}: dynamic per-tensor FP8 through AITER's dynamic_per_tensor_quant is "
                        "not fused: its scale rounding is AITER's, unverified against vLLM's (no ROCm here)", u)
        static = _static_scale(u.kwargs["scale"], y)
        if isinstance(static, Miss):
            return static
        items = _getitems(u)
        if isinstance(items, Miss):
            return items
        return Quant("fp8_static", {"scale": static, "fp8_dtype": dtype_of(u.kwargs["out"])},
                     (u, *items.values()), {"q": items.get(1), "scales": None, "scale_alias": items.get(2)})
    return None


__all__ = ["Quant", "VARIANTS", "find", "dead_buffers"]
