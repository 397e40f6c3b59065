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
:class:`~fusion_passes.recognize.aten.Miss` naming the node that blocked it.

The role and the readers the recognizers share are in :mod:`fusion_passes.recognize.quant_read`,
the aten chains in :mod:`fusion_passes.recognize.quant_aten`, the custom ops in
:mod:`fusion_passes.recognize.quant_ops`; this module asks them in turn and re-exports the names
the rest of the library uses.
"""

from __future__ import annotations

from torch.fx import Node

from fusion_passes.recognize.quant_aten import native_group, native_static_or_token
from fusion_passes.recognize.quant_ops import aiter_op, custom_op, dead_buffers
from fusion_passes.recognize.quant_read import VARIANTS, Quant
from fusion_passes.recognize.aten import Miss


def find(y: Node) -> Quant | Miss | None:
    """The quantization of norm output *y*: a :class:`Quant`, a :class:`Miss` when a user
    looks like one but cannot fuse (the reason names the node), or None when no user
    quantizes *y*."""
    miss = None
    for u in list(y.users):
        for rec in (custom_op, aiter_op, native_static_or_token, native_group):
            found = rec(y, u)
            if isinstance(found, Quant):
                return found
            if isinstance(found, Miss) and miss is None:
                miss = found
    return miss


__all__ = ["Quant", "VARIANTS", "find", "dead_buffers"]
