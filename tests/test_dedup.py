"""Identical quant chains of one value become one before matching (fusion_passes.dedup).

transformers' FP8 linears quantize their input each: q_proj, k_proj and v_proj quantize
the same norm output three times, and AOTAutograd keeps the three chains. Merged, the
fused op's one quantized output has three readers and no quant chain is left. Chains
that differ in anything (another scale tensor, another constant) stay apart.
"""

from __future__ import annotations

import torch

from graphs import run_pass
from spellings import design, harness, sources as S

FP8 = torch.float8_e4m3fn


def _fp8_casts(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function"
               and n.target is torch.ops.prims.convert_element_type.default and n.args[1] == FP8)


def _traced(case):
    inputs = harness.replicated_inputs(case)
    return harness.trace(case, [harness.partial_input(case, 0), *inputs])


def test_three_identical_quants_become_one_fused_output(fake_pg):
    (case,) = [c for c in design.CASES if c.name == "hf_llama_qkv_three_quants"]
    gm = _traced(case)
    assert _fp8_casts(gm) == 3  # AOTAutograd kept the three chains
    _, report = run_pass(gm)
    assert [s.variant for s in report.sites] == ["allreduce_add_rmsnorm_fp8_per_token"], report.table()
    assert _fp8_casts(gm) == 0
    (fused,) = [n for n in gm.graph.nodes if getattr(n.target, "namespace", "") == "fusion_passes"]
    q = next(g for g in fused.users if g.args[1] == 0)
    (out,) = [n for n in gm.graph.nodes if n.op == "output"]
    assert [a is q for a in out.args[0]].count(True) == 3  # one quantized value, three readers
    assert report.merged_duplicates > 0


def _two_scales(t, res, w, s):
    y, h = design._hf_llama(t, res, w)
    return S.vllm_quant_fp8_static(y, s), S.vllm_quant_fp8_static(y, s * 2.0), h


def test_chains_with_different_scales_stay_apart(fake_pg):
    """Two static quants of one norm output with different scale tensors are different
    values: one fuses, the other stays a quant chain of the fused op's norm output."""
    case = harness.Case("two_scales", "test", _two_scales, inputs=("res", "w", "s"),
                        expect=design.ADD + "_fp8_static_norm_out")
    gm = _traced(case)
    assert _fp8_casts(gm) == 2
    _, report = run_pass(gm)
    assert report.sites[0].fused, report.table()
    assert _fp8_casts(gm) == 1, report.table()


def test_buffers_and_random_values_are_never_merged():
    """Two ``empty_like`` of one value are two buffers, two ``rand_like`` two draws: the
    same op and arguments, yet not the same value."""
    from fusion_passes import dedup

    g = torch.fx.Graph()
    x = g.placeholder("x")
    outs = [g.call_function(op, (x,)) for op in (torch.ops.aten.empty_like.default,) * 2
            + (torch.ops.aten.rand_like.default,) * 2 + (torch.ops.aten.abs.default,) * 2]
    g.output(tuple(outs))
    assert dedup.merge_identical(g, [x]) == 1  # only the second abs
    assert len([n for n in g.nodes if n.op == "call_function"]) == 5
