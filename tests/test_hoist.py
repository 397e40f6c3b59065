"""Hoisting (fusion_passes.hoist): one test per legality rule and per blocker.

Graphs are make_fx traces under the fake process group (plain-PyTorch dialect:
``_c10d_functional.all_reduce`` + ``wait_tensor``); numerics run the graph before and
after the pass on simulated ranks (tests/ranks.py) and compare.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.testing import FileCheck

import fusion_passes
from fusion_passes import hoist
from fusion_passes.options import FusionOptions
from graphs import all_reduce, count, fp32_weight_rms_norm, hf_rms_norm, trace
from ranks import run_ranks

pytestmark = pytest.mark.usefixtures("fake_pg")

H = 64  # hidden size: a multiple of 8 as every backend wants
T = 5  # odd token count

AR = "_c10d_functional.all_reduce"
FUSED = "fusion_passes.allreduce_add_rmsnorm"


def tolerance(dtype: torch.dtype, world: int) -> dict:
    """Max difference allowed between the unfused and the hoisted graph.

    Hoisting reorders roundings: a scale moves before the sum (each rank's summand is
    rounded once more) and a merge sums ``(a0 + b0) + (a1 + b1)`` instead of
    ``(a0 + a1) + (b0 + b1)``. Each of the at most ``2 * world`` roundings is half an ulp of
    the running sum; RMSNorm divides by the row's rms (the same order as the sum), so the
    output moves by at most ``~2 * world * eps`` relative, plus one output rounding. Layout
    ops, negation and merges of exact sums are bit-exact; tests for those use ``exact``.
    """
    eps = torch.finfo(dtype).eps
    bound = (2 * world + 2) * eps
    return {"atol": 4 * bound, "rtol": bound}


def rank_inputs(args, world: int, seed: int = 0) -> list[list[torch.Tensor]]:
    """Per-rank inputs, different on every rank (see :func:`replicate`)."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(a.shape, generator=g).to(a.dtype) for a in args] for _ in range(world)]


def replicate(per_rank, positions):
    """Make the args at *positions* equal to rank 0's on every rank (replicated values)."""
    for ranks in per_rank[1:]:
        for i in positions:
            ranks[i] = per_rank[0][i].clone()
    return per_rank


def fuse(fn, args, *, replicated, world=2, exact=False, **options):
    """Trace *fn*, run the full FusionPass; assert lint + numerics; return (gm, report)."""
    gm = trace(fn, *args)
    ref = copy.deepcopy(gm)
    p = fusion_passes.FusionPass(**options)
    p(gm.graph)
    gm.graph.lint()
    gm.recompile()
    assert not p.report.errors, p.report.errors
    ranks = replicate(rank_inputs(args, world), replicated)
    want, got = run_ranks(ref, ranks), run_ranks(gm, ranks)
    for w, g in zip(want, got):
        for a, b in zip(w, g):
            if exact:
                torch.testing.assert_close(b, a, atol=0, rtol=0)
            else:
                torch.testing.assert_close(b, a, **tolerance(a.dtype, world))
    return gm, p.report


def bf16(*shape):
    return torch.randn(*shape, dtype=torch.bfloat16)


# ------------------------------------------------------------------ no-op and idempotence


def test_noop_when_all_reduce_already_feeds_the_add():
    """AR -> add(residual) -> norm: hoisting leaves the graph exactly as it was."""
    def f(x, res, w):
        return hf_rms_norm(all_reduce(x) + res, w),

    gm = trace(f, bf16(T, H), bf16(T, H), bf16(H))
    before = gm.code
    result = hoist.run(gm.graph, FusionOptions())
    gm.recompile()
    assert gm.code == before
    assert not result.changed and not result.stopped and not result.merged


def test_hoist_twice_changes_nothing_more():
    def f(x, res, w):
        y = (all_reduce(x) * 0.5).view(1, T, H)
        return hf_rms_norm(y + res, w),

    gm = trace(f, bf16(T, H), bf16(1, T, H), bf16(H))
    first = hoist.run(gm.graph, FusionOptions())
    gm.recompile()
    once = gm.code
    second = hoist.run(gm.graph, FusionOptions())
    gm.recompile()
    assert first.hoisted_over["all_reduce"] == ["aten.mul.Tensor", "aten.view.default"]
    assert gm.code == once and not second.changed


