"""CPU stand-ins for in-place norm kernels that do not exist on this machine.

Each op is defined under its real namespace and name with its real schema, and computes on
CPU what its kernel computes (the kernel source is named per op):

* ``_C.fused_add_rms_norm(Tensor! input, Tensor! residual, Tensor? weight, float epsilon)``
  and ``_C.rms_norm(Tensor! result, Tensor input, Tensor? weight, float epsilon)``: vLLM's
  CUDA kernels (csrc/layernorm_kernels.cu). The schema text is read out of the installed
  vLLM wheel's ``_C_stable_libtorch.abi3.so`` (the wheel's own ``TORCH_LIBRARY``
  registration string); its CUDA library cannot load here (no NVIDIA driver).
  ``fused_add_rms_norm_kernel`` rounds the sum to the activation dtype (``z += residual`` in
  ``scalar_t``) and multiplies the weight after the cast back: ``(scalar_t)(x * s) * w``.
* ``sgl_kernel.fused_add_rmsnorm(Tensor! input, Tensor! residual, Tensor weight, float eps,
  bool enable_pdl)``: SGLang's sgl-kernel (sgl-kernel/csrc/common_extension.cc), which calls
  FlashInfer's ``FusedAddRMSNormKernel`` (include/flashinfer/norm.cuh, installed with
  flashinfer 0.7.2 under flashinfer/data/include): the sum stays in fp32 for the norm
  (``x += float(residual)``; ``residual = (T)x``), ``x * rms_rcp * float(w)`` in fp32.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import torch

from fusion_passes import epilogue

_VLLM_OPS = ("fused_add_rms_norm", "rms_norm")
SGL_FUSED_ADD_RMSNORM = ("fused_add_rmsnorm(Tensor! input, Tensor! residual, Tensor weight, float eps, "
                         "bool enable_pdl) -> ()")


def _wheel_schema(name: str) -> str | None:
    """``name(...) -> ()`` as vLLM's wheel registers it, read from its .so (None if absent)."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("vllm")
    except Exception:  # noqa: BLE001
        return None
    if spec is None or spec.origin is None:
        return None
    so = Path(spec.origin).parent / "_C_stable_libtorch.abi3.so"
    if not so.exists():
        return None
    data = so.read_bytes()
    at = data.find(b"\x00" + name.encode() + b"(")
    if at < 0:
        return None
    return re.sub(r"\s+", " ", data[at + 1:data.index(b"\x00", at + 1)].decode())


def _vllm_fused_add_rms_norm(input, residual, weight, epsilon):
    norm, summed = epilogue.add_rms_norm(input, residual, weight, epsilon, weight_in_fp32=False)
    residual.copy_(summed)
    input.copy_(norm)


def _vllm_rms_norm(result, input, weight, epsilon):
    result.copy_(epilogue.rms_norm(input, weight, epsilon, weight_in_fp32=False))


def _sgl_fused_add_rmsnorm(input, residual, weight, eps, enable_pdl):
    norm, summed = epilogue.add_rms_norm(input, residual, weight, eps, residual_in_fp32=True)
    residual.copy_(summed)
    input.copy_(norm)


@functools.lru_cache(maxsize=1)
def register() -> bool:
    """Define the stand-ins once per process; False when vLLM's wheel (its schemas) is absent."""
    libs = []
    schemas = {name: _wheel_schema(name) for name in _VLLM_OPS}
    if any(s is None for s in schemas.values()):
        return False
    for ns, defs in (("_C", [(schemas["fused_add_rms_norm"], _vllm_fused_add_rms_norm),
                             (schemas["rms_norm"], _vllm_rms_norm)]),
                     ("sgl_kernel", [(SGL_FUSED_ADD_RMSNORM, _sgl_fused_add_rmsnorm)])):
        lib = torch.library.Library(ns, "FRAGMENT")
        libs.append(lib)
        for schema, fn in defs:
            name = schema.split("(", 1)[0]
            if hasattr(getattr(torch.ops, ns), name):
                continue
            lib.define(schema)
            lib.impl(name, fn, "CompositeExplicitAutograd")
    register.libs = libs  # keep the libraries alive
    return True
