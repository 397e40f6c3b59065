"""The fused op rounds as the compile it replaces (issue: numerics no worse than unfused).

Under Inductor's default (``emulate_precision_casts=False``) the compiled Hugging Face
RMSNorm keeps the normalized value in fp32 before the weight multiply; with emulated casts
it rounds as eager does. The pass follows: a plain-dialect HF-order norm becomes the fused
op's ``weight_in_fp32`` form by default and stays in eager's order when emulating. Checked
against a real Inductor compile on CPU (the same rounding was measured on an H200, see
fusion_passes/match.py)."""

from __future__ import annotations


import pytest
import torch
import torch._inductor.config as inductor_config

from fusion_passes import FusionPass
from graphs import all_reduce, hf_rms_norm, trace

pytestmark = pytest.mark.usefixtures("fake_pg")
T, H = 16, 1024


def chain(x, res, w):
    h = all_reduce(x) + res
    return hf_rms_norm(h, w, 1e-6), h


def inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(T, H, generator=g).bfloat16(), torch.randn(T, H, generator=g).bfloat16(),
            (torch.rand(H, generator=g) + 0.5).bfloat16())


def fused_graph(emulate: bool):
    gm = trace(chain, *inputs())
    with inductor_config.patch(emulate_precision_casts=emulate):
        p = FusionPass()
        p(gm.graph)
    gm.recompile()
    (site,) = p.report.sites
    assert site.fused and site.variant == "allreduce_add_rmsnorm"
    (op,) = [n for n in gm.graph.nodes if n.op == "call_function" and "fusion_passes" in str(n.target)]
    return gm, op


def differing(a, b) -> int:
    return int((a != b).sum())


def test_default_precision_multiplies_the_weight_in_fp32_like_the_compiled_chain():
    gm, op = fused_graph(emulate=False)
    assert op.args[6] is True  # weight_in_fp32 (schema: input, residual, weight, eps, group, gemma, weight_in_fp32)
    args = inputs()
    with inductor_config.patch(emulate_precision_casts=False):
        torch._dynamo.reset()
        compiled_norm, compiled_sum = torch.compile(chain, dynamic=False)(*args)
    fused_norm, fused_sum = gm(*args)
    eager_norm, _ = chain(*args)
    assert torch.equal(fused_sum, compiled_sum)
    # Inductor's C++ mean reduces in another order than torch.mean: a few elements one ulp
    # apart (9 of 262144 measured at 64x4096); eager's rounding differs on a large fraction.
    assert differing(fused_norm, compiled_norm) <= T * H // 1000
    assert differing(eager_norm, compiled_norm) > 20 * max(1, differing(fused_norm, compiled_norm))


def test_emulated_casts_keep_eager_rounding():
    gm, op = fused_graph(emulate=True)
    assert op.args[6] is False
    args = inputs()
    fused_norm, fused_sum = gm(*args)
    eager_norm, eager_sum = chain(*args)
    assert torch.equal(fused_sum, eager_sum) and torch.equal(fused_norm, eager_norm)


def test_a_dialect_norm_op_keeps_its_own_rounding():
    """vLLM's IR norms define their rounding by the weight dtype; their output is the op
    or a getitem of it, not an aten node, and the setting leaves them alone."""
    import operator

    from fusion_passes.match import follow_inductor_precision
    from fusion_passes.recognize.roles import Norm

    g = torch.fx.Graph()
    x, w = g.placeholder("x"), g.placeholder("w")
    getitem = g.call_function(operator.getitem, (x, 0))
    mul = g.call_function(torch.ops.aten.mul.Tensor, (w, x))
    with inductor_config.patch(emulate_precision_casts=False):
        dialect = Norm(x, w, 1e-6, False, False, getitem, (getitem,))
        follow_inductor_precision(dialect)
        aten = Norm(x, w, 1e-6, False, False, mul, (mul,))
        follow_inductor_precision(aten)
    assert dialect.weight_in_fp32 is False and aten.weight_in_fp32 is True


def test_a_chain_carries_the_unrounded_stream_and_its_last_norm_reads_it():
    """Three sites whose sums feed only their norm and the next site's add (a decoder's
    residual stream), the last one read by its norm alone: under Inductor's default the
    compile never stores those sums (docs/design.md, "What Inductor keeps unrounded").
    Each op but the last returns its sum unrounded in fp32 to the next (carry_fp32), every
    norm reads the unrounded sum (residual_in_fp32), and the graph's value is the norm of
    the fp32 stream; with emulated casts nothing of this is set."""
    def stream(x0, x1, x2, res, w):
        h = all_reduce(x0) + res
        y0 = hf_rms_norm(h, w, 1e-6)
        h = all_reduce(x1 + y0) + h
        y1 = hf_rms_norm(h, w, 1e-6)
        h = all_reduce(x2 + y1) + h
        return hf_rms_norm(h, w, 1e-6)

    g = torch.Generator().manual_seed(0)
    args = [torch.randn(T, H, generator=g).bfloat16() for _ in range(4)] + [(torch.rand(H, generator=g) + 0.5).bfloat16()]
    for emulate in (False, True):
        gm = trace(stream, *args)
        with inductor_config.patch(emulate_precision_casts=emulate):
            p = FusionPass()
            p(gm.graph)
        gm.recompile()
        ops = [n for n in gm.graph.nodes if n.op == "call_function" and "fusion_passes" in str(n.target)]
        assert len(ops) == 3
        assert [n.kwargs.get("carry_fp32", False) for n in ops] == ([True, True, False] if not emulate else [False] * 3)
        assert [n.kwargs.get("residual_in_fp32", False) for n in ops] == [not emulate] * 3
    s = args[0].float() + args[3].float()  # the fp32 stream (the fake group's all-reduce is the identity)
    y = None
    for x in args[:3]:
        if y is not None:
            s = (x + y).float() + s
        y = (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6) * args[4]).bfloat16()
    gm = trace(stream, *args)
    with inductor_config.patch(emulate_precision_casts=False):
        FusionPass()(gm.graph)
    gm.recompile()
    assert torch.equal(gm(*args), y)


