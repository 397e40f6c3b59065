"""FP8 quantization with one scale per tensor or per token: static (a model parameter),
dynamic per tensor and dynamic per token, in every spelling of that kind.

* the native aten chains, as ``QuantFP8.forward_native`` (vLLM with ``custom_ops=none``)
  and hand-written PyTorch emit them: ``convert(f32) * reciprocal(scale)`` (or ``/ scale``)
  ``-> clamp(+-fp8_max) -> convert(fp8)``, with ``abs -> amax`` for dynamic per-token
  scales and ``abs -> max`` (all elements) for dynamic per-tensor scales;
* vLLM's custom ops through ``auto_functionalized`` (or ``_v2``, the form of a plain
  ``torch.compile``; vLLM's own compile turns v2 off): ``_C.static_scaled_fp8_quant``,
  ``_C.dynamic_scaled_fp8_quant`` (per tensor), ``_C.dynamic_per_token_scaled_fp8_quant``;
* ROCm: ``vllm.rocm_aiter_per_tensor_quant`` (auto_functionalized, static),
  ``vllm.rocm_aiter_per_token_quant`` (vllm/_aiter_ops.py; their numerics are AITER's
  kernels').

Forms and numerics follow vLLM 0.33's own matchers (compilation/passes/fusion/
matcher_utils.py ``MatcherQuantFP8``, rms_quant_fusion.py). The tables at the end give
:func:`fusion_passes.recognize.find_quant` the readers of this kind.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from fusion_passes import epilogue, variants
from fusion_passes.recognize.fx import converts_to, dtype_of, is_op, short, val
from fusion_passes.recognize.inplace import Call, partial_view_miss
from fusion_passes.recognize.quant_read import (arg, c_op, clamp_of, first_leak, getitems, is_fp8, sat_to_fp8,
                                                static_scale)
from fusion_passes.recognize.roles import Miss, Quant

aten = torch.ops.aten

C_STATIC = "_C.static_scaled_fp8_quant.default"
C_PER_TENSOR = "_C.dynamic_scaled_fp8_quant.default"
C_PER_TOKEN = "_C.dynamic_per_token_scaled_fp8_quant.default"
AITER_PER_TENSOR = "vllm.rocm_aiter_per_tensor_quant.default"
AITER_PER_TOKEN = "vllm.rocm_aiter_per_token_quant.default"


# ------------------------------------------------------------------------- native aten


def _f32_view(y: Node, x: Node) -> tuple[Node, list[Node]] | None:
    """*x* is ``y`` upcast to fp32: ``(x, [x])``."""
    if converts_to(x, torch.float32) and x.args[0] is y:
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
        sat = sat_to_fp8(m)
        if isinstance(sat, Miss):
            return sat
        q, fp8, tail = sat
        token = _dynamic_scale(y, s, fp8)
        if isinstance(token, tuple):
            kind, scale_nodes, scale_ub = token
            nodes = [*pre, *recip, m, *tail, *scale_nodes]
            inside = set(nodes)
            leak = first_leak([n for n in nodes if n not in (q, s)], inside)
            what = "per-token" if kind == "fp8_per_token" else "per-tensor"
            if leak is not None:
                return Miss(f"{short(leak)} of the {what} quant has a user outside it", leak)
            params = {"scale_ub": scale_ub} if kind == "fp8_per_token" else {"scale_min": variants.SCALE_MIN_NATIVE}
            return Quant(kind, {**params, "fp8_dtype": fp8}, tuple(nodes), {"q": q, "scales": s})
        static = static_scale(s, y)
        if isinstance(static, Miss):
            return token if isinstance(token, Miss) and token.node is not None else static
        nodes = [*pre, *recip, m, *tail]
        leak = first_leak([n for n in nodes if n is not q], set(nodes))
        if leak is not None:
            return Miss(f"{short(leak)} of the static quant has a user outside it", leak)
        return Quant("fp8_static", {"scale": static, "fp8_dtype": fp8}, tuple(nodes), {"q": q, "scales": None})
    return None


def _dynamic_scale(y: Node, s: Node, fp8) -> tuple[str, list[Node], Node | None] | Miss | None:
    """``clamp_min(div(convert(unsqueeze(amax(abs(y), [-1]))) [min ub], fp8_max), 1/(fp8_max*512))``
    (per token) or the same over ``max(abs(y))`` of all elements (per tensor; no upper
    bound: vLLM's ``QuantFP8`` allows ``scale_ub`` only per token) ->
    ``(kind, nodes, scale_ub)``."""
    c = clamp_of(s)
    if c is None:
        return None
    d, lo, hi = c
    if hi is not None or lo != epilogue.fp8_min_scaling_factor(fp8):
        return Miss(f"{short(s)} floors the scale at {lo}, not 1/(fp8_max*512)", s)
    if not (is_op(d, aten.div.Tensor) and d.args[1] == epilogue.fp8_max(fp8)):
        return Miss(f"{short(d)} does not divide the amax by {epilogue.fp8_max(fp8)}", d)
    nodes, cur, scale_ub = [s, d], d.args[0], None
    ub = clamp_of(cur) if is_op(cur, aten.clamp.Tensor, aten.clamp_max.Tensor) else None
    if is_op(cur, aten.clamp.Tensor) and arg(cur, "min", 1) is None:
        scale_ub, nodes, cur = arg(cur, "max", 2), nodes + [cur], cur.args[0]
    elif is_op(cur, aten.clamp_max.Tensor, aten.minimum.default):
        scale_ub, nodes, cur = cur.args[1], nodes + [cur], cur.args[0]
    del ub
    if converts_to(cur, torch.float32):
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


# ------------------------------------------------------------- vLLM _C ops, ROCm AITER


def _c_static(y: Node, u: Node, items: dict[int, Node], kw: dict) -> Quant | Miss:
    gs = kw.get("group_shape")
    if gs not in (None, [-1, -1], (-1, -1)):
        return Miss(f"{short(u)}: static FP8 with group shape {gs} (only per-tensor fuses)", u)
    static = static_scale(kw["scale"], y)
    if isinstance(static, Miss):
        return static
    fp8 = dtype_of(kw["result"])
    return Quant("fp8_static", {"scale": static, "fp8_dtype": fp8}, (u, *items.values()),
                 {"q": items.get(1), "scales": None},
                 ) if 1 in items else Miss(f"{short(u)}: quantized result unused", u)


def _c_per_token(y: Node, u: Node, items: dict[int, Node], kw: dict) -> Quant:
    fp8 = dtype_of(kw["result"])
    return Quant("fp8_per_token", {"scale_ub": kw.get("scale_ub"), "fp8_dtype": fp8}, (u, *items.values()),
                 {"q": items.get(1), "scales": items.get(2)})


def _c_per_tensor(y: Node, u: Node, items: dict[int, Node], kw: dict) -> Quant | Miss:
    scale = kw.get("scale")
    shape = list(val(scale).shape) if isinstance(scale, Node) else None
    if shape != [1]:
        return Miss(f"{short(u)}: per-tensor scale buffer of shape {shape}, not the [1] of "
                    "ops.scaled_fp8_quant (the fused op's scale)", u)
    # the kernel does not floor the scale (csrc/quantization/w8a8/fp8/common.cu): scale_min 0
    return Quant("fp8_per_tensor", {"scale_min": 0.0, "fp8_dtype": dtype_of(kw["result"])}, (u, *items.values()),
                 {"q": items.get(1), "scales": items.get(2)})


def _aiter_per_token(y: Node, u: Node) -> Quant | Miss | None:
    """``vllm.rocm_aiter_per_token_quant(x, quant_dtype, scale=None)`` -> (q, scales)."""
    if arg(u, "x", 0) is not y:
        return None
    if arg(u, "scale", 2) is not None:
        return Miss(f"{short(u)}: per-token quant with a given scale is a static quant", u)
    items = getitems(u)
    if isinstance(items, Miss):
        return items
    fp8 = arg(u, "quant_dtype", 1)
    if not is_fp8(fp8):
        return Miss(f"{short(u)}: quant dtype {fp8} is not FP8", u)
    return Quant("fp8_per_token", {"scale_ub": None, "fp8_dtype": fp8}, (u, *items.values()),
                 {"q": items.get(0), "scales": items.get(1)})


def _aiter_per_tensor(y: Node, u: Node, call: Call) -> Quant | Miss | None:
    """``auto_functionalized(vllm.rocm_aiter_per_tensor_quant, x=y, out, scale, is_dynamic=False)``:
    static per-tensor FP8 (AITER's numerics; the fused op on ROCm runs AITER's fused
    kernel, backends/aiter.py)."""
    kw = call.args
    if kw.get("x") is not y:
        return None
    if kw.get("is_dynamic"):
        return Miss(f"{short(u)}: dynamic per-tensor FP8 through AITER's dynamic_per_tensor_quant is "
                    "not fused: its scale rounding is AITER's, unverified against vLLM's (no ROCm here)", u)
    if call.partial_views:
        return partial_view_miss(u, call)
    static = static_scale(kw["scale"], y)
    if isinstance(static, Miss):
        return static
    items = getitems(u)
    if isinstance(items, Miss):
        return items
    at = {here: v1 for v1, here in call.v1_index.items()}
    items = {at[i]: g for i, g in items.items() if i in at}
    return Quant("fp8_static", {"scale": static, "fp8_dtype": dtype_of(kw["out"])},
                 (u, *items.values()), {"q": items.get(1), "scales": None, "scale_alias": items.get(2)})


FUNCTIONALIZED = {C_STATIC: c_op(_c_static), C_PER_TOKEN: c_op(_c_per_token), C_PER_TENSOR: c_op(_c_per_tensor),
                  AITER_PER_TENSOR: _aiter_per_tensor}
"""op called through ``auto_functionalized(_v2)`` -> ``reader(y, u, call)``."""
OPS = {AITER_PER_TOKEN: _aiter_per_token}
"""op called directly -> ``reader(y, u)``."""
NATIVE = (native_static_or_token,)
"""readers of the native aten chains: ``reader(y, u)``."""
