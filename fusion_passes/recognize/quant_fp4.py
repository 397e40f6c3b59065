"""FP4 quantization: NVFP4 (E2M1 values, FP8 scales per 16 values, a global scale).

* vLLM's ``_C.scaled_fp4_quant.out`` through ``auto_functionalized(_v2)``;
* no native aten chain is matched structurally (vLLM's ``ref_nvfp4_quant`` is read by
  meaning, :mod:`fusion_passes.recognize.meaning`);
* MXFP4: no unfused form is matched. vLLM 0.33 has no standalone MXFP4 activation quant
  on CUDA/ROCm (ROCm quantizes inside its GEMM op, ``triton_fp4_gemm_dynamic_quant``), and
  XPU's ``vllm.xpu_mxfp4_quantize`` rounds differently (eps floor, e8m0fnu dtypes), so
  fusing it would change numerics. The fused op exists for direct use and backends.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from fusion_passes import variants
from fusion_passes.recognize.fx import dtype_of, short
from fusion_passes.recognize.quant_read import c_op
from fusion_passes.recognize.roles import Miss, Quant

C_NVFP4 = "_C.scaled_fp4_quant.out"


def _c_nvfp4(y: Node, u: Node, items: dict[int, Node], kw: dict) -> Quant | Miss:
    if dtype_of(y) not in variants.BY_KIND["nvfp4"].input_dtypes:
        return Miss(f"{short(u)}: NVFP4 quantizes fp16/bf16, the norm output is {dtype_of(y)}", u)
    sdt = dtype_of(kw["output_scale"])
    params = {"global_scale": kw["input_scale"], "swizzle": bool(kw["is_sf_swizzled_layout"])}
    return Quant("nvfp4", params, (u, *items.values()), {"q": items.get(1), "scales": items.get(2)},
                 scale_view=None if sdt == torch.float8_e4m3fn else sdt)


FUNCTIONALIZED = {C_NVFP4: c_op(_c_nvfp4)}
"""op called through ``auto_functionalized(_v2)`` -> ``reader(y, u, call)``."""
OPS: dict = {}
"""op called directly -> ``reader(y, u)``."""
NATIVE = ()
"""readers of the native aten chains: ``reader(y, u)``."""