class _RoundedOnly:
    """A backend whose kernel rounds the sum and the quant input (as the vendor kernels do):
    it declines carry_fp32 and quant_unrounded and otherwise runs the reference's math."""

    name = "rounded_only"
    variants = frozenset({"add_rmsnorm", "add_rmsnorm_fp8_per_token"})

    def unsupported(self, call):
        return "rounds" if call.flags.carry_fp32 or call.flags.quant_unrounded else None

    def run(self, variant, args):
        from fusion_passes import backends

        return backends.get("reference").run(variant, args)


def test_where_no_backend_follows_the_compile_the_site_fuses_as_before():
    """A backend that computes neither carry_fp32 nor quant_unrounded still gets the site:
    selected without those flags (the sum and the quant input rounded), not left unfused."""
    from test_quant import VLLM_Q, needs_vllm  # noqa: F401

    if VLLM_Q is None:
        pytest.skip("needs vLLM 0.33 importable (VLLM_TARGET_DEVICE=cpu) for its native FP8 quant")
    from fusion_passes import backends

    def two_sites(x0, x1, res, w):
        h = all_reduce(x0) + res
        h = all_reduce(x1 + hf_rms_norm(h, w, 1e-6)) + h
        return VLLM_Q["token"].forward_native(hf_rms_norm(h, w, 1e-6))

    g = torch.Generator().manual_seed(1)
    args = [torch.randn(T, H, generator=g).bfloat16() for _ in range(3)] + [(torch.rand(H, generator=g) + 0.5).bfloat16()]
    backends.register("rounded_only", _RoundedOnly, before="reference")
    try:
        gm = trace(two_sites, *args)
        with inductor_config.patch(emulate_precision_casts=False):
            p = FusionPass(backend="rounded_only")
            p(gm.graph)
        assert [(s.variant, s.backend) for s in p.report.sites] == [
            ("allreduce_add_rmsnorm", "rounded_only"), ("allreduce_add_rmsnorm_fp8_per_token", "rounded_only")]
        ops = [n for n in gm.graph.nodes if n.op == "call_function" and "fusion_passes" in str(n.target)]
        assert not any(n.kwargs.get("carry_fp32") or n.kwargs.get("quant_unrounded") for n in ops)
    finally:
        backends.unregister("rounded_only")


@pytest.mark.parametrize("variant,params", [
    ("add_rmsnorm_fp8_per_token", {"scale_ub": None}),
    ("add_rmsnorm_fp8_per_group", {"group_size": 128, "ue8m0": False, "column_major": False, "amax_eps": 0.0,
                                   "scale_min": None}),
])
def test_a_dynamic_scale_reads_the_unrounded_amax_where_inductor_compiles_to_triton(variant, params):
    """Inductor's Triton code (GPU) takes a dynamic FP8 scale's amax from the unrounded norm
    value, its C++ code (CPU) from the rounded one (epilogue.amax_reads_unrounded; measured
    on an H100 and here). The epilogue computes both, and the reference backend picks by
    device; the Triton kernel's Q_RAW does the GPU's."""
    from fusion_passes import epilogue

    assert not epilogue.amax_reads_unrounded("cpu") and epilogue.amax_reads_unrounded("cuda")
    g = torch.Generator().manual_seed(3)
    y32 = torch.randn(16, 512, generator=g) * 3
    y = y32.to(torch.bfloat16)
    p = {**params, "fp8_dtype": torch.float8_e4m3fn}
    _, s_rounded = epilogue.quantize(variant, y, p, y32)
    q_raw, s_raw = epilogue.quantize(variant, y, p, y32, amax_unrounded=True)
    want_q, want_s = epilogue.QUANT[variant](y32, p)  # the variant's order on the unrounded value
    assert torch.equal(s_raw, want_s) and torch.equal(q_raw.view(torch.uint8), want_q.view(torch.uint8))
    assert torch.equal(s_rounded, epilogue.QUANT[variant](y, p)[1])
    assert (s_raw != s_rounded).float().mean() > 0.9  # bf16 rounding moves almost every amax
