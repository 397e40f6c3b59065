"""Real vLLM 0.33 Llama FP8 graphs (TP=2, traced on CPU by fusion_passes.tools.capture):
every all-reduce whose norm output is quantized fuses WITH the quant.

2 layers: the embedding all-reduce -> layer 0's rms_norm -> FP8 (qkv GEMM), then per layer
o_proj and down_proj all-reduces -> fused_add_rms_norm -> FP8, except the last one, which
feeds the final norm -> bf16 lm_head (no quant): 1 + 3 quant fusions + 1 plain.
Slow (vLLM import + one trace per quant, minutes on 2 cores): marked ``vllm``.
"""

from __future__ import annotations

import os

import pytest
from torch.testing import FileCheck

pytestmark = pytest.mark.vllm

LAYERS = 2


@pytest.mark.parametrize("quant,kind", [("fp8_static", "fp8_static"), ("fp8_dynamic", None)])
def test_vllm_llama_fp8_fuses_the_quant(fake_pg, quant, kind):
    """Static FP8 fuses the quant at every quantized norm. vLLM's Fp8Config "dynamic" for a
    per-tensor checkpoint is dynamic PER-TENSOR (``x.abs().max()`` over all tokens): no
    fused variant exists for it, so only all-reduce + norm fuse and the quant stays."""
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    from test_quant_vllm_ops import register_c_quant_ops

    # FP8 weight loading calls _C.static_scaled_fp8_quant (see test_quant_vllm_ops)
    if not register_c_quant_ops():
        pytest.skip("needs vLLM 0.33's wheel (its _C schemas) installed")
    try:
        from fusion_passes.tools.capture import trace_vllm
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"needs the vLLM capture tool and vllm importable: {e}")
    from fusion_passes import FusionPass

    (gm,) = trace_vllm("llama", tp=2, dtype="bfloat16", quant=quant, layers=LAYERS)
    p = FusionPass()
    p(gm.graph)
    gm.recompile()
    gm.graph.lint()
    assert not p.report.errors
    sfx = f"_{kind}" if kind else ""
    expected = ([f"allreduce_rmsnorm{sfx}"] + [f"allreduce_add_rmsnorm{sfx}"] * (2 * LAYERS - 1)
                + ["allreduce_add_rmsnorm_final"])
    assert [s.variant for s in p.report.sites] == expected
    FileCheck().check_not("vllm.all_reduce").check_not("vllm_ir.").run(gm.code)
    if kind:
        FileCheck().check_count(f"fusion_passes.allreduce_add_rmsnorm_{kind}.default", 2 * LAYERS,
                                exactly=True).run(gm.code)
        FileCheck().check_count("fusion_passes.allreduce_add_rmsnorm.default", 1, exactly=True).run(gm.code)
    else:
        FileCheck().check_count("fusion_passes.allreduce_add_rmsnorm.default", 2 * LAYERS + 1,
                                exactly=True).run(gm.code)
        FileCheck().check("aten.max.default").check("float8_e4m3fn").run(gm.code)  # the quant stays