def test_hoist_option_off_leaves_scale_in_place():
    def f(x, res, w):
        return hf_rms_norm(all_reduce(x) * 0.4 + res, w),

    gm, report = fuse(f, [bf16(T, H), bf16(T, H), bf16(H)], replicated=[1, 2], hoist=False)
    assert count(gm, AR) == 1 and count(gm, FUSED) == 0
    (site,) = report.sites
    assert not site.fused and site.hoisted_over == [] and "mul" in site.reason


# --------------------------------------------------------------------------- each rule

LAYOUT_CASES = {
    # name: (chain after the all-reduce of a [T, H] value, residual shape, ops hoisted over)
    "view": (lambda y: y.view(1, T, H), (1, T, H), ["aten.view.default"]),
    "reshape": (lambda y: y.reshape(T, 1, H), (T, 1, H), ["aten.view.default"]),
    "unsqueeze_squeeze": (lambda y: y.unsqueeze(0).squeeze(0), (T, H),
                          ["aten.unsqueeze.default", "aten.squeeze.dim"]),
    "slice_tokens": (lambda y: y[1:], (T - 1, H), ["aten.slice.Tensor"]),
    "slice_padded_hidden": (lambda y: y[:, : H - 8], (T, H - 8), ["aten.slice.Tensor"]),
    "select": (lambda y: y.view(1, T, H)[0], (T, H), ["aten.view.default", "aten.select.int"]),
    "clone": (lambda y: y.clone(), (T, H), ["aten.clone.default"]),
    "permute_keeps_last": (lambda y: y.view(T, 1, H).permute(1, 0, 2), (1, T, H),
                           ["aten.view.default", "aten.permute.default"]),
    "transpose_leading": (lambda y: y.view(T, 1, H).transpose(0, 1), (1, T, H),
                          ["aten.view.default", "aten.transpose.int"]),
    "split_getitem": (lambda y: y.split([2, T - 2])[1], (T - 2, H),
                      ["aten.split_with_sizes.default", "getitem"]),
    "neg": (lambda y: -y, (T, H), ["aten.neg.default"]),
}


@pytest.mark.parametrize("case", sorted(LAYOUT_CASES))
def test_exact_rule_sinks_and_fuses(case):
    """Layout ops and negation: the all-reduce moves below them and fuses, bit-exact."""
    chain, res_shape, ops = LAYOUT_CASES[case]

    def f(x, res, w):
        return hf_rms_norm(chain(all_reduce(x)) + res, w),

    args = [bf16(T, H), bf16(*res_shape), bf16(res_shape[-1])]
    gm, report = fuse(f, args, replicated=[1, 2], exact=True)
    assert count(gm, AR) == 0 and count(gm, FUSED) == 1
    (site,) = report.sites
    assert site.fused and site.hoisted_over == ops


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("op", ["mul_scalar", "div_scalar", "mul_replicated", "mul_replicated_left"])
def test_scale_rule_sinks_and_fuses(op, dtype):
    """mul/div by a scalar or a replicated tensor: distributivity (within reordering tolerance)."""
    chains = {
        "mul_scalar": lambda y, s: y * 0.4,  # vLLM DeepSeek-V3 fp16: 1 / routed_scaling_factor
        "div_scalar": lambda y, s: y / 2.5,
        "mul_replicated": lambda y, s: y * s,  # s: [H], equal on every rank
        "mul_replicated_left": lambda y, s: s * y,
    }

    def f(x, res, w, s):
        return fp32_weight_rms_norm(chains[op](all_reduce(x), s) + res, w),

    args = [torch.randn(T, H, dtype=dtype) for _ in range(2)] + [torch.randn(H, dtype=dtype) for _ in range(2)]
    gm, report = fuse(f, args, replicated=[1, 2, 3], world=4)
    assert count(gm, AR) == 0 and count(gm, FUSED) == 1
    (site,) = report.sites
    assert site.fused and len(site.hoisted_over) == 1 and site.hoisted_over[0].startswith(("aten.mul", "aten.div"))


def test_qwen3_moe_chain_wait_reshape_add_norm():
    """HF Qwen3-MoE experts: all_reduce -> wait -> reshape -> add(residual) -> RMSNorm."""
    def f(x, res, w):
        return hf_rms_norm(all_reduce(x).reshape(1, T, H) + res, w),

    gm, report = fuse(f, [bf16(T, H), bf16(1, T, H), bf16(H)], replicated=[1, 2], exact=True)
    assert count(gm, AR) == 0 and count(gm, FUSED) == 1
    assert report.sites[0].hoisted_over == ["aten.view.default"]


