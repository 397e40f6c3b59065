"""CPU stand-ins for vLLM's ``torch.ops._C`` quant ops, for tracing vLLM FP8 models on a CPU
(part of the command line with :mod:`.vllm_cpu`, not library API).

The vLLM 0.33 CUDA wheel runs on a GPU-less host (``VLLM_TARGET_DEVICE=cpu``), but its CUDA
extension (``vllm/_C_stable_libtorch.abi3.so``) cannot load there: it links
``libcuda.so.1``, the NVIDIA driver. So the ``torch.ops._C.*`` quant ops do not exist, and
FP8 weight loading, which runs them (e.g. ``_C.static_scaled_fp8_quant`` when
``Fp8LinearMethod`` requantizes weights), fails; so does tracing the models' graphs
(``fusion-passes capture --quant fp8_*``, :func:`fusion_passes.cli.capture.trace_vllm`).

:func:`register_c_quant_ops` defines the missing ops from the wheel's OWN registration
strings (the ``TORCH_LIBRARY`` schema text read out of that .so, :func:`wheel_schemas`), so
the traced graphs hold exactly vLLM's ops, with a fake implementation (they mutate and
return nothing) and a CPU implementation that writes what the CUDA kernel computes: the
kernels' documented math, via :mod:`fusion_passes.epilogue` (sources:
vllm/model_executor/layers/quantization/input_quant_fp8.py, csrc/quantization/w8a8/fp8/
common.cu and per_token_group_quant.cu, utils/nvfp4_emulation_utils.py, utils/nvfp4_utils.py).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import torch

from fusion_passes import epilogue

__all__ = ["C_OPS", "register_c_quant_ops", "wheel_schemas"]

C_OPS = ("static_scaled_fp8_quant", "dynamic_scaled_fp8_quant", "dynamic_per_token_scaled_fp8_quant",
         "per_token_group_fp8_quant", "scaled_fp4_quant.out")


def _wheel_so() -> Path | None:
    try:
        import vllm
    except Exception:  # noqa: BLE001
        return None
    so = Path(vllm.__file__).parent / "_C_stable_libtorch.abi3.so"
    return so if so.exists() else None


@functools.lru_cache(maxsize=1)
def wheel_schemas() -> dict[str, str]:
    """``name[.overload] -> schema`` for :data:`C_OPS`, read from the wheel's .so."""
    so = _wheel_so()
    if so is None:
        return {}
    data = so.read_bytes()
    out = {}
    for name in C_OPS:
        # the schema string is NUL-terminated text starting with "<name>(" in .rodata
        at = data.find(b"\x00" + name.encode() + b"(")
        if at >= 0:
            text = data[at + 1:data.index(b"\x00", at + 1)].decode()
            if text.endswith("-> ()"):
                out[name] = re.sub(r"\s+", " ", text)
    return out


def _cpu_static(result, input, scale, group_shape=None):
    result.copy_(epilogue.fp8_static(input, scale, dtype=result.dtype))


def _cpu_per_tensor(result, input, scale):
    # the kernel does not floor the scale (csrc/quantization/w8a8/fp8/common.cu)
    q, s = epilogue.fp8_per_tensor(input, dtype=result.dtype, scale_min=0.0)
    result.copy_(q)
    scale.copy_(s)


def _cpu_per_token(result, input, scale, scale_ub):
    q, s = epilogue.fp8_per_token(input, scale_ub, dtype=result.dtype)
    result.copy_(q)
    scale.copy_(s)


def _cpu_per_group(input, output_q, output_s, group_size, eps, fp8_min, fp8_max, scale_ue8m0,
                   dummy_is_scale_transposed, dummy_is_tma_aligned):
    # the kernel's floors: eps on the group absmax, 1e-10 on the scale before UE8M0 rounding
    q, s = epilogue.fp8_per_group(input, group_size, scale_ue8m0, False, dtype=output_q.dtype,
                                  amax_eps=eps, scale_min=1e-10 if scale_ue8m0 else 0.0)
    output_q.copy_(q)
    output_s.copy_(s)


def _cpu_fp4(input, input_scale, is_sf_swizzled_layout, *, output, output_scale):
    q, s = epilogue.nvfp4(input, input_scale, is_sf_swizzled_layout)
    output.copy_(q)
    output_scale.view(torch.uint8).view(s.shape).copy_(s.view(torch.uint8))


_CPU = {"static_scaled_fp8_quant": _cpu_static, "dynamic_scaled_fp8_quant": _cpu_per_tensor,
        "dynamic_per_token_scaled_fp8_quant": _cpu_per_token,
        "per_token_group_fp8_quant": _cpu_per_group, "scaled_fp4_quant.out": _cpu_fp4}
_LIBS: list = []  # keeps the torch.library.Library alive (dropping it would undefine the ops)


def register_c_quant_ops() -> bool:
    """Define the missing ``_C`` quant ops from the wheel's schemas; True if all exist now.

    Idempotent; a no-op where the CUDA extension loaded. False when vLLM or the wheel's
    schemas are not available (then nothing is registered).
    """
    have = lambda n: hasattr(torch.ops._C, n.split(".")[0]) and hasattr(  # noqa: E731
        getattr(torch.ops._C, n.split(".")[0]), n.split(".")[1] if "." in n else "default")
    missing = [n for n in C_OPS if not have(n)]
    if not missing:
        return True
    try:  # vllm._custom_ops registers fakes for the _C ops it sees at import: import it first
        import vllm._custom_ops  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    schemas = wheel_schemas()
    if any(n not in schemas for n in missing):
        return False
    lib = torch.library.Library("_C", "FRAGMENT")
    _LIBS.append(lib)
    for n in missing:
        lib.define(schemas[n])
        lib.impl(n, _CPU[n], "CPU")
        torch.library.register_fake(f"_C::{n}", lambda *a, **k: None, lib=lib)
    return True
