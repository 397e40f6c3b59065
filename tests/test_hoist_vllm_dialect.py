"""Hoisting in the vLLM dialect: ``vllm.all_reduce`` (no wait) and ``vllm_ir`` norms.

The chain is the one vLLM 0.33 traces for DeepSeek-V3 in fp16 after attention and dense
MLPs: ``vllm.all_reduce -> mul(0.4) -> vllm_ir.fused_add_rms_norm`` (0.4 is
1 / routed_scaling_factor). Built with make_fx on vLLM's real registered ops.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("vllm", reason="needs vLLM installed (the vllm extra)")
pytestmark = [pytest.mark.vllm, pytest.mark.usefixtures("fake_pg")]

import vllm.distributed.parallel_state  # noqa: E402,F401  (registers torch.ops.vllm.all_reduce)
import vllm.ir.ops  # noqa: E402,F401  (registers torch.ops.vllm_ir.*)

import fusion_passes  # noqa: E402
from graphs import count, trace  # noqa: E402
from ranks import run_ranks  # noqa: E402

T, H = 5, 64
GROUP = "tp:0"


def vllm_ar(x):
    return torch.ops.vllm.all_reduce.default(x, GROUP)


def fused_add_rms_norm(x, res, w):
    out, res_out = torch.ops.vllm_ir.fused_add_rms_norm.default(x, res, w, 1e-6)
    return out, res_out


def run(fn, args, world=2):
    gm = trace(fn, *args)
    ref = copy.deepcopy(gm)
    p = fusion_passes.FusionPass()
    p(gm.graph)
    gm.graph.lint()
    gm.recompile()
    assert not p.report.errors, p.report.errors
    g = torch.Generator().manual_seed(0)
    ranks = [[torch.randn(a.shape, generator=g).to(a.dtype) for a in args] for _ in range(world)]
    for r in ranks[1:]:  # residual and weight are replicated
        r[1:] = [a.clone() for a in ranks[0][1:]]
    return gm, ref, p.report, ranks


def test_deepseek_fp16_scale_between_all_reduce_and_fused_add_rms_norm():
    def f(x, res, w):
        return fused_add_rms_norm(vllm_ar(x) * 0.4, res, w)

    args = [torch.randn(T, H, dtype=torch.float16) for _ in range(2)] + [torch.randn(H, dtype=torch.float16)]
    gm, ref, report, ranks = run(f, args, world=4)
    assert count(gm, "vllm.all_reduce") == 0 and count(gm, "fusion_passes.allreduce_add_rmsnorm") == 1
    (site,) = report.sites
    assert site.fused and site.hoisted_over == ["aten.mul.Tensor"]
    for w, g in zip(run_ranks(ref, ranks), run_ranks(gm, ranks)):
        for a, b in zip(w, g):
            # fp16: the scale moves before the 4-rank sum (one more rounding per rank, and
            # the sum's 3 roundings in another order); the norm carries relative error
            # through: (2 * world + 2) fp16 ulps
            eps = torch.finfo(torch.float16).eps
            torch.testing.assert_close(b, a, atol=4 * 10 * eps, rtol=10 * eps)


def test_second_user_after_the_scale_blocks_fusion_not_the_move():
    """An EAGLE-style hidden-state tap reads the scaled sum. Moving the all-reduce below
    the mul would be exact in real arithmetic, but the sum then has two users, so the site
    cannot fuse: the move is undone (it would only change the rounding), the graph comes
    out unchanged, and the report says why."""
    def f(x, res, w):
        y = vllm_ar(x) * 0.4
        return (*fused_add_rms_norm(y, res, w), y)

    args = [torch.randn(T, H, dtype=torch.float16) for _ in range(2)] + [torch.randn(H, dtype=torch.float16)]
    gm, ref, report, ranks = run(f, args)
    assert count(gm, "vllm.all_reduce") == 1 and count(gm, "fusion_passes.allreduce_add_rmsnorm") == 0
    (site,) = report.sites
    assert not site.fused and site.hoisted_over == [] and gm.code == ref.code
    assert site.reason.startswith("not fused, graph unchanged at this site: ")
    assert "a second user blocks fusion" in site.reason
    for w, g in zip(run_ranks(ref, ranks), run_ranks(gm, ranks)):
        for a, b in zip(w, g):
            torch.testing.assert_close(b, a, atol=0, rtol=0)  # the same graph
