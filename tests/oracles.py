"""Independent references for the quant epilogues: code we did not write, called, not copied.

Each function here runs a third-party implementation on a norm output ``y`` and returns
its result in the layout of :mod:`fusion_passes.epilogue` (so a test compares bytes):

* vLLM 0.33's own torch paths: ``QuantFP8.forward_native`` / ``_quantize_group_native``
  (vllm/model_executor/layers/quantization/input_quant_fp8.py), ``ref_nvfp4_quant``
  (utils/nvfp4_emulation_utils.py), ``swizzle_blockscale`` (utils/nvfp4_utils.py); its
  MXFP4 Triton kernel (utils/mxfp4_utils.py ``downcast_to_mxfp``) runs in
  :mod:`tests.oracle_mxfp4_interpreter` (Triton's CPU interpreter, its own process).
* torchao 0.18 (``dev`` extra): ``_choose_scale_float8`` + ``_quantize_affine_float8``
  (torchao/quantization/quant_primitives.py), ``to_mx`` (prototype/mx_formats/mx_tensor.py),
  ``nvfp4_quantize`` (prototype/mx_formats/nvfp4_tensor.py), ``to_blocked``
  (prototype/mx_formats/utils.py).

Where their conventions differ from ours, :data:`CONVENTIONS` names the difference and
its source; tests/test_oracles.py shows each difference exists on some input and that the
named flag (an argument of our epilogue, or a bound on the inputs) reproduces the oracle.
The GPU check (tests/gpu/triton_check.py) uses the same functions. Every importer of a
third-party module here raises ``ModuleNotFoundError`` when it is missing; callers skip on
exactly that.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os

import torch

from fusion_passes import epilogue

FP8 = torch.float8_e4m3fn


@dataclasses.dataclass(frozen=True)
class Convention:
    """One way a third-party reference computes differently from ours, and how to match it."""

    name: str
    theirs: str  # what the third-party code does (file and expression)
    ours: str  # what fusion_passes.epilogue does by default
    match: str  # the flag or input bound under which both compute the same


# The number each flag takes, read from the third party where it exports it.
VLLM_NATIVE_SCALE_FLOOR = epilogue.fp8_min_scaling_factor()  # input_quant_fp8.py _FP8_MIN_SCALING_FACTOR
# torchao clamps amax (hp_value_lb) before ``/ fp8_max``; 1/512 gives vLLM's scale floor
# exactly: fl(2^-9 / 448) == fl(1 / (448 * 512)) (a power-of-two factor is exact).
TORCHAO_LB_FOR_VLLM_FLOOR = 1.0 / 512.0
TORCHAO_NVFP4_SCALE_FLOOR = torch.finfo(torch.float8_e4m3fn).tiny  # nvfp4_tensor.py E4M3_EPS
TORCHAO_MX_DIVISOR_FLOOR = 2.0**-126  # mx_formats/constants.py F32_MIN_NORMAL
E8M0_MIN = 2.0**-127  # smallest E8M0 scale (OCP MX spec: biased exponent 0)
# An MX block whose amax rounds (mantissa, nearest) to 2^128 = inf: 1.75 * 2^127 and up.
MX_AMAX_ROUNDS_TO_INF = 1.75 * 2.0**127

CONVENTIONS = {c.name: c for c in (
    Convention(
        "fp8_scale_applied_by_division",
        "torchao quant_primitives._quantize_affine_float8: tensor_fp32 / scale (every granularity)",
        "vLLM QuantFP8.forward_native per token / per tensor / static: x32 * scale.reciprocal()",
        "our per-group path, which divides as _quantize_group_native does, with one group per "
        "row (per token) or per tensor (epilogue.fp8_per_group)"),
    Convention(
        "fp8_scale_floor",
        "torchao _choose_scale_float8: no floor unless hp_value_lb (an all-zero row: scale 0, q NaN)",
        "vLLM native: scale >= 1/(fp8_max*512) (input_quant_fp8.py _FP8_MIN_SCALING_FACTOR)",
        "hp_value_lb = TORCHAO_LB_FOR_VLLM_FLOOR"),
    Convention(
        "fp8_group_kernel_floors",
        "vLLM _C.per_token_group_fp8_quant (csrc/quantization/w8a8/fp8/per_token_group_quant.cu "
        "ComputeGroupScale): absmax starts at eps=1e-10; UE8M0: scale >= 1e-10 before ceil-pow2",
        "the fused op's default (variants.KERNEL_GROUP_EPS, variants.SCALE_MIN_KERNEL)",
        "amax_eps=0, scale_min=VLLM_NATIVE_SCALE_FLOOR reproduce QuantFP8._quantize_group_native"),
    Convention(
        "ue8m0_exponent_range",
        "torchao to_mx RCEIL (mx_tensor._to_mx_rceil): the exponent clamped to >= -127, and a "
        "byte-0 scale (2^-127) multiplies the data by 1.0",
        "scale = 2^ceil(log2(max(amax/fp8_max, scale_min))), an fp32 power of two (subnormal too)",
        "groups with amax/fp8_max > E8M0_MIN (any group of a norm output; the kernel floors at 1e-10)"),
    Convention(
        "nvfp4_block_scale_floor",
        "torchao nvfp4_quantize: block scale clamped to [E4M3_EPS, 448] before e4m3",
        "vLLM ref_nvfp4_quant: clamp(+-448), no floor (an all-zero block: scale byte 0)",
        "epilogue.nvfp4(block_scale_min=TORCHAO_NVFP4_SCALE_FLOOR)"),
    Convention(
        "nvfp4_per_tensor_scale_inverse",
        "torchao nvfp4_quantize takes per_tensor_scale = amax/(448*6) and DIVIDES by it",
        "vLLM's global_scale = 448*6/amax, MULTIPLIED (ref_nvfp4_quant, scaled_fp4_quant)",
        "a power-of-two global scale (its reciprocal is exact); both also round amax/6 vs "
        "amax*(1/6) differently, which cannot move an e4m3 scale for 16-bit inputs"),
    Convention(
        "e2m1_exact_negative_zero",
        "vLLM nvfp4_emulation_utils.cast_to_fp4: x * torch.sign(x), so a scaled value of exactly "
        "-0.0 (a -0.0 input, or an underflow) gives +0 (a negative that rounds to 0 gives -0)",
        "the sign bit is kept (code 8), as torchao f32_to_f4_unpacked and vLLM's MXFP4 Triton "
        "kernel (mxfp4_utils._compute_quant_and_scale) do",
        "signs compared where vLLM's scaled value is not +-0.0 (vllm_nvfp4_scaled)"),
    Convention(
        "mx_divisor_floor",
        "torchao to_mx: data_hp / max(2^e, F32_MIN_NORMAL)",
        "vLLM _compute_quant_and_scale: data * (1 / 2^e), 2^-127 included",
        "epilogue.mxfp4(divisor_min=TORCHAO_MX_DIVISOR_FLOOR)"),
    Convention(
        "mx_amax_rounding_to_inf",
        "torchao to_mx EVEN: the exponent read from the bits of the rounded amax (inf -> 128)",
        "vLLM: floor(log2(rounded amax)) clamped to 127 (inf -> 127)",
        "block amax < MX_AMAX_ROUNDS_TO_INF (bf16 only; fp16 cannot reach it)"),
)}


@functools.lru_cache(maxsize=None)
def _quant_fp8_layer(static: bool, group: int | None, *, ue8m0: bool = False, column_major: bool = False):
    """vLLM's QuantFP8 (native forward): group None = per token, 0 = per tensor."""
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.quantization.input_quant_fp8 import QuantFP8
    from vllm.model_executor.layers.quantization.utils.quant_utils import GroupShape

    shape = GroupShape.PER_TOKEN if group is None else GroupShape.PER_TENSOR if group == 0 else GroupShape(1, group)
    with set_current_vllm_config(VllmConfig()):
        return QuantFP8(static, shape, column_major_scales=column_major, use_ue8m0=ue8m0, compile_native=False)


