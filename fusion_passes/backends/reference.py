"""The reference backend: the dialect's own all-reduce + :mod:`fusion_passes.epilogue`.

Runs anywhere the unfused graph runs (gloo on CPU, NCCL on GPU) with the unfused
graph's numerics, because it calls the very same collective and then the same math in
the same order. It is the CPU default and the oracle every kernel backend is tested
against. It saves no memory traffic: it exists for correctness, not speed.
"""

from __future__ import annotations

import torch

from fusion_passes import epilogue, groups, ops
from fusion_passes.backends import Call


class ReferenceBackend:
    name = "reference"
    variants = frozenset(ops.VARIANTS)  # the reference runs every fused op
    # keyword options of the quant variants beyond the contract (fusion_passes.ops)
    quant_options = frozenset({"fp8_dtype", "amax_eps", "scale_min"})

    def unsupported(self, call: Call) -> str | None:
        return None

    def run(self, variant: str, *args, **kwargs):
        return getattr(self, variant)(*args, **kwargs)

    @staticmethod
    def add_rmsnorm(
        input: torch.Tensor,
        residual: torch.Tensor | None,
        weight: torch.Tensor | None,
        eps: float,
        group: str,
        gemma: bool,
        weight_in_fp32: bool,
        residual_in_fp32: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        reduced = groups.all_reduce(input, group)
        return epilogue.add_rms_norm(
            reduced, residual, weight, eps, gemma=gemma, weight_in_fp32=weight_in_fp32,
            residual_in_fp32=residual_in_fp32,
        )

    # -- quant variants: (q, scales | None, residual_out, norm_out | None) -----------------

    def _quant(self, variant, input, residual, weight, eps, group, gemma, weight_in_fp32, *params,
               with_norm_out=False, residual_in_fp32=False, **options):
        reduced = groups.all_reduce(input, group)
        norm, summed = epilogue.add_rms_norm(
            reduced, residual, weight, eps, gemma=gemma, weight_in_fp32=weight_in_fp32,
            residual_in_fp32=residual_in_fp32,
        )
        q, scales = quantize(variant, norm, *params, **options)
        return q, scales, summed, norm if with_norm_out else None

    def add_rmsnorm_fp8_static(self, *args, **kwargs):
        return self._quant("add_rmsnorm_fp8_static", *args, **kwargs)

    def add_rmsnorm_fp8_per_token(self, *args, **kwargs):
        return self._quant("add_rmsnorm_fp8_per_token", *args, **kwargs)

    def add_rmsnorm_fp8_per_group(self, *args, **kwargs):
        return self._quant("add_rmsnorm_fp8_per_group", *args, **kwargs)

    def add_rmsnorm_fp8_per_tensor(self, *args, **kwargs):
        return self._quant("add_rmsnorm_fp8_per_tensor", *args, **kwargs)

    def add_rmsnorm_nvfp4(self, *args, **kwargs):
        return self._quant("add_rmsnorm_nvfp4", *args, **kwargs)

    def add_rmsnorm_mxfp4(self, *args, **kwargs):
        return self._quant("add_rmsnorm_mxfp4", *args, **kwargs)


def quantize(variant: str, norm: torch.Tensor, *params, fp8_dtype=torch.float8_e4m3fn,
             amax_eps=None, scale_min=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The quant epilogue of *variant* on the norm output: ``(q, scales | None)``.

    ``params`` are the contract's quant parameters (:mod:`fusion_passes.ops`); per-group
    ``amax_eps`` / ``scale_min`` default to the ``_C.per_token_group_fp8_quant`` kernel's,
    per-tensor ``scale_min`` to vLLM's native ``1/(fp8_max*512)``.
    """
    if variant == "add_rmsnorm_fp8_static":
        (scale,) = params
        return epilogue.fp8_static(norm, scale, dtype=fp8_dtype), None
    if variant == "add_rmsnorm_fp8_per_token":
        scale_ub = params[0] if params else None
        return epilogue.fp8_per_token(norm, scale_ub, dtype=fp8_dtype)
    if variant == "add_rmsnorm_fp8_per_group":
        from fusion_passes.ops import KERNEL_GROUP_EPS, kernel_group_scale_min

        group_size, ue8m0, column_major = (tuple(params) + (128, False, False)[len(params):])
        return epilogue.fp8_per_group(
            norm, group_size, ue8m0, column_major, dtype=fp8_dtype,
            amax_eps=KERNEL_GROUP_EPS if amax_eps is None else amax_eps,
            scale_min=kernel_group_scale_min(ue8m0) if scale_min is None else scale_min,
        )
    if variant == "add_rmsnorm_fp8_per_tensor":  # scale_min < 0: vLLM's native floor (fusion_passes.ops)
        return epilogue.fp8_per_tensor(norm, dtype=fp8_dtype,
                                       scale_min=None if scale_min is None or scale_min < 0 else scale_min)
    if variant == "add_rmsnorm_nvfp4":
        global_scale, swizzle = (tuple(params) + (True,))[:2]
        return epilogue.nvfp4(norm, global_scale, swizzle)
    if variant == "add_rmsnorm_mxfp4":
        return epilogue.mxfp4(norm)
    raise ValueError(f"fusion_passes: unknown quant variant {variant!r}")
