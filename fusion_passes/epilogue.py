"""The math after the all-reduce, in exactly the order of the unfused chain.

This is the oracle: the reference backend runs it after the dialect's own collective
(in the tests, after a simulated cross-rank sum: :func:`fusion_passes.groups.simulated_sum`),
and every kernel backend is tested against it. One function per step so each quant
variant can reuse the norm.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from fusion_passes.variants import (  # the formats' constants, declared with their variants
    MXFP4_BLOCK,
    NVFP4_BLOCK,
    NVFP4_SWIZZLE_COLS,
    NVFP4_SWIZZLE_ROWS,
    fp8_max,
    nvfp4_scale_shape,
)


def add_residual(x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """``x + residual`` in the activation dtype (as ``aten.add`` computes it), or ``x``. An
    fp32 residual (a previous site's unrounded sum, ``carry_fp32``) is added in fp32 and the
    sum rounded to the activation dtype: Inductor's compile of an add whose residual stream
    it recomputes but whose sum it stores (fusion_passes.inductor_store, ``ROUNDED``)."""
    if residual is None:
        return x
    if residual.dtype != x.dtype:
        return sum_fp32(x, residual).to(x.dtype)
    return x + residual


def sum_fp32(x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``x + residual`` added in fp32 and left unrounded (how Inductor computes a low-precision add)."""
    return x.to(torch.float32) + residual.to(torch.float32)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    *,
    gemma: bool = False,
    weight_in_fp32: bool = True,
    out_dtype: torch.dtype | None = None,
    promote_out: bool = False,
    variance_of: torch.Tensor | None = None,
) -> torch.Tensor:
    """RMSNorm over the last dim, computed in fp32 as every real model does.

    ``weight_in_fp32=True``: ``(x32 * rsqrt(mean(x32^2) + eps) * w).to(dtype)``; this is
    ``torch.nn.functional.rms_norm``, vLLM and Gemma's form (Gemma multiplies by ``1 + w``).
    ``weight_in_fp32=False``: ``w * (x32 * rsqrt(...)).to(dtype)``, the Hugging Face
    Llama form, where the weight multiplies after the cast back (result dtype follows
    type promotion of ``w`` and ``x``). ``out_dtype`` (default ``x.dtype``) is the
    activation dtype when ``x`` is an fp32 sum that was never rounded to it.
    ``promote_out``: the result has the promoted dtype of ``w`` and the activations, as the
    Hugging Face form gives, also with ``weight_in_fp32`` (an fp32 weight: the fp32 product,
    never rounded to the activation dtype; what Inductor's compile of that form returns).
    ``variance_of``: the values the mean of squares reads, where they are not ``x`` (the
    unrounded fp32 sum of ``sum_stored``: :func:`add_rms_norm`).
    """
    dtype = out_dtype or x.dtype
    x32 = x.to(torch.float32)
    v32 = x32 if variance_of is None else variance_of.to(torch.float32)
    normed = x32 * torch.rsqrt(v32.pow(2).mean(-1, keepdim=True) + eps)
    if weight is None:
        return normed.to(dtype)
    if gemma:
        return (normed * (1.0 + weight.to(torch.float32))).to(dtype)
    if weight_in_fp32:
        return (normed * weight).to(torch.promote_types(weight.dtype, dtype) if promote_out else dtype)
    return weight * normed.to(dtype)


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    eps: float,
    *,
    gemma: bool = False,
    weight_in_fp32: bool = True,
    residual_in_fp32: bool = False,
    promote_out: bool = False,
    carry_fp32: bool = False,
    quant_unrounded: bool = False,
    sum_stored: bool = False,
    amax_unrounded: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual), x + residual)``: the two values the fused op returns.

    ``residual_in_fp32``: vLLM's ``fused_add_rms_norm`` (vllm/ir/ops/layernorm.py) adds in
    fp32, returns the sum rounded to the activation dtype as the new residual, but
    normalizes the UNROUNDED fp32 sum. Without it the sum is ``aten.add`` in the
    activation dtype and the norm reads that rounded sum (Hugging Face, plain PyTorch).
    ``carry_fp32``: the same, but the sum is returned unrounded in fp32 (the residual may
    be fp32 too): a residual stream that Inductor's compile recomputes in fp32 instead of
    storing it (docs/design.md, "What Inductor keeps unrounded"). ``sum_stored``: the sum
    is added in fp32 and returned rounded; the mean of squares reads the unrounded sum, the
    normalization the rounded one: Inductor's compile where it stores the sum in the loop
    that computes the variance (fusion_passes.inductor_store). ``quant_unrounded`` and
    ``amax_unrounded`` only concern the quant (:func:`quantize`).
    """
    normed, variance_of, summed = _stream(x, residual, residual_in_fp32, carry_fp32, sum_stored)
    return rms_norm(normed, weight, eps, gemma=gemma, weight_in_fp32=weight_in_fp32, out_dtype=x.dtype,
                    promote_out=promote_out, variance_of=variance_of), summed


def norm_unrounded(x, residual, weight, eps, *, gemma=False, weight_in_fp32=True, residual_in_fp32=False,
                   carry_fp32=False, sum_stored=False, **_) -> torch.Tensor:
    """The norm output of :func:`add_rms_norm` before its rounding to the activation dtype
    (fp32): what an FP8 quant fused with the norm by Inductor reads (``quant_unrounded``;
    its amax alone with ``amax_unrounded``)."""
    normed, variance_of, _ = _stream(x, residual, residual_in_fp32, carry_fp32, sum_stored)
    return rms_norm(normed, weight, eps, gemma=gemma, weight_in_fp32=weight_in_fp32, out_dtype=torch.float32,
                    variance_of=variance_of)


def _stream(x, residual, residual_in_fp32: bool, carry_fp32: bool, sum_stored: bool):
    """``(what the norm normalizes, what its mean of squares reads where that differs (or
    None), the residual output)`` under :func:`add_rms_norm`'s flags."""
    if residual is None:
        return x, None, x
    if sum_stored:
        summed32 = sum_fp32(x, residual)
        rounded = summed32.to(x.dtype)
        return rounded, summed32, rounded
    if residual_in_fp32 or carry_fp32:
        summed32 = sum_fp32(x, residual)
        return summed32, None, summed32 if carry_fp32 else summed32.to(x.dtype)
    summed = add_residual(x, residual)
    return summed, None, summed


