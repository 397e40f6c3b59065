"""The fused ops: the contract between the passes and the backends.

Custom ops in the ``fusion_passes`` namespace. They are functional (no mutation, no
aliasing), have fake implementations for tracing, and return what the unfused chain
returned, so consumers of the rewritten graph need no change:

``torch.ops.fusion_passes.allreduce_add_rmsnorm(input, residual, weight, eps, group,
gemma=False, weight_in_fp32=True, backend="auto", residual_in_fp32=False)
-> (norm_out, residual_out)``

* ``input``: this rank's partial sum, ``[..., hidden]``.
* ``residual``: added after the all-reduce, or ``None`` (then ``residual_out`` is the
  all-reduced input).
* ``weight``: the norm weight ``[hidden]`` or ``None``; ``gemma`` multiplies by ``1 + w``.
* ``weight_in_fp32``: where the weight multiplies (see :func:`fusion_passes.epilogue.rms_norm`).
* ``residual_in_fp32``: the residual add in fp32 with the norm reading the unrounded sum
  (vLLM's ``fused_add_rms_norm``; see :func:`fusion_passes.epilogue.add_rms_norm`).
* ``group``: ``"c10d:<name>"`` or ``"vllm:<name>"`` (:mod:`fusion_passes.groups`).
* ``backend``: ``"auto"`` lets the selector choose per call.
"""

from __future__ import annotations

import logging

import torch

from fusion_passes import backends, epilogue, groups

VARIANTS = (
    "add_rmsnorm",
    "add_rmsnorm_fp8_static",
    "add_rmsnorm_fp8_per_token",
    "add_rmsnorm_fp8_per_group",
    "add_rmsnorm_fp8_per_tensor",
    "add_rmsnorm_nvfp4",
    "add_rmsnorm_mxfp4",
)


def _check(input: torch.Tensor, residual, weight, group: str) -> None:
    """Clear errors for bad input, naming the problem (never a silent wrong answer)."""
    if input.dim() < 1 or input.shape[-1] == 0:
        raise ValueError(f"fusion_passes: input must be [..., hidden] with hidden > 0, got {tuple(input.shape)}")
    if not input.is_floating_point():
        raise TypeError(f"fusion_passes: input must be floating point, got {input.dtype}")
    hidden = input.shape[-1]
    if residual is not None and (residual.shape != input.shape or residual.dtype != input.dtype):
        raise ValueError(
            "fusion_passes: residual must match input in shape and dtype: "
            f"{tuple(residual.shape)}/{residual.dtype} vs {tuple(input.shape)}/{input.dtype}"
        )
    if weight is not None and tuple(weight.shape) != (hidden,):
        raise ValueError(f"fusion_passes: weight must be [{hidden}], got {tuple(weight.shape)}")
    groups.split(group)


def _norm_dtype(input: torch.Tensor, weight, weight_in_fp32: bool, gemma: bool) -> torch.dtype:
    if weight is None or weight_in_fp32 or gemma:
        return input.dtype
    return torch.promote_types(weight.dtype, input.dtype)


def call_for(variant: str, input: torch.Tensor, group: str, *, gemma: bool = False, weight_in_fp32: bool = True,
             residual_in_fp32: bool = False, group_size: int | None = None) -> backends.Call:
    """The selector's view of one call (sizes from the live tensor, world size resolved)."""
    return backends.Call(
        variant=variant,
        device=backends.device_kind(input.device),
        dtype=input.dtype,
        hidden=input.shape[-1],
        tokens=input.numel() // input.shape[-1],
        world_size=groups.world_size(group),
        single_node=groups.is_single_node(group) if input.is_cuda else True,
        gemma=gemma,
        weight_in_fp32=weight_in_fp32,
        residual_in_fp32=residual_in_fp32,
        group_size=group_size,
    )