def test_deepseek_moe_two_all_reduces_merge_into_one():
    """HF DeepSeek-V3 MoE: AR(routed), AR(shared), wait, reshape, wait, add, add(residual),
    RMSNorm -> ONE fused all-reduce; the merged-away one is reported as merged."""
    def f(routed, shared, res, w):
        a = all_reduce(routed).view(1, T, H)
        b = all_reduce(shared)
        return hf_rms_norm(res + (a + b.view(1, T, H)), w),

    gm = trace(f, bf16(T, H), bf16(T, H), bf16(1, T, H), bf16(H))
    assert count(gm, AR) == 2
    gm, report = fuse(f, [bf16(T, H), bf16(T, H), bf16(1, T, H), bf16(H)], replicated=[2, 3], world=4)
    assert count(gm, AR) == 0 and count(gm, FUSED) == 1
    FileCheck().check_count("aten.add.Tensor", 1, exactly=True).check(FUSED).run(gm.code)
    names = [s.all_reduce for s in report.sites]
    assert names == ["all_reduce", "all_reduce_1"]
    keep, gone = report.sites
    assert keep.fused and keep.reason is None
    assert keep.hoisted_over == ["aten.view.default", "aten.add.Tensor"]
    assert gone.fused and gone.variant == keep.variant
    assert gone.reason.startswith("merged into all-reduce all_reduce ")
    assert gone.hoisted_over == ["aten.view.default", "aten.add.Tensor"]


def test_three_all_reduces_and_sub_merge_into_one():
    """(AR(a) - AR(b)) + AR(c) -> AR(a - b + c): two collectives saved."""
    def f(a, b, c, res, w):
        return hf_rms_norm((all_reduce(a) - all_reduce(b)) + all_reduce(c) + res, w),

    gm, report = fuse(f, [bf16(T, H) for _ in range(4)] + [bf16(H)], replicated=[3, 4], world=3)
    assert count(gm, AR) == 0 and count(gm, FUSED) == 1
    assert [s.fused for s in report.sites] == [True, True, True]
    assert sorted(hoist_reasons(report)) == [
        "merged into all-reduce all_reduce (one collective for both sums); fused there"] * 2


def hoist_reasons(report):
    return [s.reason for s in report.sites if s.reason]


def test_padded_slice_before_all_reduce_fuses_as_is():
    """Padded FP8 GEMM output sliced BEFORE the all-reduce: nothing to hoist, fuses."""
    def f(x, res, w):
        return hf_rms_norm(all_reduce(x[:, :H]) + res, w),

    gm, report = fuse(f, [bf16(T, H + 16), bf16(T, H), bf16(H)], replicated=[1, 2], exact=True)
    assert count(gm, FUSED) == 1 and report.sites[0].hoisted_over == []


def test_cast_moves_only_with_hoist_casts():
    """fp32 all-reduce -> cast to bf16 -> residual add: stops by default (the cast changes
    the sum's precision); moves with hoist_casts=True (the sum then accumulates in bf16)."""
    def f(x, res, w):
        return hf_rms_norm(all_reduce(x).to(torch.bfloat16) + res, w),

    args = [torch.randn(T, H), bf16(T, H), bf16(H)]
    gm, report = fuse(f, args, replicated=[1, 2], exact=True)
    assert count(gm, AR) == 1 and count(gm, FUSED) == 0
    (site,) = report.sites
    assert "casts the all-reduce output" in site.reason and site.blocker == "_to_copy"
    gm, report = fuse(f, args, replicated=[1, 2], hoist_casts=True)
    assert count(gm, AR) == 0 and count(gm, FUSED) == 1
    assert report.sites[0].hoisted_over == ["aten._to_copy.default"]


# ------------------------------------------------------------------------------ blockers

BLOCKERS = {
    # name: (chain, residual shape, blocker op in the reason, node name in the reason)
    "nonlinear": (lambda y, p: torch.nn.functional.silu(y), (T, H), "aten.silu.default", "silu"),
    "reduction_over_hidden": (lambda y, p: y.sum(-1, keepdim=True), (T, 1), "aten.sum.dim_IntList", "sum_1"),
    "second_user": (lambda y, p: y * 2 + y.mean(), (T, H), "2 users", "wait_tensor"),
    "adds_a_scalar": (lambda y, p: y + 1.0, (T, H), "adds the scalar 1.0", "add"),
    "scale_by_partial": (lambda y, p: y * p, (T, H), "per-rank partial", "mul"),
    "divide_by_the_sum": (lambda y, p: 1.0 / y, (T, H), "aten.reciprocal.default", "reciprocal"),
    "permute_moves_hidden": (lambda y, p: y.permute(1, 0), (H, T), "moves the last (hidden) dim", "permute"),
    "expand": (lambda y, p: y.view(T, 1, H).expand(T, 2, H), (T, 2, H), "grow the tensor", "expand"),
}


