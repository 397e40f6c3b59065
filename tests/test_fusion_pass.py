"""Unit tests of the fusion pass on make_fx graphs under torch's fake process group.

Every test asserts exact op counts and, where the graph computes something, numerics on
simulated ranks (tests/ranks.py) against the unfused graph. The reference epilogue runs
the unfused math in the unfused order, so fused == unfused BIT FOR BIT here.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch.testing import FileCheck

import fusion_passes
from fusion_passes import FusionPass
from graphs import all_reduce, count, fp32_weight_rms_norm, gemma_rms_norm, hf_rms_norm, run_pass, trace
from ranks import run_ranks

pytestmark = pytest.mark.usefixtures("fake_pg")

T, H = 5, 64  # odd token count on purpose
BF16 = torch.bfloat16


def rand(*shape, dtype=BF16):
    return torch.randn(*shape, dtype=dtype)


def assert_same_numerics(before, after, args, world=2):
    ranks = [[a + 0.25 * r if a.dim() == 2 else a for a in args] for r in range(world)]
    want, got = run_ranks(before, ranks), run_ranks(after, ranks)
    for w_rank, g_rank in zip(want, got):
        for w, g in zip(w_rank, g_rank):
            torch.testing.assert_close(g, w, rtol=0, atol=0)  # same math, same order: exact


def decoder_layer(x_attn, x_mlp, residual, w1, w2):
    """Two blocks of a decoder layer: attn AR -> add -> norm, mlp AR -> add -> norm."""
    h = all_reduce(x_attn) + residual
    normed = hf_rms_norm(h, w1)
    h2 = h + all_reduce(x_mlp * normed)
    return hf_rms_norm(h2, w2), h2


def test_decoder_layer_fuses_both_blocks():
    args = (rand(T, H), rand(T, H), rand(T, H), rand(H), rand(H))
    gm = trace(decoder_layer, *args)
    before, report = run_pass(gm)
    assert count(gm, "_c10d_functional.all_reduce") == 0
    assert count(gm, "_c10d_functional.wait_tensor") == 0
    assert count(gm, "fusion_passes.allreduce_add_rmsnorm") == 2
    FileCheck().check_not("aten.rsqrt").check_not("aten.pow").run(gm.code)
    assert [s.variant for s in report.sites] == ["allreduce_add_rmsnorm", "allreduce_add_rmsnorm"]
    assert all(s.backend == "reference" and s.reason is None for s in report.sites)
    assert_same_numerics(before, gm, args)


@pytest.mark.parametrize(
    "norm, w_fp32",
    [(hf_rms_norm, False), (fp32_weight_rms_norm, True), (gemma_rms_norm, True)],
    ids=["hf-weight-after-cast", "weight-in-fp32", "gemma"],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_norm_forms(norm, w_fp32, dtype):
    def f(x, res, w):
        return norm(all_reduce(x) + res, w, 1e-5)

    args = (rand(T, H, dtype=dtype), rand(T, H, dtype=dtype), rand(H, dtype=dtype))
    gm = trace(f, *args)
    before, report = run_pass(gm)
    assert count(gm, "fusion_passes.allreduce_add_rmsnorm") == 1, report.table()
    node = next(n for n in gm.graph.nodes if "allreduce_add_rmsnorm" in str(n.target))
    assert node.args[3] == 1e-5
    assert node.args[5] == (norm is gemma_rms_norm)
    if dtype != torch.float32:
        assert node.args[6] == w_fp32
    assert report.sites[0].variant == "allreduce_add_rmsnorm_final"  # the sum is not reused
    assert_same_numerics(before, gm, args)


def test_functional_rms_norm_form():
    def f(x, res, w):
        return torch.nn.functional.rms_norm(all_reduce(x) + res, (H,), w, 1e-6)

    args = (rand(T, H), rand(T, H), rand(H))
    gm = trace(f, *args)
    before, report = run_pass(gm)
    assert count(gm, "fusion_passes.allreduce_add_rmsnorm") == 1, f"{report.table()}\n{before.code}"
    assert_same_numerics(before, gm, args)


def test_no_residual_and_reduced_value_reused():
    """Embedding-style: AR -> norm, and the reduced value is also the next residual."""

    def f(x, w):
        h = all_reduce(x)
        return hf_rms_norm(h, w), h * 2

    args = (rand(T, H), rand(H))
    gm = trace(f, *args)
    before, report = run_pass(gm)
    assert count(gm, "fusion_passes.allreduce_add_rmsnorm") == 1
    assert count(gm, "_c10d_functional.all_reduce") == 0
    assert report.sites[0].variant == "allreduce_rmsnorm"
    assert_same_numerics(before, gm, args)


def test_epsilon_is_any_value():
    for eps in (1e-5, 1e-6, 3.3e-7):
        gm = trace(lambda x, r, w: hf_rms_norm(all_reduce(x) + r, w, eps), rand(T, H), rand(T, H), rand(H))
        run_pass(gm)
        node = next(n for n in gm.graph.nodes if "allreduce_add_rmsnorm" in str(n.target))
        assert node.args[3] == eps


# --------------------------------------------------------------------- must not fire


def _unchanged(fn, *args, reason: str):
    gm = trace(fn, *args)
    code = gm.code
    _, report = run_pass(gm)
    assert gm.code == code, "the graph must come out unchanged"
    assert len(report.sites) >= 1 and not report.sites[0].fused
    assert reason in report.sites[0].reason, report.sites[0].reason
    return report


def test_second_user_of_all_reduce_blocks():
    def f(x, res, w):
        y = all_reduce(x)
        return hf_rms_norm(y + res, w), y * 3

    report = _unchanged(f, rand(T, H), rand(T, H), rand(H), reason="a second user blocks")
    assert "mul" in report.sites[0].reason


def test_nonlinear_op_between_blocks():
    report = _unchanged(lambda x, r, w: hf_rms_norm(torch.relu(all_reduce(x)) + r, w),
                        rand(T, H), rand(T, H), rand(H), reason="relu")
    assert report.sites[0].blocker.startswith("relu")


def test_add_of_a_bias_is_not_a_residual():
    _unchanged(lambda x, b, w: hf_rms_norm(all_reduce(x) + b, w), rand(T, H), rand(H), rand(H),
               reason="broadcast add")


def test_norm_over_the_wrong_dim():
    def f(x, r, w):
        h = (all_reduce(x) + r).float()
        h = h * torch.rsqrt(h.pow(2).mean(0, keepdim=True) + 1e-6)
        return w * h.to(BF16)

    _unchanged(f, rand(T, H), rand(T, H), rand(H), reason="RMSNorm needs the last dim")


def test_non_sum_all_reduce():
    import torch.distributed as dist

    def f(x, r, w):
        y = torch.ops._c10d_functional.all_reduce(x, "max", dist.group.WORLD.group_name)
        return hf_rms_norm(torch.ops._c10d_functional.wait_tensor(y) + r, w)

    _unchanged(f, rand(T, H), rand(T, H), rand(H), reason="only 'sum' fuses")


def test_graph_without_collectives_is_untouched():
    gm = trace(lambda x, w: hf_rms_norm(x, w), rand(T, H), rand(H))
    code = gm.code
    _, report = run_pass(gm)
    assert gm.code == code and report.sites == []


# ------------------------------------------------------------------ crash safety, uuid


def test_internal_error_leaves_graph_unchanged_and_warns(caplog, monkeypatch):
    from fusion_passes import fusion_pass

    def fail(*args):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(fusion_pass, "rewrite", fail)  # the rewrite step fails on the first site
    gm = trace(decoder_layer, rand(T, H), rand(T, H), rand(T, H), rand(H), rand(H))
    code = gm.code
    with caplog.at_level(logging.WARNING, logger="fusion_passes"):
        _, report = run_pass(gm)
    assert gm.code == code
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "graph left unchanged" in warnings[0].getMessage()
    assert len(report.errors) == 1 and not report.fused
    assert all(s.reason == "pass failed: graph unchanged" for s in report.sites)


def test_failure_after_partial_rewrite_restores_graph(monkeypatch):
    """The second rewrite fails after the first mutated the graph: all of it is undone."""
    from fusion_passes import fusion_pass, rewrite

    calls = []

    def flaky(graph, site, fake_vals, backend):
        calls.append(site)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return rewrite.rewrite(graph, site, fake_vals, backend)

    monkeypatch.setattr(fusion_pass, "rewrite", flaky)
    args = (rand(T, H), rand(T, H), rand(T, H), rand(H), rand(H))
    gm = trace(decoder_layer, *args)
    code = gm.code
    before, report = run_pass(gm)
    assert len(calls) == 2 and gm.code == code and "boom" in report.errors[0]
    assert_same_numerics(before, gm, args)


def test_uuid_depends_on_options():
    a, b = FusionPass(), FusionPass()
    assert a.uuid() == b.uuid()
    assert FusionPass(backend="reference").uuid() != a.uuid()
    assert FusionPass(hoist=False).uuid() != a.uuid()
    assert FusionPass(hoist_casts=True).uuid() != a.uuid()


def test_bad_option_is_a_clear_error():
    with pytest.raises(TypeError):
        FusionPass(no_such_option=1)
    with pytest.raises(ValueError, match="backend"):
        FusionPass(backend="")


def test_install_chains_and_uninstall_restores():
    from torch._inductor import config

    old = config.post_grad_custom_post_pass
    seen = []

    class Mine(fusion_passes._compat.CustomGraphPass):
        def __call__(self, g):
            seen.append(g)

        def uuid(self):
            return "mine"

    config.post_grad_custom_post_pass = Mine()
    try:
        with fusion_passes.enabled() as p:
            installed = config.post_grad_custom_post_pass
            assert isinstance(installed, fusion_passes.registration.ChainedPass)
            gm = trace(decoder_layer, rand(T, H), rand(T, H), rand(T, H), rand(H), rand(H))
            installed(gm.graph)
            assert len(seen) == 1 and len(p.report.fused) == 2
            assert installed.uuid() not in (None, "mine", p.uuid())
        assert isinstance(config.post_grad_custom_post_pass, Mine)
    finally:
        config.post_grad_custom_post_pass = old
    with pytest.raises(RuntimeError, match="nothing installed"):
        fusion_passes.uninstall()


def test_gpu_site_with_only_the_reference_backend_stays_unfused(monkeypatch):
    """On a GPU the reference backend is the unfused chain run eagerly inside one op, slower
    than Inductor's compiled chain: with ``backend="auto"`` such a site is left as it is and
    the report names why each kernel backend declined. The device is the one thing faked:
    this machine has no GPU. Hidden 32768 is past the triton kernel's one-row-in-registers
    limit, flashinfer is not installed here and aiter wants ROCm: every kernel declines."""
    from fusion_passes import match

    monkeypatch.setattr(match.backends, "device_kind", lambda device: "cuda")
    big = 32768
    args = (rand(T, big), rand(T, big), rand(T, big), rand(big), rand(big))
    gm = trace(decoder_layer, *args)
    _, report = run_pass(gm)
    assert count(gm, "_c10d_functional.all_reduce") == 2
    assert count(gm, "fusion_passes.allreduce_add_rmsnorm") == 0
    assert len(report.unfused) == 2
    for site in report.unfused:
        assert "no fused kernel runs add_rmsnorm on cuda here" in site.reason, site.reason
        assert "triton:" in site.reason and "aiter:" in site.reason and "flashinfer:" in site.reason
    # forcing the reference backend is the user's explicit choice: then it fuses
    gm = trace(decoder_layer, *args)
    _, report = run_pass(gm, backend="reference")
    assert count(gm, "fusion_passes.allreduce_add_rmsnorm") == 2


def test_a_recognized_chain_no_backend_runs_names_the_backend_not_the_hoist_stop():
    """SGLang's native fp32 residual add: hoisting stops at the cast (casts stay unless
    hoist_casts), recognition by meaning still reads the chain. When the chosen backend
    then cannot run it, the report says so, not where hoisting stopped."""
    from spellings import sources as S

    def chain(x, res, w):
        return S.sglang_forward_native(all_reduce(x), res, w)

    gm = trace(chain, rand(8, 256), rand(8, 256), rand(256))
    auto = FusionPass()
    auto(trace(chain, rand(8, 256), rand(8, 256), rand(256)).graph)
    assert auto.report.sites[0].fused, auto.report.table()  # the chain is read on the CPU
    _, report = run_pass(gm, backend="triton")  # no CUDA here: triton cannot run it
    (site,) = report.sites
    assert not site.fused and "backend 'triton' cannot run" in site.reason, report.table()