@torch.library.custom_op("fusion_passes::allreduce_add_rmsnorm", mutates_args=())
def allreduce_add_rmsnorm(
    input: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    eps: float,
    group: str,
    gemma: bool = False,
    weight_in_fp32: bool = True,
    backend: str = "auto",
    residual_in_fp32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """all-reduce(input) [+ residual] -> RMSNorm, in one call. See the module docstring."""
    _check(input, residual, weight, group)
    call = call_for("add_rmsnorm", input, group, gemma=gemma, weight_in_fp32=weight_in_fp32,
                    residual_in_fp32=residual_in_fp32)
    return backends.get(backends.select(call, backend)).run(
        "add_rmsnorm", input.contiguous(), residual, weight, eps, group, gemma, weight_in_fp32,
        residual_in_fp32=residual_in_fp32,
    )


@allreduce_add_rmsnorm.register_fake
def _(input, residual, weight, eps, group, gemma=False, weight_in_fp32=True, backend="auto", residual_in_fp32=False):
    _check(input, residual, weight, group)
    return (
        input.new_empty(input.shape, dtype=_norm_dtype(input, weight, weight_in_fp32, gemma)),
        torch.empty_like(input),
    )


# ---------------------------------------------------------------------------------------
# all-reduce -> [+ residual] -> RMSNorm -> quant: one op per quant family.
#
# Every quant op takes the arguments of allreduce_add_rmsnorm, then the quant's own, then
# ``return_norm`` (the "Out" variants: a second consumer also reads the norm output) and
# ``backend``, and returns ``(q, scales, residual_out, norm_out)`` (the static op has no
# scales: ``(q, residual_out, norm_out)``). ``norm_out`` is an empty ``[0]`` tensor unless
# ``return_norm``. A backend's ``run(variant, input, residual, weight, eps, group, gemma,
# weight_in_fp32, <quant params>, with_norm_out=...)`` returns ``(q, scales | None,
# residual_out, norm_out | None)``; quant params are those of the matching function in
# :mod:`fusion_passes.epilogue`. Options beyond those (``fp8_dtype``; per group
# ``amax_eps`` / ``scale_min`` when they differ from the ``_C.per_token_group_fp8_quant``
# kernel's) go as keywords only to backends that list them in ``quant_options``; for any
# other backend the call runs on the reference backend (see :func:`_run_quant`).
# ---------------------------------------------------------------------------------------

# The per-group kernel's floors (csrc per_token_group_quant.cu: eps=1e-10 on the group
# absmax; with UE8M0 the scale is floored at 1e-10 before rounding to a power of two).
KERNEL_GROUP_EPS = 1e-10


def kernel_group_scale_min(ue8m0: bool) -> float:
    """The ``scale_min`` that makes :func:`epilogue.fp8_per_group` the custom op's math."""
    return KERNEL_GROUP_EPS if ue8m0 else 0.0


def _check_quant(input: torch.Tensor, variant: str, *, hidden_multiple: int = 1, fp4: bool = False) -> None:
    hidden = input.shape[-1]
    if hidden % hidden_multiple:
        raise ValueError(f"fusion_passes: {variant} needs hidden % {hidden_multiple} == 0, got hidden={hidden}")
    if fp4 and input.dtype not in epilogue.FP4_INPUT_DTYPES:
        raise TypeError(f"fusion_passes: {variant} quantizes fp16/bf16 activations only, got {input.dtype}")


def _check_fp8(fp8_dtype: torch.dtype) -> None:
    if fp8_dtype not in epilogue.FP8_DTYPES:
        raise TypeError(f"fusion_passes: fp8_dtype must be one of {epilogue.FP8_DTYPES}, got {fp8_dtype}")


_warned_fallback: set[tuple[str, str]] = set()


def _run_quant(variant: str, input, group: str, backend: str, common: tuple, params: tuple,
               return_norm: bool, options: dict, residual_in_fp32: bool, group_size: int | None = None):
    """Select a backend and run *variant*; ``options`` that the chosen backend does not list
    in ``quant_options`` send the call to the reference backend (logged once)."""
    gemma, weight_in_fp32 = common[-2:]
    call = call_for(variant, input, group, gemma=gemma, weight_in_fp32=weight_in_fp32,
                    residual_in_fp32=residual_in_fp32, group_size=group_size)
    name = backends.select(call, backend)
    impl = backends.get(name)
    if options and not set(options) <= set(getattr(impl, "quant_options", ())):
        if (name, variant) not in _warned_fallback:
            _warned_fallback.add((name, variant))
            logging.getLogger("fusion_passes").warning(
                "fusion_passes: %s cannot take %s for %s; running it on the reference backend",
                name, sorted(options), variant,
            )
        impl = backends.get("reference")
    q, scales, res_out, norm = impl.run(variant, input.contiguous(), *common, *params,
                                        with_norm_out=return_norm, residual_in_fp32=residual_in_fp32, **options)
    if norm is None or not return_norm:
        norm = input.new_empty((0,))
    return q, scales, res_out, norm


def _fake_common(input, weight, weight_in_fp32, gemma, return_norm):
    norm = (input.new_empty(input.shape, dtype=_norm_dtype(input, weight, weight_in_fp32, gemma))
            if return_norm else input.new_empty((0,)))
    return torch.empty_like(input), norm


@torch.library.custom_op("fusion_passes::allreduce_add_rmsnorm_fp8_static", mutates_args=())
def allreduce_add_rmsnorm_fp8_static(
    input: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None, eps: float,
    group: str, scale: torch.Tensor, fp8_dtype: torch.dtype = torch.float8_e4m3fn,
    gemma: bool = False, weight_in_fp32: bool = True, return_norm: bool = False, backend: str = "auto",
    residual_in_fp32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """... -> RMSNorm -> static per-tensor FP8 (:func:`epilogue.fp8_static`):
    ``(q, residual_out, norm_out)``."""
    _check(input, residual, weight, group)
    _check_fp8(fp8_dtype)
    if scale.numel() != 1:
        raise ValueError(f"fusion_passes: static FP8 needs a 1-element scale, got {tuple(scale.shape)}")
    opts = {} if fp8_dtype == torch.float8_e4m3fn else {"fp8_dtype": fp8_dtype}
    q, _, res_out, norm = _run_quant("add_rmsnorm_fp8_static", input, group, backend,
                                     (residual, weight, eps, group, gemma, weight_in_fp32), (scale,),
                                     return_norm, opts, residual_in_fp32)
    return q, res_out, norm


@allreduce_add_rmsnorm_fp8_static.register_fake
def _(input, residual, weight, eps, group, scale, fp8_dtype=torch.float8_e4m3fn, gemma=False,
      weight_in_fp32=True, return_norm=False, backend="auto",
      residual_in_fp32=False):
    _check(input, residual, weight, group)
    _check_fp8(fp8_dtype)
    return (input.new_empty(input.shape, dtype=fp8_dtype),
            *_fake_common(input, weight, weight_in_fp32, gemma, return_norm))


@torch.library.custom_op("fusion_passes::allreduce_add_rmsnorm_fp8_per_token", mutates_args=())
def allreduce_add_rmsnorm_fp8_per_token(
    input: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None, eps: float,
    group: str, scale_ub: torch.Tensor | None = None, fp8_dtype: torch.dtype = torch.float8_e4m3fn,
    gemma: bool = False, weight_in_fp32: bool = True, return_norm: bool = False, backend: str = "auto",
    residual_in_fp32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """... -> RMSNorm -> dynamic per-token FP8 (:func:`epilogue.fp8_per_token`):
    ``(q, scales[..., 1] fp32, residual_out, norm_out)``."""
    _check(input, residual, weight, group)
    _check_fp8(fp8_dtype)
    opts = {} if fp8_dtype == torch.float8_e4m3fn else {"fp8_dtype": fp8_dtype}
    return _run_quant("add_rmsnorm_fp8_per_token", input, group, backend,
                      (residual, weight, eps, group, gemma, weight_in_fp32), (scale_ub,), return_norm, opts,
                      residual_in_fp32)


@allreduce_add_rmsnorm_fp8_per_token.register_fake
def _(input, residual, weight, eps, group, scale_ub=None, fp8_dtype=torch.float8_e4m3fn, gemma=False,
      weight_in_fp32=True, return_norm=False, backend="auto",
      residual_in_fp32=False):
    _check(input, residual, weight, group)
    _check_fp8(fp8_dtype)
    scales = input.new_empty(input.shape[:-1] + (1,), dtype=torch.float32)
    return (input.new_empty(input.shape, dtype=fp8_dtype), scales,
            *_fake_common(input, weight, weight_in_fp32, gemma, return_norm))


@torch.library.custom_op("fusion_passes::allreduce_add_rmsnorm_fp8_per_group", mutates_args=())
def allreduce_add_rmsnorm_fp8_per_group(
    input: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None, eps: float,
    group: str, group_size: int, ue8m0: bool = False, column_major: bool = False,
    amax_eps: float = KERNEL_GROUP_EPS, scale_min: float = -1.0,
    fp8_dtype: torch.dtype = torch.float8_e4m3fn,
    gemma: bool = False, weight_in_fp32: bool = True, return_norm: bool = False, backend: str = "auto",
    residual_in_fp32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """... -> RMSNorm -> per-token-group FP8 (:func:`epilogue.fp8_per_group`):
    ``(q, scales[..., H // group_size] fp32, residual_out, norm_out)``; ``column_major``
    scales have the token dim contiguous. ``scale_min < 0`` means the kernel's
    (:func:`kernel_group_scale_min`); vLLM's native chain is ``amax_eps=0,
    scale_min=1/(fp8_max*512)``."""
    _check(input, residual, weight, group)
    _check_fp8(fp8_dtype)
    _check_quant(input, "add_rmsnorm_fp8_per_group", hidden_multiple=group_size)
    if scale_min < 0:
        scale_min = kernel_group_scale_min(ue8m0)
    opts = {}
    if amax_eps != KERNEL_GROUP_EPS or scale_min != kernel_group_scale_min(ue8m0):
        opts.update(amax_eps=amax_eps, scale_min=scale_min)
    if fp8_dtype != torch.float8_e4m3fn:
        opts["fp8_dtype"] = fp8_dtype
    q, scales, res_out, norm = _run_quant(
        "add_rmsnorm_fp8_per_group", input, group, backend,
        (residual, weight, eps, group, gemma, weight_in_fp32), (group_size, ue8m0, column_major),
        return_norm, opts, residual_in_fp32, group_size)
    if column_major:  # the token dim contiguous, exactly as the fake (and vLLM) lay it out
        scales = scales.transpose(-2, -1).contiguous().transpose(-2, -1)
    return q, scales, res_out, norm


@allreduce_add_rmsnorm_fp8_per_group.register_fake
def _(input, residual, weight, eps, group, group_size, ue8m0=False, column_major=False,
      amax_eps=KERNEL_GROUP_EPS, scale_min=-1.0, fp8_dtype=torch.float8_e4m3fn, gemma=False,
      weight_in_fp32=True, return_norm=False, backend="auto",
      residual_in_fp32=False):
    _check(input, residual, weight, group)
    _check_fp8(fp8_dtype)
    _check_quant(input, "add_rmsnorm_fp8_per_group", hidden_multiple=group_size)
    shape = input.shape[:-1] + (input.shape[-1] // group_size,)
    if column_major:
        scales = input.new_empty(shape[:-2] + (shape[-1], shape[-2]), dtype=torch.float32).transpose(-2, -1)
    else:
        scales = input.new_empty(shape, dtype=torch.float32)
    return (input.new_empty(input.shape, dtype=fp8_dtype), scales,
            *_fake_common(input, weight, weight_in_fp32, gemma, return_norm))


@torch.library.custom_op("fusion_passes::allreduce_add_rmsnorm_fp8_per_tensor", mutates_args=())
def allreduce_add_rmsnorm_fp8_per_tensor(
    input: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None, eps: float,
    group: str, scale_min: float = -1.0, fp8_dtype: torch.dtype = torch.float8_e4m3fn,
    gemma: bool = False, weight_in_fp32: bool = True, return_norm: bool = False, backend: str = "auto",
    residual_in_fp32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """... -> RMSNorm -> dynamic per-tensor FP8 (:func:`epilogue.fp8_per_tensor`): ONE scale,
    the max over the whole norm output: ``(q, scale[1] fp32, residual_out, norm_out)``.
    ``scale_min < 0`` means vLLM's native floor ``1/(fp8_max*512)``
    (``QuantFP8.forward_native``); the ``_C.dynamic_scaled_fp8_quant`` kernel is
    ``scale_min=0``. vLLM has no scale upper bound for per-tensor scales (``QuantFP8``
    asserts ``scale_ub`` only with per-token), so there is none here."""
    _check(input, residual, weight, group)
    _check_fp8(fp8_dtype)
    opts = {}
    if scale_min >= 0 and scale_min != epilogue.fp8_min_scaling_factor(fp8_dtype):
        opts["scale_min"] = scale_min
    if fp8_dtype != torch.float8_e4m3fn:
        opts["fp8_dtype"] = fp8_dtype
    return _run_quant("add_rmsnorm_fp8_per_tensor", input, group, backend,
                      (residual, weight, eps, group, gemma, weight_in_fp32), (), return_norm, opts,
                      residual_in_fp32)


@allreduce_add_rmsnorm_fp8_per_tensor.register_fake
def _(input, residual, weight, eps, group, scale_min=-1.0, fp8_dtype=torch.float8_e4m3fn, gemma=False,
      weight_in_fp32=True, return_norm=False, backend="auto",
      residual_in_fp32=False):
    _check(input, residual, weight, group)
    _check_fp8(fp8_dtype)
    return (input.new_empty(input.shape, dtype=fp8_dtype), input.new_empty((1,), dtype=torch.float32),
            *_fake_common(input, weight, weight_in_fp32, gemma, return_norm))


def _nvfp4_scale_shape(tokens: int, hidden: int, swizzle: bool) -> tuple[int, int]:
    k = hidden // epilogue.NVFP4_BLOCK
    if not swizzle:
        return tokens, k
    rows, cols = epilogue.NVFP4_SWIZZLE_ROWS, epilogue.NVFP4_SWIZZLE_COLS
    return -(-tokens // rows) * rows, -(-k // cols) * cols


@torch.library.custom_op("fusion_passes::allreduce_add_rmsnorm_nvfp4", mutates_args=())
def allreduce_add_rmsnorm_nvfp4(
    input: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None, eps: float,
    group: str, global_scale: torch.Tensor, swizzle: bool = True,
    gemma: bool = False, weight_in_fp32: bool = True, return_norm: bool = False, backend: str = "auto",
    residual_in_fp32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """... -> RMSNorm -> NVFP4 (:func:`epilogue.nvfp4`): ``(packed uint8 [T, H//2],
    block scales float8_e4m3fn [T, H//16] or swizzled, residual_out, norm_out)``."""
    _check(input, residual, weight, group)
    _check_quant(input, "add_rmsnorm_nvfp4", hidden_multiple=epilogue.NVFP4_BLOCK, fp4=True)
    return _run_quant("add_rmsnorm_nvfp4", input, group, backend,
                      (residual, weight, eps, group, gemma, weight_in_fp32), (global_scale, swizzle),
                      return_norm, {}, residual_in_fp32)


@allreduce_add_rmsnorm_nvfp4.register_fake
def _(input, residual, weight, eps, group, global_scale, swizzle=True, gemma=False,
      weight_in_fp32=True, return_norm=False, backend="auto",
      residual_in_fp32=False):
    _check(input, residual, weight, group)
    _check_quant(input, "add_rmsnorm_nvfp4", hidden_multiple=epilogue.NVFP4_BLOCK, fp4=True)
    hidden = input.shape[-1]
    tokens = input.numel() // hidden
    return (input.new_empty((tokens, hidden // 2), dtype=torch.uint8),
            input.new_empty(_nvfp4_scale_shape(tokens, hidden, swizzle), dtype=torch.float8_e4m3fn),
            *_fake_common(input, weight, weight_in_fp32, gemma, return_norm))


@torch.library.custom_op("fusion_passes::allreduce_add_rmsnorm_mxfp4", mutates_args=())
def allreduce_add_rmsnorm_mxfp4(
    input: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None, eps: float,
    group: str, gemma: bool = False, weight_in_fp32: bool = True, return_norm: bool = False,
    backend: str = "auto", residual_in_fp32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """... -> RMSNorm -> MXFP4 (:func:`epilogue.mxfp4`): ``(packed uint8 [T, H//2],
    E8M0 scales uint8 [T, H//32], residual_out, norm_out)``."""
    _check(input, residual, weight, group)
    _check_quant(input, "add_rmsnorm_mxfp4", hidden_multiple=epilogue.MXFP4_BLOCK, fp4=True)
    return _run_quant("add_rmsnorm_mxfp4", input, group, backend,
                      (residual, weight, eps, group, gemma, weight_in_fp32), (), return_norm, {}, residual_in_fp32)


@allreduce_add_rmsnorm_mxfp4.register_fake
def _(input, residual, weight, eps, group, gemma=False, weight_in_fp32=True, return_norm=False, backend="auto",
      residual_in_fp32=False):
    _check(input, residual, weight, group)
    _check_quant(input, "add_rmsnorm_mxfp4", hidden_multiple=epilogue.MXFP4_BLOCK, fp4=True)
    hidden = input.shape[-1]
    tokens = input.numel() // hidden
    return (input.new_empty((tokens, hidden // 2), dtype=torch.uint8),
            input.new_empty((tokens, hidden // epilogue.MXFP4_BLOCK), dtype=torch.uint8),
            *_fake_common(input, weight, weight_in_fp32, gemma, return_norm))
