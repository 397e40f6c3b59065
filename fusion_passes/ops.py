"""The fused ops: the contract between the passes and the backends.

Custom ops in the ``fusion_passes`` namespace. They are functional (no mutation, no
aliasing), have fake implementations for tracing, and return what the unfused chain
returned, so consumers of the rewritten graph need no change:

``torch.ops.fusion_passes.allreduce_add_rmsnorm(input, residual, weight, eps, group,
gemma=False, weight_in_fp32=True, backend="auto") -> (norm_out, residual_out)``

* ``input``: this rank's partial sum, ``[..., hidden]``.
* ``residual``: added after the all-reduce, or ``None`` (then ``residual_out`` is the
  all-reduced input).
* ``weight``: the norm weight ``[hidden]`` or ``None``; ``gemma`` multiplies by ``1 + w``.
* ``weight_in_fp32``: where the weight multiplies (see :func:`fusion_passes.epilogue.rms_norm`).
* ``group``: ``"c10d:<name>"`` or ``"vllm:<name>"`` (:mod:`fusion_passes.groups`).
* ``backend``: ``"auto"`` lets the selector choose per call.
"""

from __future__ import annotations

import torch

from fusion_passes import backends, groups

VARIANTS = ("add_rmsnorm",)


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


def call_for(variant: str, input: torch.Tensor, group: str) -> backends.Call:
    """The selector's view of one call (sizes from the live tensor, world size resolved)."""
    return backends.Call(
        variant=variant,
        device=backends.device_kind(input.device),
        dtype=input.dtype,
        hidden=input.shape[-1],
        tokens=input.numel() // input.shape[-1],
        world_size=groups.world_size(group),
        single_node=groups.is_single_node(group) if input.is_cuda else True,
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """all-reduce(input) [+ residual] -> RMSNorm, in one call. See the module docstring."""
    _check(input, residual, weight, group)
    name = backends.select(call_for("add_rmsnorm", input, group), backend)
    return backends.get(name).run(
        "add_rmsnorm", input.contiguous(), residual, weight, eps, group, gemma, weight_in_fp32
    )


@allreduce_add_rmsnorm.register_fake
def _(input, residual, weight, eps, group, gemma=False, weight_in_fp32=True, backend="auto"):
    _check(input, residual, weight, group)
    return (
        input.new_empty(input.shape, dtype=_norm_dtype(input, weight, weight_in_fp32, gemma)),
        torch.empty_like(input),
    )
