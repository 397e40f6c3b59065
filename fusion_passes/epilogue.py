"""The math after the all-reduce, in exactly the order of the unfused chain.

This is the oracle: the reference backend runs it after a real collective, the per-rank
simulator in the tests runs it after summing simulated ranks, and every kernel backend is
tested against it. One function per step so each quant variant can reuse the norm.
"""

from __future__ import annotations

import torch


def add_residual(x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """``x + residual`` in the activation dtype (as ``aten.add`` computes it), or ``x``."""
    return x if residual is None else x + residual


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    *,
    gemma: bool = False,
    weight_in_fp32: bool = True,
) -> torch.Tensor:
    """RMSNorm over the last dim, computed in fp32 as every real model does.

    ``weight_in_fp32=True``: ``(x32 * rsqrt(mean(x32^2) + eps) * w).to(dtype)``; this is
    ``torch.nn.functional.rms_norm``, vLLM and Gemma's form (Gemma multiplies by ``1 + w``).
    ``weight_in_fp32=False``: ``w * (x32 * rsqrt(...)).to(dtype)``, the Hugging Face
    Llama form, where the weight multiplies after the cast back (result dtype follows
    type promotion of ``w`` and ``x``).
    """
    dtype = x.dtype
    x32 = x.to(torch.float32)
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if weight is None:
        return normed.to(dtype)
    if gemma:
        return (normed * (1.0 + weight.to(torch.float32))).to(dtype)
    if weight_in_fp32:
        return (normed * weight).to(dtype)
    return weight * normed.to(dtype)


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    eps: float,
    *,
    gemma: bool = False,
    weight_in_fp32: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual), x + residual)``: the two values the fused op returns."""
    summed = add_residual(x, residual)
    return rms_norm(summed, weight, eps, gemma=gemma, weight_in_fp32=weight_in_fp32), summed