# ---------------------------------------------------------------------------------------
# Quantization of the norm output: one function per catalogue family, each in exactly the
# order of the unfused chain that vLLM 0.33 (or plain PyTorch) emits for it. Sources:
# vllm/model_executor/layers/quantization/input_quant_fp8.py (QuantFP8.forward_native and
# _quantize_group_native), csrc/quantization/w8a8/fp8/per_token_group_quant.cu (the custom
# op's eps / UE8M0 handling), utils/nvfp4_emulation_utils.py (ref_nvfp4_quant),
# utils/nvfp4_utils.py (swizzle_blockscale) and utils/mxfp4_utils.py
# (_compute_quant_and_scale, the OCP MX / AITER dynamic_mxfp4_quant rounding).
# ---------------------------------------------------------------------------------------

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)
E2M1_MAX = 6.0  # largest E2M1 magnitude (OCP MX spec; vLLM FLOAT4_E2M1_MAX)
E4M3_MAX = 448.0  # largest finite float8_e4m3fn (torch.finfo)
# FP4 formats (block sizes, the swizzled tile, the activations they take) are declared
# with their variants in fusion_passes.variants.


def fp8_min_scaling_factor(dtype: torch.dtype = torch.float8_e4m3fn) -> float:
    """Smallest dynamic FP8 scale: ``1 / (fp8_max * 512)`` (input_quant_fp8.py)."""
    return 1.0 / (fp8_max(dtype) * 512.0)