def _flat(y: torch.Tensor) -> torch.Tensor:
    """[..., H] -> [T, H]: QuantFP8's per-token and static paths broadcast over 2-D activations."""
    return y.reshape(-1, y.shape[-1])


def vllm_fp8_static(y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """QuantFP8(static, per tensor).forward_native -> q."""
    return _quant_fp8_layer(True, 0).forward_native(_flat(y), scale)[0].reshape(y.shape)


def vllm_fp8_per_token(y: torch.Tensor, scale_ub: torch.Tensor | None = None):
    """QuantFP8(dynamic, per token).forward_native -> (q, scales[..., 1])."""
    q, s = _quant_fp8_layer(False, None).forward_native(_flat(y), scale_ub=scale_ub)
    return q.reshape(y.shape), s.reshape(*y.shape[:-1], 1)


def vllm_fp8_per_tensor(y: torch.Tensor):
    """QuantFP8(dynamic, per tensor).forward_native -> (q, scale[1])."""
    q, s = _quant_fp8_layer(False, 0).forward_native(_flat(y))
    return q.reshape(y.shape), s


def vllm_fp8_per_group(y: torch.Tensor, group_size: int, ue8m0: bool = False, column_major: bool = False):
    """QuantFP8(dynamic, 1 x group_size)._quantize_group_native -> (q, scales)."""
    return _quant_fp8_layer(False, group_size, ue8m0=ue8m0, column_major=column_major).forward_native(y)


def vllm_nvfp4_linear(y: torch.Tensor, global_scale: torch.Tensor):
    """vLLM ref_nvfp4_quant -> (dequantized E2M1 values fp32 [T, H], block scales fp32 [T, H//16])."""
    from vllm.model_executor.layers.quantization.utils.nvfp4_emulation_utils import ref_nvfp4_quant

    return ref_nvfp4_quant(y.reshape(-1, y.shape[-1]), global_scale.float(), epilogue.NVFP4_BLOCK)


def vllm_nvfp4_scaled(y: torch.Tensor, global_scale: torch.Tensor, block_scales: torch.Tensor) -> torch.Tensor:
    """The fp32 values ref_nvfp4_quant hands to cast_to_fp4, from its own get_reciprocal."""
    from vllm.model_executor.layers.quantization.utils.nvfp4_emulation_utils import get_reciprocal

    x = y.reshape(-1, y.shape[-1] // epilogue.NVFP4_BLOCK, epilogue.NVFP4_BLOCK).float()
    scale = get_reciprocal(block_scales.unsqueeze(-1) * get_reciprocal(global_scale.float()))
    return (x * scale).reshape(-1, y.shape[-1])


@contextlib.contextmanager
def _cuda_is_identity():
    """vLLM's swizzle_blockscale ends in ``.cuda()`` (it targets a GPU kernel); on a CPU-only
    host that call is the only thing that cannot run, so it returns the tensor unchanged."""
    if torch.cuda.is_available():
        yield
        return
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def vllm_swizzle(scales: torch.Tensor) -> torch.Tensor:
    """vLLM swizzle_blockscale on float8_e4m3fn block scales [M, K] (result on scales' device)."""
    from vllm.model_executor.layers.quantization.utils.nvfp4_utils import swizzle_blockscale

    with _cuda_is_identity():
        return swizzle_blockscale(scales).to(scales.device)


def torchao_swizzle(scales: torch.Tensor) -> torch.Tensor:
    """torchao to_blocked (cuBLAS block-scaling-factor layout) reshaped to [round128(M), round4(K)]."""
    from torchao.prototype.mx_formats.utils import to_blocked

    m, k = scales.shape
    rows, cols = -(-m // 128) * 128, -(-k // 4) * 4
    return to_blocked(scales.view(torch.uint8)).view(rows, cols).view(scales.dtype)


def torchao_fp8(y: torch.Tensor, block: list[int], hp_value_lb: float | None = TORCHAO_LB_FOR_VLLM_FLOOR):
    """torchao's blockwise float8: ``(q, scales)``; ``block`` [1, G] per group, [1, H] per
    token, ``list(y.shape)`` per tensor. ``y`` goes in as fp32 (exact for 16-bit values):
    given bf16, torchao would divide a bf16 amax by fp8_max in bf16."""
    from torchao.quantization.quant_primitives import _choose_scale_float8, _quantize_affine_float8

    x = y.float()
    scale = _choose_scale_float8(x, block, FP8, hp_value_lb=hp_value_lb)
    return _quantize_affine_float8(x, scale, FP8), scale


def torchao_mx(y: torch.Tensor, elem_dtype: torch.dtype, block: int, mode: str):
    """torchao to_mx: ``(data, biased E8M0 scale bytes uint8)``; mode "even" / "rceil".
    FP4 data comes back packed (two E2M1 codes per byte, element 2i in the low nibble)."""
    from torchao.prototype.mx_formats.config import ScaleCalculationMode
    from torchao.prototype.mx_formats.mx_tensor import to_mx

    scale, data = to_mx(y.float().contiguous(), elem_dtype, block, ScaleCalculationMode(mode))
    return data, scale.view(torch.uint8)


def torchao_nvfp4(y: torch.Tensor, global_scale: torch.Tensor):
    """torchao nvfp4_quantize with ``per_tensor_scale = 1 / global_scale`` -> (packed, scales e4m3 [T, H//16])."""
    from torchao.prototype.mx_formats.nvfp4_tensor import nvfp4_quantize

    x = y.float().reshape(-1, y.shape[-1]).contiguous()
    scales, packed = nvfp4_quantize(x, epilogue.NVFP4_BLOCK, per_tensor_scale=1.0 / global_scale.float())
    return packed.view(torch.uint8), scales


def e2m1_values(packed: torch.Tensor) -> torch.Tensor:
    """Packed E2M1 bytes -> fp32 values (``-0.0`` for code 8), two per byte, low nibble first."""
    codes = torch.stack([packed & 15, packed >> 4], -1).reshape(*packed.shape[:-1], -1).long()
    magnitude = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], device=packed.device)[codes & 7]
    return torch.where(codes >= 8, -magnitude, magnitude)


# ------------------------------------------------------------------------------------------
# The fused ops' quant, from the oracles: what tests/gpu/triton_check.py compares a kernel
# with, given the kernel's own norm output. Each reproduces the op's DEFAULT conventions
# (the kernel floors of per-group FP8, vLLM's E2M1 -0) through the flags above.
# ------------------------------------------------------------------------------------------
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def _fp8_group(y, group_size, ue8m0, column_major):
    from fusion_passes.variants import KERNEL_GROUP_EPS

    lead = [1] * (y.dim() - 1)
    if ue8m0:  # the kernel's 1e-10 floor never binds on a norm output (amax / 448 >= 1e-10)
        data, exps = torchao_mx(y, FP8, group_size, "rceil")
        return data.reshape(y.shape), torch.exp2(exps.float() - 127).reshape(*y.shape[:-1], -1)
    q, s = torchao_fp8(y, lead + [group_size], hp_value_lb=KERNEL_GROUP_EPS)  # max(amax, eps) / 448
    return q, s.reshape(*y.shape[:-1], -1)


def _nvfp4(y, global_scale, swizzle=True):
    values, scales = vllm_nvfp4_linear(y, global_scale.cpu())
    scaled = vllm_nvfp4_scaled(y, global_scale.cpu(), scales)
    magnitude = torch.searchsorted(torch.tensor(_E2M1), values.abs()).to(torch.uint8)
    # CONVENTIONS "e2m1_exact_negative_zero": our sign bit is the scaled value's, -0.0 included
    codes = magnitude | (torch.where(values == 0, scaled.signbit(), values.signbit()).to(torch.uint8) << 3)
    packed = epilogue.pack_e2m1(codes)
    block = scales.to(torch.float8_e4m3fn)
    return packed, vllm_swizzle(block) if swizzle else block


def _mxfp4(y):
    try:
        from vllm.model_executor.layers.quantization.utils.mxfp4_utils import downcast_to_mxfp

        if y.is_cuda:  # vLLM's own Triton kernel, natively
            q, s, _ = downcast_to_mxfp(y.reshape(-1, y.shape[-1]).contiguous(), -1)
            return q.cpu(), s.cpu(), "vLLM mxfp4_utils.downcast_to_mxfp (its Triton kernel, on the GPU)"
    except ModuleNotFoundError as e:
        if e.name.split(".")[0] != "vllm":
            raise
    y = y.cpu()
    data, exps = torchao_mx(y, torch.float4_e2m1fn_x2, 32, "even")
    amax = y.float().reshape(-1, y.shape[-1] // 32, 32).abs().amax(-1)
    # CONVENTIONS "mx_divisor_floor" / "mx_amax_rounding_to_inf": equal unless a non-zero
    # block has scale byte 0 (amax below about 2^-125) or an amax that rounds to inf
    in_domain = ((exps.reshape(amax.shape) > 0) | (amax == 0)) & (amax < MX_AMAX_ROUNDS_TO_INF)
    assert in_domain.all(), "outside the domain where torchao's MX conventions equal vLLM's (CONVENTIONS)"
    return data.reshape(-1, y.shape[-1] // 2), exps.reshape(-1, y.shape[-1] // 32), "torchao to_mx EVEN"


ORACLE = {
    "add_rmsnorm_fp8_static": ("vLLM QuantFP8.forward_native (static)",
                               lambda y, scale: (vllm_fp8_static(y, scale.cpu()), None)),
    "add_rmsnorm_fp8_per_token": ("vLLM QuantFP8.forward_native (per token)",
                                  lambda y, ub=None: vllm_fp8_per_token(y, None if ub is None else ub.to(y.device))),
    "add_rmsnorm_fp8_per_group": ("torchao blockwise float8 / to_mx RCEIL", _fp8_group),
    "add_rmsnorm_nvfp4": ("vLLM ref_nvfp4_quant + swizzle_blockscale", _nvfp4),
    "add_rmsnorm_mxfp4": ("", _mxfp4),  # names the one it ran
}


# The oracles run where the norm output is, not on the CPU: vLLM's per-token QuantFP8 as it runs on a
# GPU (its amax / 448 a multiply by 1 / 448 there; triton_kernels._fp8_per_token follows it), and vLLM's
# own MXFP4 Triton kernel, which needs one.
ON_DEVICE = frozenset({"add_rmsnorm_fp8_per_token", "add_rmsnorm_mxfp4"})


def quant_params(spec, *params, **opts) -> dict:
    """A variant's resolved quant arguments from a case's positional parameters (its
    non-option quant arguments in schema order, ``Variant.positional``) and option keywords
    (None: the default): the form the GPU check and these tests write their cases in."""
    from fusion_passes.arguments import resolve

    a = {q.name: q.default for q in spec.quant}
    a.update(zip(spec.positional, params))
    a.update({k: v for k, v in opts.items() if v is not None})
    return resolve(spec, a)


def fused_args(spec, x, res, w, eps, group, gemma, w_fp32, *params, with_norm_out=False, residual_in_fp32=False,
               **flags):
    """The :class:`~fusion_passes.variants.FusedArgs` of one GPU-check case, bound as the op
    binds; *flags*: other norm flags (``sum_stored``, ...)."""
    from fusion_passes import arguments

    a = dict(zip(("input", "residual", "weight", "eps", "group", "gemma", "weight_in_fp32"),
                 (x, res, w, eps, group, gemma, w_fp32)))
    a.update(zip(spec.positional, params))
    a["residual_in_fp32"] = residual_in_fp32
    a.update(flags)
    if spec.kind is not None:
        a["return_norm"] = bool(with_norm_out)
    a = arguments.bind(spec, (), a)
    return arguments.fused_args(spec, a, arguments.resolve(spec, a))


def oracle_quant(variant: str, y: torch.Tensor, params: tuple):
    """``(q, scales | None, source)`` on the CPU: *variant*'s quant of the norm output *y*
    (on any device) with the op's default conventions, from a third party. Where neither
    vLLM nor torchao imports, :mod:`fusion_passes.epilogue` (checked against both by
    tests/test_oracles.py) answers, and ``source`` says so."""
    from fusion_passes import variants

    source, fn = ORACLE[variant]
    try:
        q, s, *named = fn(y if variant in ON_DEVICE else y.cpu(), *params)
        return q.cpu(), None if s is None else s.cpu(), named[0] if named else source
    except ModuleNotFoundError as e:
        if e.name.split(".")[0] not in ("vllm", "torchao"):
            raise
        # where the oracle runs: on CUDA, torch divides by a CPU scalar as a multiply by its reciprocal
        # (aten BinaryDivTrueKernel.cu, "may lose one bit"), so amax / 448 can be one ulp off the true
        # quotient. On the CPU for torchao's per-group (on 1x H100 without torchao, 1 to 6485 per-group
        # codes differed from the kernel's, which divides correctly: session 12); on the GPU for vLLM's
        # per-token, whose CUDA form the kernel follows (ON_DEVICE; 6 cases failed on the CPU: session 13)
        dev = y.device if variant in ON_DEVICE else torch.device("cpu")
        moved = tuple(p.to(dev) if isinstance(p, torch.Tensor) else p for p in params)
        q, s = epilogue.quantize(variant, y.to(dev), quant_params(variants.get(variant), *moved))
        return q.cpu(), None if s is None else s.cpu(), f"fusion_passes.epilogue ({e.name} not installed)"
