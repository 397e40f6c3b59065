"""Quantization by vLLM's and ROCm's custom ops.

* vLLM's custom ops through ``auto_functionalized`` (or ``_v2``, the form of a plain
  ``torch.compile``; vLLM's own compile turns v2 off): ``_C.static_scaled_fp8_quant``,
  ``_C.dynamic_scaled_fp8_quant`` (per tensor), ``_C.dynamic_per_token_scaled_fp8_quant``,
  ``_C.per_token_group_fp8_quant``, ``_C.scaled_fp4_quant.out``;
* ROCm: ``vllm.rocm_aiter_per_tensor_quant`` (auto_functionalized, static),
  ``vllm.rocm_aiter_per_token_quant``, ``vllm.rocm_aiter_group_fp8_quant``.

Forms follow vLLM 0.33's own matchers (compilation/passes/fusion/rms_quant_fusion.py).
"""

from __future__ import annotations

import torch
from torch.fx import Node

from fusion_passes import epilogue, variants
from fusion_passes.recognize.inplace import functionalized_call, partial_view_miss
from fusion_passes.recognize.quant_read import Quant, arg, getitems, is_fp8, static_scale
from fusion_passes.recognize.aten import Miss, dtype_of, is_named, is_op, short, val

aten = torch.ops.aten

C_STATIC = "_C.static_scaled_fp8_quant.default"
C_PER_TENSOR = "_C.dynamic_scaled_fp8_quant.default"
C_PER_TOKEN = "_C.dynamic_per_token_scaled_fp8_quant.default"
C_PER_GROUP = "_C.per_token_group_fp8_quant.default"
C_NVFP4 = "_C.scaled_fp4_quant.out"
AITER_PER_TENSOR = "vllm.rocm_aiter_per_tensor_quant.default"
AITER_PER_TOKEN = "vllm.rocm_aiter_per_token_quant.default"
AITER_GROUP = "vllm.rocm_aiter_group_fp8_quant.default"


def _af_target(node: Node) -> str | None:
    """The qualified name of the op an ``auto_functionalized(_v2)`` node calls, else None."""
    call = functionalized_call(node)
    return call.name if call is not None else None


def custom_op(y: Node, u: Node) -> Quant | Miss | None:
    """``auto_functionalized(_C.<quant>, input=y, ...)`` -> getitem 1 (q) [, 2 (scale)];
    ``auto_functionalized_v2`` alike, its getitems renumbered as v1's
    (:func:`fusion_passes.recognize.inplace.functionalized_call`)."""
    call = functionalized_call(u)
    if call is None or call.name not in _C_OPS:
        return None
    kw = call.args
    if kw.get("input", kw.get("x")) is not y:
        return None
    if call.partial_views:
        return partial_view_miss(u, call)
    items = getitems(u)
    if isinstance(items, Miss):
        return items
    at = {here: v1 for v1, here in call.v1_index.items()}
    return _C_OPS[call.name](y, u, {at[i]: g for i, g in items.items() if i in at}, kw)


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


def _c_nvfp4(y: Node, u: Node, items: dict[int, Node], kw: dict) -> Quant | Miss:
    if dtype_of(y) not in variants.BY_KIND["nvfp4"].input_dtypes:
        return Miss(f"{short(u)}: NVFP4 quantizes fp16/bf16, the norm output is {dtype_of(y)}", u)
    sdt = dtype_of(kw["output_scale"])
    params = {"global_scale": kw["input_scale"], "swizzle": bool(kw["is_sf_swizzled_layout"])}
    return Quant("nvfp4", params, (u, *items.values()), {"q": items.get(1), "scales": items.get(2)},
                 scale_view=None if sdt == torch.float8_e4m3fn else sdt)


_C_OPS = {C_STATIC: _c_static, C_PER_TOKEN: _c_per_token, C_PER_TENSOR: _c_per_tensor, C_PER_GROUP: _c_per_group,
          C_NVFP4: _c_nvfp4}


def dead_buffers(quant: Quant) -> list[Node]:
    """The ``empty`` output buffers a functionalized custom op wrote into (dead after rewrite)."""
    calls = [c for n in quant.nodes if (c := functionalized_call(n)) is not None]
    if not calls:
        return []
    call = calls[0]
    out = []
    for k, n in call.args.items():
        if isinstance(n, Node) and k in ("result", "output_q", "output_s", "output", "output_scale", "out"):
            chain = [n]
            while is_op(chain[-1], aten.permute.default, aten.transpose.int, aten.view.default):
                chain.append(chain[-1].args[0])
            out += chain
    scale = call.args.get("scale")
    if call.name == C_PER_TENSOR and is_op(scale, aten.empty.memory_format):
        out.append(scale)  # its scale is an output buffer too (static's scale is a parameter)
    return out


def aiter_op(y: Node, u: Node) -> Quant | Miss | None:
    """ROCm AITER quant ops, as vLLM registers them (vllm/_aiter_ops.py). Their numerics are
    AITER's kernels'; the fused op on ROCm runs AITER's fused kernel (backends/aiter.py)."""
    if is_named(u, AITER_PER_TOKEN) and arg(u, "x", 0) is y:
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
    if is_named(u, AITER_GROUP) and arg(u, "x", 0) is y:
        g = arg(u, "group_size", 1)
        if val(y).shape[-1] % g:
            return Miss(f"{short(u)}: group size {g} does not divide hidden {val(y).shape[-1]}", u)
        items = getitems(u)
        if isinstance(items, Miss):
            return items
        params = {"group_size": g, "ue8m0": False, "column_major": bool(arg(u, "transpose_scale", 2, False)),
                  "amax_eps": 0.0, "scale_min": 0.0, "fp8_dtype": dtype_of(items[0]) if 0 in items else None}
        return Quant("fp8_per_group", params, (u, *items.values()), {"q": items.get(0), "scales": items.get(1)})
    call = functionalized_call(u)
    if call is not None and call.name == AITER_PER_TENSOR and call.args.get("x") is y:
        return _aiter_per_tensor(y, u, call)
    return None


def _aiter_per_tensor(y: Node, u: Node, call) -> Quant | Miss:
    kw = call.args
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


__all__ = ["custom_op", "aiter_op", "dead_buffers"]
