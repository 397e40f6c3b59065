"""Property tests for hoisting: random chains between an all-reduce and add + RMSNorm.

Hypothesis draws a chain of hoistable ops (any order, 0-6 of them), optional merges with
a second all-reduce, an optional blocker at a random position, dtype, shape (odd token
counts included), world size 2-8, the dialect (``_c10d_functional`` or vLLM's
``vllm.all_reduce``, with aten or ``vllm_ir`` norms) and the side of the residual add.
Blockers include a merge with an all-reduce of ANOTHER process group (must be refused) and a
scale by a per-rank value shaped like a weight (derived from a partial sum: it looks
replicated and is not). Each example builds the aten graph (as make_fx / Inductor would emit
it, tests/hoist_plans.py), runs the FusionPass, and evaluates both graphs on simulated ranks.

CI runs the derandomized "ci" profile: ``max_examples`` below add up to 1,000 examples. Soak: ``make soak`` (HYPOTHESIS_PROFILE=soak, 20,000 per test).
"""

from __future__ import annotations

import copy
import operator

import pytest
import torch
from hypothesis import assume, given, settings

import fusion_passes
from fusion_passes import hoist
from fusion_passes.options import FusionOptions
from fusion_passes.recognize.fx import op_name
from graphs import count
from hoist_plans import AR_OP, DIALECTS, Plan, Tracer, aten, build, plans
from ranks import run_ranks

pytestmark = pytest.mark.usefixtures("fake_pg")


FUSED = "fusion_passes.allreduce_add_rmsnorm"
# what the report's reason must say for each blocker (the op that stopped the all-reduce)
BLOCKER_REASON = {
    "silu": "aten.silu.default",
    "add_scalar": "adds the scalar",
    "second_user": "a second user blocks hoisting",
    "cast": "casts the all-reduce output",
    "merge_other_group": "adds all-reduces of two groups",
    "mul_partial": "a per-rank partial value (not replicated across ranks)",
}
BLOCKER_NODE = {  # the op of the node the report names as the blocker
    "silu": "aten.silu.default",
    "add_scalar": "aten.add.Tensor",
    "second_user": "_c10d_functional.wait_tensor.default",
    "cast": "prims.convert_element_type.default",
    "merge_other_group": "aten.add.Tensor",
    "mul_partial": "aten.mul.Tensor",
}


def tolerance(plan: Plan) -> dict:
    """Unfused vs hoisted, in ulps of the output: ``N * eps`` relative (eps = one ulp at 1.0,
    ``torch.finfo(dtype).eps``) and ``5 * N * eps`` absolute, with

        N = world * (merges + 1) + scales + 2.

    Derivation. Hoisting reorders roundings only (fusion_passes/hoist.py). Each all-reduced
    operand is a sum over ``world`` ranks; a merge adds the sums of ``merges + 1`` operands
    as ``(a0 + b0) + (a1 + b1)`` instead of ``(a0 + a1) + (b0 + b1)``: both orders take
    ``world * (merges + 1) - 1`` additions, each off by at most half an ulp of its running
    value, so the two results differ by at most ``world * (merges + 1) - 1`` ulps of it.
    A scale moved before the sum rounds every summand once more: one more ulp per moved
    scale (``scales``). RMSNorm is scale-invariant, so these relative errors carry to its
    output (the partial sums here are N(0, 1) draws: the running value stays within a small
    factor of the total), which both graphs round once more (1 ulp each: the ``+ 2``). The
    absolute term covers elements that cancel to near zero: the same ulps of a unit-rms
    value times the largest weight (``|w| < 5`` for the normal weights drawn here). For bf16
    at world 8 with 3 merges this is N = 34 ulps, rtol 0.27: the bf16 sum itself is that
    coarse, and the fp32 and fp16 draws check the same reorderings 2^16 and 2^3 times finer.
    """
    eps = torch.finfo(plan.dtype).eps
    merges = plan.ops.count("merge")
    scales = sum(plan.ops.count(o) for o in ("mul_scalar", "div_scalar", "mul_replicated"))
    ulps = plan.world * (merges + 1) + scales + 2
    return {"rtol": ulps * eps, "atol": 5 * ulps * eps}


def run_pass(gm, **options):
    p = fusion_passes.FusionPass(**options)
    p(gm.graph)
    gm.graph.lint()
    gm.recompile()
    assert not p.report.errors, p.report.errors
    return p.report


@settings(max_examples=700)
@given(plan=plans())
def test_property_hoisting_numerics_fusion_idempotence(plan):
    """Numerics equal to the unfused graph; fused exactly when no blocker stands between;
    the blocker named in the report; a blocked chain comes out unchanged (its moves and
    merges undone); running the passes a second time changes nothing more."""
    gm, per_rank, b = build(plan)
    check_plan(plan, gm, per_rank, b)


def _plan(ops, blocker, dialect="c10d", **kw):
    return Plan(dtype=torch.bfloat16, tokens=3, hidden=16, world=2, ops=ops, blocker=blocker,
                blocker_at=len(ops), hf_norm=False, seed=7, dialect=dialect, **kw)


