"""Outputs keep their types (issue 22): a fused site returns every value in the dtype and
shape the graph had there, or stays unfused with a reason.

The Hugging Face norm ``w * n.to(dtype)`` takes the type promotion of the weight and the
activations: an fp32 weight with bf16 activations gives an fp32 norm output, and the fused
op must return fp32 there too (``promote_out``), under Inductor's default precision (the
weight multiplied in fp32, the product never rounded) and under emulated casts (eager's
order). The generator draws weight and activation dtypes, the norm's spelling and what
reads its output, traces the graph, runs the pass (tests/graphs.run_pass checks the graph
invariant) and compares the fused graph's values with the unfused graph's.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch._inductor.config as inductor_config
from hypothesis import given, settings, strategies as st

from graphs import all_reduce, fp32_weight_rms_norm, gemma_rms_norm, hf_rms_norm, run_pass, trace
from ranks import run_ranks

pytestmark = pytest.mark.usefixtures("fake_pg")
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
NORMS = {"hf": hf_rms_norm, "fp32_weight": fp32_weight_rms_norm, "gemma": gemma_rms_norm}
# What reads the norm output: returned as is, cast back, a residual-style add, a matmul in
# the norm output's own dtype, a reduction, and vLLM's native per-token FP8 quant.
CONSUMERS = {
    "out": lambda y, x: y,
    "cast": lambda y, x: y.to(x.dtype),
    "add": lambda y, x: y + x,
    "matmul": lambda y, x: y @ torch.ones(y.shape[-1], 8, dtype=y.dtype),
    "sum": lambda y, x: y.sum(-1),
    "fp8": lambda y, x: (y.float() * (448.0 / y.abs().amax(-1, keepdim=True).float())).clamp(-448, 448)
    .to(torch.float8_e4m3fn),
}
CASES = int(os.environ.get("OUTPUT_TYPE_CASES", "60"))  # 1,000 measured once (docs/design.md)


def chain(norm, consumer, residual: bool):
    def fn(x, res, w):
        h = all_reduce(x) + res if residual else all_reduce(x)
        y = NORMS[norm](h, w, 1e-6)
        return CONSUMERS[consumer](y, h), h
    return fn


@settings(max_examples=CASES)
@given(w_dtype=st.sampled_from(DTYPES), x_dtype=st.sampled_from(DTYPES), norm=st.sampled_from(sorted(NORMS)),
       consumer=st.sampled_from(sorted(CONSUMERS)), residual=st.booleans(), emulate=st.booleans(),
       tokens=st.sampled_from([1, 3, 8]))
def test_no_fused_output_changes_type(w_dtype, x_dtype, norm, consumer, residual, emulate, tokens):
    g = torch.Generator().manual_seed(tokens)
    args = (torch.randn(tokens, 64, generator=g).to(x_dtype), torch.randn(tokens, 64, generator=g).to(x_dtype),
            (torch.rand(64, generator=g) + 0.5).to(w_dtype))
    with inductor_config.patch(emulate_precision_casts=emulate):
        gm = trace(chain(norm, consumer, residual), *args)
        before, report = run_pass(gm)  # asserts the invariant (tests/graphs.assert_types_kept)
    (site,) = report.sites
    assert site.fused or site.reason, site
    if site.fused:
        fused, unfused = (run_ranks(m, [args, args])[0] for m in (gm, before))
        for a, b in zip(fused, unfused):
            assert a.dtype == b.dtype and a.shape == b.shape
            # a few ulps of the narrowest dtype; FP8 E4M3: one code step (3 mantissa bits) where
            # the fused op rounds as the compile and the unfused graph runs eagerly
            fp8 = a.dtype == torch.float8_e4m3fn
            torch.testing.assert_close(a.float(), b.float(), atol=0.07, rtol=0.13 if fp8 else 0.02)


@pytest.mark.parametrize("emulate", [False, True])
def test_an_fp32_weight_keeps_the_fp32_norm_output(emulate):
    """The issue's case: an fp32 norm weight (transformers' keep-in-fp32 modules) with bf16
    activations. The site fuses and its norm output stays fp32: under Inductor's default the
    fp32 product of the weight and the unrounded normalized value (what the compile
    returns), under emulated casts eager's ``w * n.to(bf16)``."""
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(8, 256, generator=g).bfloat16(), torch.randn(8, 256, generator=g).bfloat16(),
            torch.rand(256, generator=g) + 0.5)
    fn = chain("hf", "out", True)
    with inductor_config.patch(emulate_precision_casts=emulate):
        gm = trace(fn, *args)
        before, report = run_pass(gm)
    (site,) = report.sites
    assert site.fused and site.variant == "allreduce_add_rmsnorm"
    (op,) = [n for n in gm.graph.nodes if "fusion_passes" in str(n.target)]
    assert op.kwargs.get("promote_out", False) is not emulate and op.meta["val"][0].dtype == torch.float32
    (norm, _), (want, _) = run_ranks(gm, [args, args])[0], run_ranks(before, [args, args])[0]
    assert norm.dtype == torch.float32
    if emulate:
        assert torch.equal(norm, want)
    else:
        h = (args[0] + args[0]) + args[1]
        h32 = h.float()
        expect = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + 1e-6) * args[2]
        assert torch.equal(norm, expect)


def test_a_site_whose_output_would_change_type_stays_unfused(monkeypatch):
    """The rewrite's own check: where the fused op's output would differ in dtype from the
    value it replaces, the site is left as it was, with the reason in the report."""
    from fusion_passes import arguments

    monkeypatch.setattr(arguments, "norm_dtype", lambda x, w, f: torch.float16)  # a wrong fake dtype
    args = (torch.randn(4, 64).bfloat16(), torch.randn(4, 64).bfloat16(), torch.rand(64).bfloat16())
    gm = trace(chain("hf", "out", True), *args)
    text = gm.code
    before, report = run_pass(gm)
    (site,) = report.sites
    assert not site.fused and "would be float16 [4, 64] where the graph's" in site.reason
    assert gm.code == text