@pytest.mark.parametrize("case", sorted(BLOCKERS))
def test_blocker_stops_hoisting_and_is_named(case):
    """The all-reduce stays where the blocker stands; the report names the blocker."""
    chain, res_shape, why, blocker = BLOCKERS[case]

    def f(x, p, res, w):
        s = x + p  # this rank's summand; s * 3 is derived from it, so also Partial
        return hf_rms_norm(chain(all_reduce(s), s * 3) + res, w),

    args = [bf16(T, H), bf16(T, H), bf16(*res_shape), bf16(res_shape[-1])]
    gm, report = fuse(f, args, replicated=[2, 3], exact=True)
    assert count(gm, AR) == 1 and count(gm, FUSED) == 0
    (site,) = report.sites
    assert not site.fused and why in site.reason and blocker in site.reason, site.reason
    assert site.blocker is not None


@pytest.mark.parametrize("case", ["nonlinear", "second_user", "permute_moves_hidden"])
def test_blocked_graph_comes_out_unchanged(case):
    """Negative: when the first op after the all-reduce blocks, the graph is unchanged."""
    chain, res_shape, _, _ = BLOCKERS[case]

    def f(x, res, w):
        return hf_rms_norm(chain(all_reduce(x), None) + res, w),

    gm = trace(f, bf16(T, H), bf16(*res_shape), bf16(res_shape[-1]))
    before = gm.code
    p = fusion_passes.FusionPass()
    p(gm.graph)
    gm.recompile()
    assert gm.code == before and p.report.sites[0].hoisted_over == []


def test_blocker_after_hoistable_ops_stops_there():
    """view, mul could move but silu stops the all-reduce, so the site cannot fuse: the
    moves are undone (they would change the sum's rounding for nothing), the graph comes
    out unchanged, and the reason names silu, not the view or the mul."""
    def f(x, res, w):
        y = torch.nn.functional.silu(all_reduce(x).view(1, T, H) * 0.5)
        return hf_rms_norm(y + res, w),

    gm = trace(f, bf16(T, H), bf16(1, T, H), bf16(H))
    before = gm.code
    gm, report = fuse(f, [bf16(T, H), bf16(1, T, H), bf16(H)], replicated=[1, 2], exact=True)
    (site,) = report.sites
    assert site.hoisted_over == [] and not site.fused
    assert site.reason.startswith("not fused, graph unchanged at this site: hoisting stopped at silu "
                                  "(aten.silu.default)"), site.reason
    assert gm.code == before
    FileCheck().check(AR).check("wait_tensor").check("aten.view").check("aten.mul.Tensor").check("aten.silu").run(
        gm.code)


def test_merge_partner_blocked_is_not_merged():
    """silu(AR(a)) + AR(b): AR(b) sees a replicated operand (the residual boundary) and
    stops; no merge, nothing fuses (the add feeds another add, not a norm)."""
    def f(a, b, res, w):
        return hf_rms_norm(torch.nn.functional.silu(all_reduce(a)) + all_reduce(b) + res, w),

    gm, report = fuse(f, [bf16(T, H) for _ in range(3)] + [bf16(H)], replicated=[2, 3], exact=True)
    assert count(gm, AR) == 2 and count(gm, FUSED) == 0
    assert "silu" in report.sites[0].reason


def test_moved_nodes_keep_consistent_meta():
    """Every node has meta['val']; a moved all-reduce's val matches its new input."""
    def f(x, res, w):
        return hf_rms_norm((-(all_reduce(x) * 2)).view(1, T, H) + res, w),

    gm = trace(f, bf16(T, H), bf16(1, T, H), bf16(H))
    hoist.run(gm.graph, FusionOptions())
    gm.graph.lint()
    for n in gm.graph.nodes:
        if n.op == "call_function":
            assert isinstance(n.meta.get("val"), torch.Tensor), n.name
    ar = next(n for n in gm.graph.nodes if "all_reduce" in n.name)
    assert tuple(ar.meta["val"].shape) == tuple(ar.args[0].meta["val"].shape) == (1, T, H)
    assert ar.meta["val"].dtype == torch.bfloat16


