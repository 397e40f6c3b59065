"""Any RMSNorm of a value, in every dialect: the one entry the matcher and hoisting ask."""

from __future__ import annotations

from torch.fx import Node

from fusion_passes.recognize.inplace import inplace_rms_norm
from fusion_passes.recognize.aten import Miss, Norm, decomposed_rms_norm, vllm_rms_norm


def rms_norm(x: Node) -> Norm | Miss:
    """Any RMSNorm of *x*: vLLM's IR norm ops, in-place norm kernels under
    ``auto_functionalized`` (:mod:`fusion_passes.recognize.inplace`), or the decomposed aten chain."""
    found = vllm_rms_norm(x)
    if found is None:
        found = inplace_rms_norm(x)
    return found if found is not None else decomposed_rms_norm(x)


__all__ = ["rms_norm"]