def _to_fp8(scaled: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    m = fp8_max(dtype)
    return scaled.clamp(-m, m).to(dtype)


def fp8_static(
    y: torch.Tensor, scale: torch.Tensor, *, dtype: torch.dtype = torch.float8_e4m3fn
) -> torch.Tensor:
    """Static per-tensor FP8: ``clamp(y32 * (1/scale)) -> fp8`` (QuantFP8 static; the
    ``static_scaled_fp8_quant`` kernel multiplies by the inverted scale the same way)."""
    return _to_fp8(y.to(torch.float32) * scale.to(torch.float32).reciprocal(), dtype)


def fp8_per_token(
    y: torch.Tensor,
    scale_ub: torch.Tensor | None = None,
    *,
    dtype: torch.dtype = torch.float8_e4m3fn,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token FP8 -> ``(q, scales[..., 1] fp32)``.

    ``scale = clamp(min(amax(|y|), scale_ub) / fp8_max, min=1/(fp8_max*512))``,
    ``q = clamp(y32 * (1/scale)) -> fp8`` (QuantFP8.forward_native, PER_TOKEN).
    """
    amax = y.abs().amax(dim=-1).unsqueeze(-1).to(torch.float32)
    if scale_ub is not None:
        amax = amax.clamp(max=scale_ub)
    scales = (amax / fp8_max(dtype)).clamp(min=fp8_min_scaling_factor(dtype))
    return _to_fp8(y.to(torch.float32) * scales.reciprocal(), dtype), scales


def fp8_per_group(
    y: torch.Tensor,
    group_size: int,
    ue8m0: bool = False,
    column_major: bool = False,
    *,
    dtype: torch.dtype = torch.float8_e4m3fn,
    amax_eps: float = 0.0,
    scale_min: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token-group FP8 (1 x ``group_size``) -> ``(q, scales[..., H // group_size] fp32)``.

    ``scale = clamp(max(amax_g, amax_eps) / fp8_max, min=scale_min)``, rounded up to a
    power of two when ``ue8m0``; ``q = clamp(y / scale) -> fp8``. The defaults are
    QuantFP8._quantize_group_native (``amax_eps=0``, ``scale_min=1/(fp8_max*512)``); the
    ``_C.per_token_group_fp8_quant`` kernel is ``amax_eps=eps`` (1e-10), ``scale_min=1e-10``
    with UE8M0 else 0. ``column_major``: same values, the scales' token dim contiguous
    (``scales.transpose(-2, -1).contiguous().transpose(-2, -1)``), as DeepGEMM reads them.
    """
    hidden = y.shape[-1]
    if hidden % group_size:
        raise ValueError(f"fusion_passes: hidden {hidden} is not a multiple of group size {group_size}")
    if scale_min is None:
        scale_min = fp8_min_scaling_factor(dtype)
    grouped = y.reshape(-1, hidden // group_size, group_size)
    amax = grouped.abs().amax(dim=-1, keepdim=True).to(torch.float32)
    if amax_eps:
        amax = amax.clamp(min=amax_eps)
    scales = (amax / fp8_max(dtype)).clamp(min=scale_min)
    if ue8m0:
        scales = torch.exp2(torch.ceil(torch.log2(scales)))
    q = _to_fp8(grouped / scales, dtype).reshape(y.shape)
    scales = scales.reshape(y.shape[:-1] + (hidden // group_size,))
    if column_major:
        scales = scales.transpose(-2, -1).contiguous().transpose(-2, -1)
    return q, scales


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """FP4 E2M1 codes (uint8, sign in bit 3) of fp32 ``x``: round to nearest, ties to even,
    saturating at 6; a negative value that rounds to 0 keeps its sign (-0, code 8), as the
    hardware ``cvt.rn.satfinite.e2m1x2`` and vLLM's Triton MX quantizer both produce.
    Magnitudes by code: 0, 0.5, 1, 1.5, 2, 3, 4, 6."""
    a = x.abs()
    # A tie goes to the even code: up at 0.75, 1.75, 3.5; down at 0.25, 1.25, 2.5, 5.
    code = (
        (a > 0.25).to(torch.uint8)
        + (a >= 0.75)
        + (a > 1.25)
        + (a >= 1.75)
        + (a > 2.5)
        + (a >= 3.5)
        + (a > 5.0)
    ).to(torch.uint8)
    return code | (torch.signbit(x).to(torch.uint8) << 3)


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """Two E2M1 codes per byte along the last dim: element ``2i`` low nibble, ``2i+1`` high."""
    pairs = codes.reshape(codes.shape[:-1] + (codes.shape[-1] // 2, 2))
    return pairs[..., 0] | (pairs[..., 1] << 4)


def nvfp4_swizzle(scales: torch.Tensor) -> torch.Tensor:
    """Block scales ``[M, K]`` -> the 128x4-tiled layout ``[round_up(M,128), round_up(K,4)]``
    (zero padded) that CUTLASS/FlashInfer read (vllm nvfp4_utils.swizzle_blockscale)."""
    m, k = scales.shape
    rm, rk = nvfp4_scale_shape(m, k * NVFP4_BLOCK, swizzle=True)
    padded = scales.new_zeros((rm, rk))
    padded[:m, :k] = scales
    tiled = padded.reshape(rm // NVFP4_SWIZZLE_ROWS, 4, 32, rk // NVFP4_SWIZZLE_COLS, NVFP4_SWIZZLE_COLS)
    tiled = tiled.permute(0, 3, 2, 1, 4)
    return tiled.contiguous().reshape(rm, rk)


def nvfp4(
    y: torch.Tensor, global_scale: torch.Tensor, swizzle: bool = True, *, block_scale_min: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """NVFP4 -> ``(packed uint8 [T, H//2], block scales float8_e4m3fn)``; scales are
    ``[T, H//16]`` linear or :func:`nvfp4_swizzle`-d (``swizzle=True``, vLLM's default).

    Per 16-element block (vllm ref_nvfp4_quant, the math of ``_C.scaled_fp4_quant``):
    ``s = fp8(clamp(global_scale * amax / 6, block_scale_min, 448))``,
    ``q = e2m1(clamp(y32 * 1/(s * 1/global_scale), +-6))`` with ``1/0 := 0``.
    ``block_scale_min``: 0 is vLLM's (no floor: an all-zero block has scale 0); torchao's
    ``nvfp4_quantize`` floors the block scale at ``finfo(float8_e4m3fn).tiny``
    (tests/oracles.py, ``TORCHAO_NVFP4_SCALE_FLOOR``).
    """
    hidden = y.shape[-1]
    if hidden % NVFP4_BLOCK:
        raise ValueError(f"fusion_passes: NVFP4 needs hidden % {NVFP4_BLOCK} == 0, got {hidden}")
    x = y.reshape(-1, hidden // NVFP4_BLOCK, NVFP4_BLOCK)
    gs = global_scale.to(torch.float32)
    amax = x.abs().amax(dim=-1, keepdim=True).to(torch.float32)
    s = (gs * (amax * (1.0 / E2M1_MAX))).clamp(block_scale_min, E4M3_MAX).to(torch.float8_e4m3fn)
    s32 = s.to(torch.float32)

    def recip(t: torch.Tensor) -> torch.Tensor:  # vLLM get_reciprocal: 1/(t + (t==0)*1e8)
        return 1.0 / (t + (t == 0) * 1e8)

    scaled = (x.to(torch.float32) * recip(s32 * recip(gs))).clamp(-E2M1_MAX, E2M1_MAX)
    packed = pack_e2m1(e2m1_codes(scaled).reshape(-1, hidden))
    s = s.reshape(-1, hidden // NVFP4_BLOCK)
    return packed, (nvfp4_swizzle(s) if swizzle else s)


def mxfp4(y: torch.Tensor, *, divisor_min: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 -> ``(packed uint8 [T, H//2], E8M0 scales uint8 [T, H//32])``.

    Per 32-element block (OCP MX; vllm mxfp4_utils._compute_quant_and_scale, which says it
    matches AITER's ``dynamic_mxfp4_quant``): round amax's mantissa to nearest
    (``(bits + 0x200000) & 0x7F800000``), ``e = clamp(floor(log2(.)) - 2, +-127)``,
    ``q = e2m1(y32 * 2^-e)``, scale byte ``e + 127``. ``divisor_min``: 0 is vLLM's (a
    block with ``e = -127`` is multiplied by ``2^127``); torchao's ``to_mx`` divides by
    ``max(2^e, 2^-126)`` (tests/oracles.py, ``TORCHAO_MX_DIVISOR_FLOOR``).
    """
    hidden = y.shape[-1]
    if hidden % MXFP4_BLOCK:
        raise ValueError(f"fusion_passes: MXFP4 needs hidden % {MXFP4_BLOCK} == 0, got {hidden}")
    x = y.reshape(-1, hidden // MXFP4_BLOCK, MXFP4_BLOCK).to(torch.float32)
    amax = x.abs().amax(dim=-1, keepdim=True)
    rounded = ((amax.view(torch.int32) + 0x200000) & 0x7F800000).view(torch.float32)
    rounded = rounded + (rounded == 0) * 2.0**-126  # log2(0) guard, as the Triton kernel
    exponent = (torch.floor(torch.log2(rounded)) - 2).clamp(-127, 127)
    dequant = torch.exp2(exponent).clamp(min=divisor_min)  # 2^-127: an fp32 subnormal, biased exponent 0
    quant_scale = torch.where(dequant == 0, 0.0, 1.0 / dequant)
    codes = e2m1_codes(x * quant_scale).reshape(-1, hidden)
    scale_bytes = (exponent + 127).to(torch.uint8).reshape(-1, hidden // MXFP4_BLOCK)
    return pack_e2m1(codes), scale_bytes


def fp8_per_tensor(
    y: torch.Tensor,
    *,
    dtype: torch.dtype = torch.float8_e4m3fn,
    scale_min: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-tensor FP8 -> ``(q, scale[1] fp32)``: ONE scale for the whole tensor.

    ``scale = clamp(max(|y|) / fp8_max, min=scale_min)``, ``q = clamp(y32 * (1/scale)) -> fp8``.
    The default ``scale_min`` is ``1/(fp8_max*512)``: vLLM's
    ``QuantFP8.forward_native`` for ``GroupShape.PER_TENSOR``
    (vllm/model_executor/layers/quantization/input_quant_fp8.py:
    ``x.abs().max().unsqueeze(-1).to(float32)``, ``(x_max / _FP8_MAX).clamp(min=_FP8_MIN_SCALING_FACTOR)``,
    ``x.to(float32) * scale.reciprocal()``, clamp, convert), what Fp8LinearMethod runs for
    a checkpoint with ``activation_scheme: dynamic``. The ``_C.dynamic_scaled_fp8_quant``
    kernel (csrc/quantization/w8a8/fp8/common.cu ``segmented_max_reduction_strided`` +
    ``scaled_fp8_quant_kernel_strided_dynamic``) does not floor the scale: ``scale_min=0``
    (an all-zero tensor then has scale 0 and ``0 * inf``; here that is NaN, while the kernel's
    fminf/fmaxf clamp turns NaN into a bound; no real norm output is all zero).
    The max over every element needs all tokens of the tensor before any is quantized.
    With no element (0 tokens) the max is taken as 0, the identity of a max over ``|y|``:
    the scale is then the floor, and ``q`` is empty.
    """
    if scale_min is None:
        scale_min = fp8_min_scaling_factor(dtype)
    if y.numel() == 0:
        amax = torch.zeros((1,), dtype=torch.float32, device=y.device)
    else:
        amax = y.abs().max().unsqueeze(-1).to(torch.float32)
    scale = (amax / fp8_max(dtype)).clamp(min=scale_min)
    return _to_fp8(y.to(torch.float32) * scale.reciprocal(), dtype), scale


# The quant epilogue of each variant (fusion_passes.variants) on the norm output, from its
# resolved quant arguments (fusion_passes.arguments.resolve): (q, scales | None).
QUANT: dict[str, Callable[[torch.Tensor, Mapping[str, Any]], tuple]] = {
    "add_rmsnorm_fp8_static": lambda y, p: (fp8_static(y, p["scale"], dtype=p["fp8_dtype"]), None),
    "add_rmsnorm_fp8_per_token": lambda y, p: fp8_per_token(y, p["scale_ub"], dtype=p["fp8_dtype"]),
    "add_rmsnorm_fp8_per_group": lambda y, p: fp8_per_group(
        y, p["group_size"], p["ue8m0"], p["column_major"], dtype=p["fp8_dtype"], amax_eps=p["amax_eps"],
        scale_min=p["scale_min"]),
    "add_rmsnorm_fp8_per_tensor": lambda y, p: fp8_per_tensor(y, dtype=p["fp8_dtype"], scale_min=p["scale_min"]),
    "add_rmsnorm_nvfp4": lambda y, p: nvfp4(y, p["global_scale"], p["swizzle"]),
    "add_rmsnorm_mxfp4": lambda y, p: mxfp4(y),
}


def amax_reads_unrounded(device: torch.device | str) -> bool:
    """Whether Inductor's default compile on *device* takes a dynamic FP8 scale's amax from
    the norm value before its rounding (docs/design.md, "What Inductor keeps unrounded").
    Its Triton code (CUDA, and ROCm, which Inductor also compiles to Triton) reduces the
    amax over the fp32 value in registers; its C++ code (CPU) over the value rounded to the
    activation dtype. Measured: the compiled chain's scales equal the rounded value's amax /
    448 in 100% of rows on CPU, 0% on an H100, where the codes from the unrounded amax
    differ from the compile's in 0.011% (against 1.7% from the rounded one)."""
    return torch.device(device).type != "cpu"


def quantize(variant: str, y: torch.Tensor, params: Mapping[str, Any],
             y32: torch.Tensor | None = None, amax_unrounded: bool = False,
             codes_rounded: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The quant epilogue of *variant* on the norm output *y*: ``(q, scales | None)``.
    *y32* (``quant_unrounded``, FP8 variants): the norm value before its rounding, which the
    codes are computed from; the scales stay those of *y* (an amax taken in the activation
    dtype is the rounded amax of the unrounded value: rounding is monotonic), or with
    *amax_unrounded* (:func:`amax_reads_unrounded`) those of *y32*. *codes_rounded* (the
    ``amax_unrounded`` flag: Inductor's Triton compile storing the norm output in the
    amax's loop): the scales from *y32*, the codes from *y* with those scales."""
    if variant not in QUANT:
        raise ValueError(f"fusion_passes: unknown quant variant {variant!r}")
    if codes_rounded:
        if y32 is None or variant not in FP8_CODES or params.get("form"):
            raise ValueError(f"fusion_passes: {variant} has no form with its amax from the unrounded norm value "
                             "(amax_unrounded)")
        _, scales = QUANT[variant](y32, params)
        return FP8_CODES[variant](y, scales, params), scales
    if params.get("form"):  # another project's FP8 convention, recognized by meaning
        from fusion_passes import fp8_forms

        return fp8_forms.variant_quantize(variant, y, params, y32, amax_unrounded)
    if y32 is not None and variant not in FP8_CODES:
        raise ValueError(f"fusion_passes: {variant} has no unrounded-input form (quant_unrounded)")
    if y32 is not None and amax_unrounded and variant != "add_rmsnorm_fp8_static":
        return QUANT[variant](y32, params)  # a dynamic scale: the variant's own order, on the unrounded value
    q, scales = QUANT[variant](y, params)
    if y32 is None:
        return q, scales
    return FP8_CODES[variant](y32, scales, params), scales


# The FP8 codes of the unrounded norm value *y32* with the scales already computed, in the
# order of each variant's function above.
FP8_CODES: dict[str, Callable[[torch.Tensor, torch.Tensor, Mapping[str, Any]], torch.Tensor]] = {
    "add_rmsnorm_fp8_static": lambda y32, s, p: fp8_static(y32, p["scale"], dtype=p["fp8_dtype"]),
    "add_rmsnorm_fp8_per_token": lambda y32, s, p: _to_fp8(y32 * s.reciprocal(), p["fp8_dtype"]),
    "add_rmsnorm_fp8_per_tensor": lambda y32, s, p: _to_fp8(y32 * s.reciprocal(), p["fp8_dtype"]),
    "add_rmsnorm_fp8_per_group": lambda y32, s, p: _to_fp8(
        y32.reshape(-1, y32.shape[-1] // p["group_size"], p["group_size"])
        / s.reshape(-1, y32.shape[-1] // p["group_size"], 1), p["fp8_dtype"]).reshape(y32.shape),
}