# ------------------------------------------------- moves that lead to no fused site (issue 16)


def _vllm_gemma_fp16(t, res, w):
    """vLLM GemmaRMSNorm.forward_static (vllm @00cba797 layers/layernorm.py) in fp16: the sum
    is taken and KEPT in fp32, a value the fused op does not return: this site cannot fuse."""
    x = t.float() + res.float()
    res = x
    x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + 1e-6)
    return (x * (1.0 + w.float())).to(torch.float16), res


def test_unfused_deepseek_scale_is_not_left_above_the_all_reduce():
    """DeepSeek fp16 scales the reduced value by 1/routed_scaling_factor (0.4) before its
    norm. The scale could move above the all-reduce, but this norm cannot fuse: the move is
    undone (scaling each rank's summand rounds differently from scaling the sum), the graph
    comes out unchanged, and the reason names the real blocker, not the cast."""
    def f(x, res, w):
        return _vllm_gemma_fp16(all_reduce(x) * (1.0 / 2.5), res, w)

    args = [torch.randn(T, H, dtype=torch.float16) for _ in range(2)] + [torch.randn(H, dtype=torch.float16)]
    gm = trace(f, *args)
    before = gm.code
    gm, report = fuse(f, args, replicated=[1, 2], exact=True)
    (site,) = report.sites
    assert not site.fused and site.hoisted_over == [] and gm.code == before
    assert site.reason.startswith("not fused, graph unchanged at this site: "), site.reason
    assert "outside the chain" in site.reason and "hoist_casts" not in site.reason, site.reason
    FileCheck().check(AR).check("wait_tensor").check("aten.mul.Tensor").run(gm.code)


def _gelu_chain(x, res, w):
    return hf_rms_norm(torch.nn.functional.gelu(all_reduce(x).float()).to(torch.bfloat16) + res, w),


@pytest.mark.parametrize("hoist_casts", [False, True])
def test_gelu_after_a_cast_is_the_reason(hoist_casts):
    """AR -> fp32 cast -> gelu -> add -> norm. With ``hoist_casts`` the cast moved above the
    all-reduce and stayed there although gelu then stopped it; without, the reason advised
    enabling hoist_casts. Now the move is undone and both name gelu."""
    args = [bf16(T, H), bf16(T, H), bf16(H)]
    gm = trace(_gelu_chain, *args)
    before = gm.code
    gm, report = fuse(_gelu_chain, args, replicated=[1, 2], exact=True, hoist_casts=hoist_casts)
    (site,) = report.sites
    assert not site.fused and site.hoisted_over == [] and gm.code == before
    assert "gelu" in site.reason and "enable hoist_casts" not in site.reason, site.reason
    assert site.blocker.startswith("gelu")
    if hoist_casts:
        assert site.reason.startswith("not fused, graph unchanged at this site: hoisting stopped at gelu")


def test_moves_that_fuse_are_kept():
    """The same scale before a norm that fuses stays hoisted (the DeepSeek case that fuses)."""
    def f(x, res, w):
        return hf_rms_norm(all_reduce(x) * 0.5 + res, w),

    gm, report = fuse(f, [bf16(T, H), bf16(T, H), bf16(H)], replicated=[1, 2])
    assert report.sites[0].fused and report.sites[0].hoisted_over == ["aten.mul.Tensor"]


def test_scale_from_the_summand_of_a_viewed_all_reduce_input_blocks():
    """``AR(view(s)) * s[0]``: the all-reduce reads a view of this rank's summand ``s``, so
    ``s`` and the row taken from it differ per rank: hoisting stops at the mul (moving it
    would sum ``s[0] * s`` over ranks instead of scaling the sum)."""
    def f(x, p, res, w):
        s = x + p
        y = all_reduce(s.view(1, T, H)).view(T, H)
        return hf_rms_norm(y * s[0] + res, w),

    gm, report = fuse(f, [bf16(T, H), bf16(T, H), bf16(T, H), bf16(H)], replicated=[2, 3], exact=True)
    assert count(gm, AR) == 1 and count(gm, FUSED) == 0
    (site,) = report.sites
    assert "per-rank partial" in site.reason and site.hoisted_over == [], site  # the view's move undone