EXAMPLES = {  # the new generators' cases, pinned (fast, and what tests/mutants.py runs)
    "merge_across_two_c10d_groups": _plan(["merge"], "merge_other_group"),
    "merge_across_two_vllm_groups": _plan([], "merge_other_group", "vllm", vllm_ir_norm=False),
    "scale_by_a_summand_row_after_a_view": _plan(["view3d"], "mul_partial"),
    "scale_by_a_summand_row_after_a_moved_scale": _plan(["mul_replicated"], "mul_partial"),
    "residual_on_the_left_vllm_ir_norm": _plan(["mul_scalar"], None, "vllm", residual_left=True, vllm_ir_norm=True),
}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_pinned_example(name):
    plan = EXAMPLES[name]
    if plan.dialect not in DIALECTS:
        pytest.skip("needs vLLM (the vllm extra): its all_reduce and vllm_ir ops")
    gm, per_rank, b = build(plan)
    check_plan(plan, gm, per_rank, b)
    hoisted, _, _ = build(plan)  # hoisting alone (no rollback of moves that fuse nothing) is idempotent
    hoist.run(hoisted.graph, FusionOptions())
    hoisted.recompile()
    once = hoisted.code
    again = hoist.run(hoisted.graph, FusionOptions())
    hoisted.recompile()
    assert hoisted.code == once and not again.changed


def check_plan(plan: Plan, gm, per_rank, b) -> None:
    """The property's assertions for one built plan."""
    ref = copy.deepcopy(gm)
    merges = plan.ops.count("merge")
    AR = AR_OP[plan.dialect]
    assert count(gm, AR) == 1 + merges + b.other_group_ars
    report = run_pass(gm)

    want, got = run_ranks(ref, per_rank), run_ranks(gm, per_rank)
    for w, g in zip(want, got):
        for a, c in zip(w, g):
            torch.testing.assert_close(c, a, **tolerance(plan))

    first = next(s for s in report.sites if s.all_reduce == b.first)
    if plan.blocker is None:
        assert count(gm, FUSED) == 1 and count(gm, AR) == 0
        assert first.fused and first.reason is None
        assert all(s.fused for s in report.sites) and len(report.sites) == 1 + merges
    else:  # the site cannot fuse: every move and merge toward it is undone
        assert count(gm, FUSED) == 0 and gm.code == ref.code
        assert count(gm, AR) == 1 + merges + b.other_group_ars
        assert not first.fused and first.hoisted_over == []
        assert first.reason.startswith("not fused, graph unchanged at this site: ") or not any(
            s.hoisted_over for s in report.sites), first.reason
        assert BLOCKER_REASON[plan.blocker] in first.reason, first.reason
        node = next(n for n in gm.graph.nodes if n.name == first.blocker)
        want = "vllm.all_reduce.default" if (plan.blocker, plan.dialect) == ("second_user", "vllm") else \
            BLOCKER_NODE[plan.blocker]  # vLLM's all-reduce has no wait_tensor: it is the value read twice
        assert op_name(node.target) == want
    applied = len([o for o in first.hoisted_over if o != "getitem"])
    assert applied <= len(plan.ops) + 1  # + the clone of a non-contiguous flatten

    once = gm.code
    if plan.blocker is None:  # nothing is left to move
        again = hoist.run(gm.graph, FusionOptions())
        gm.recompile()
        assert gm.code == once and not again.changed
    report = run_pass(gm)
    assert gm.code == once and not any(s.fused for s in report.sites)


@settings(max_examples=300)
@given(plan=plans())
def test_property_deterministic(plan):
    """The same input graph gives the same output graph and the same report."""
    gm, _, b = build(plan)
    twin = copy.deepcopy(gm)
    first, second = run_pass(gm), run_pass(twin)
    assert gm.code == twin.code
    assert first.to_dict() == second.to_dict()


@pytest.mark.skipif("vllm" not in DIALECTS, reason="needs vLLM (the vllm extra): its all_reduce and vllm_ir ops")
def test_aten_residual_add_into_vllm_fused_add_rms_norm():
    """``AR(z) + AR(x)`` (the second all-reduce's residual add) feeding fused_add_rms_norm:
    two residual adds. Either fused correctly or left unfused, never an internal error."""
    t = Tracer()
    y = t.all_reduce(t.input("partial", (1, 8), torch.bfloat16), "vllm")
    s = t(aten.add.Tensor, y, t.all_reduce(t.input("partial", (1, 8), torch.bfloat16), "vllm"))
    out = t(torch.ops.vllm_ir.fused_add_rms_norm.default, s, t.input("replicated", (1, 8), torch.bfloat16),
            t.input("replicated", (8,), torch.bfloat16), 1e-6)
    gm = t.gm([t(operator.getitem, out, 0), t(operator.getitem, out, 1)])
    report = run_pass(gm, hoist=False)
    assert [s.fused for s in report.sites] == [False, False]
    assert all("two residual adds" in s.reason for s in report.sites), report.table()
