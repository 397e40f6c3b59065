"""Property tests for hoisting: random chains between an all-reduce and add + RMSNorm.

Hypothesis draws a chain of hoistable ops (any order, 0-6 of them), optional merges with
a second all-reduce, an optional blocker at a random position, dtype, shape (odd token
counts included) and world size 2-8. Each example builds the aten graph (as make_fx / Inductor
would emit it, see :class:`Tracer`), runs the FusionPass, and evaluates both graphs on
simulated ranks.

CI runs the derandomized "ci" profile: ``max_examples`` below add up to 1,000 examples. Soak: ``make soak`` (HYPOTHESIS_PROFILE=soak, 20,000 per test).
"""

from __future__ import annotations

import copy
import dataclasses
import operator

import pytest
import torch
from hypothesis import given, settings, strategies as st

import fusion_passes
from fusion_passes import hoist
from fusion_passes.options import FusionOptions
from fusion_passes._compat import FakeTensorMode
from fusion_passes.recognize import target_name
from graphs import count, group_name
from ranks import run_ranks

pytestmark = pytest.mark.usefixtures("fake_pg")

aten, c10d = torch.ops.aten, torch.ops._c10d_functional
CONVERT = torch.ops.prims.convert_element_type.default
Node = torch.fx.Node

AR = "_c10d_functional.all_reduce"
FUSED = "fusion_passes.allreduce_add_rmsnorm"

# hoistable ops: each maps (value, state) -> value and is skipped when the shape rules it out
HOISTABLE = ("view3d", "flatten", "unsqueeze", "squeeze", "slice_tokens", "slice_hidden", "select",
             "clone", "permute", "neg", "mul_scalar", "div_scalar", "mul_replicated", "split", "merge")
BLOCKERS = ("silu", "add_scalar", "second_user", "cast")
# what the report's reason must say for each blocker (the op that stopped the all-reduce)
BLOCKER_REASON = {
    "silu": "aten.silu.default",
    "add_scalar": "adds the scalar",
    "second_user": "a second user blocks hoisting",
    "cast": "casts the all-reduce output",
}
BLOCKER_NODE = {  # the op of the node the report names as the blocker
    "silu": "aten.silu.default",
    "add_scalar": "aten.add.Tensor",
    "second_user": "_c10d_functional.wait_tensor.default",
    "cast": "prims.convert_element_type.default",
}


@dataclasses.dataclass
class Plan:
    """One drawn example: everything needed to rebuild the graph and its inputs."""

    dtype: torch.dtype
    tokens: int
    hidden: int
    world: int
    ops: list[str]
    blocker: str | None
    blocker_at: int
    hf_norm: bool
    seed: int

    def steps(self) -> list[str]:
        steps = list(self.ops)
        if self.blocker is not None:
            steps.insert(min(self.blocker_at, len(steps)), "!" + self.blocker)
        return steps


@st.composite
def plans(draw, max_ops: int = 6):
    """A chain of 0-6 hoistable ops, merges included, with an optional blocker."""
    return Plan(
        dtype=draw(st.sampled_from([torch.bfloat16, torch.float16, torch.float32])),
        tokens=draw(st.integers(1, 9)),
        hidden=draw(st.sampled_from([8, 16, 24, 64])),
        world=draw(st.integers(2, 8)),
        ops=draw(st.lists(st.sampled_from(HOISTABLE), min_size=0, max_size=max_ops)),
        blocker=draw(st.none() | st.sampled_from(BLOCKERS)),
        blocker_at=draw(st.integers(0, max_ops)),
        hf_norm=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


class Tracer:
    """Builds a post-grad-style aten graph node by node, ``meta['val']`` included.

    All examples share ONE fake mode so its dispatch cache stays warm: make_fx per example
    (a fresh fake mode and proxy machinery each time) was about 3x slower, too slow for
    1,000 examples in CI. The ops are the ones make_fx / Inductor emit for the same code
    (``prims.convert_element_type`` for casts, as in post-grad graphs).
    """

    mode = FakeTensorMode()

    def __init__(self):
        self.graph = torch.fx.Graph()
        self.inputs: list[tuple[str, tuple, torch.dtype]] = []  # (kind, shape, dtype)

    def input(self, kind: str, shape, dtype) -> Node:
        node = self.graph.placeholder(f"in{len(self.inputs)}")
        with self.mode:
            node.meta["val"] = torch.empty(tuple(shape), dtype=dtype)
        self.inputs.append((kind, tuple(shape), dtype))
        return node

    def __call__(self, op, *args, **kwargs) -> Node:
        node = self.graph.call_function(op, args, kwargs)
        fake = torch.fx.node.map_arg((args, kwargs), lambda n: n.meta["val"])
        with self.mode:
            node.meta["val"] = op(*fake[0], **fake[1])
        return node

    def all_reduce(self, x: Node) -> Node:
        """all_reduce + wait_tensor; vals as their meta impls give them (contiguous), set
        directly: the collectives' fake dispatch is uncached and slow."""
        ar = self.graph.call_function(c10d.all_reduce.default, (x, "sum", group_name()))
        wait = self.graph.call_function(c10d.wait_tensor.default, (ar,))
        with self.mode:
            ar.meta["val"] = torch.empty_like(x.meta["val"], memory_format=torch.contiguous_format)
            wait.meta["val"] = torch.empty_like(ar.meta["val"])
        return wait

    def gm(self, outputs) -> torch.fx.GraphModule:
        self.graph.output(tuple(outputs))
        return torch.fx.GraphModule(torch.nn.Module(), self.graph)


def shape(n: Node) -> tuple:
    return tuple(n.meta["val"].shape)


class Builder:
    """Applies a plan's steps to the all-reduce's value, then residual add + RMSNorm."""

    def __init__(self, plan: Plan):
        self.plan, self.t = plan, Tracer()
        self.merges_after_blocker = 0
        self.taps: list[Node] = []

    def build(self) -> torch.fx.GraphModule:
        t, dt = self.t, self.plan.dtype
        y = t.all_reduce(t.input("partial", (self.plan.tokens, self.plan.hidden), dt))
        self.first = y.args[0].name  # the chain's own all-reduce (merge partners come later)
        blocked = False
        for step in self.plan.steps():
            if step.startswith("!"):
                y, blocked = self.block(step[1:], y), True
            else:
                y = self.apply(step, y, blocked)
        res = t.input("replicated", shape(y), dt)
        w = t.input("replicated", shape(y)[-1:], dt)
        return t.gm([self.norm(t(aten.add.Tensor, y, res), w), *self.taps])

    def block(self, kind: str, y: Node) -> Node:
        t = self.t
        if kind == "silu":
            return t(aten.silu.default, y)
        if kind == "add_scalar":
            return t(aten.add.Tensor, y, 0.5)
        if kind == "second_user":
            self.taps.append(y)  # a graph output reads the value: a second user
            return t(aten.mul.Tensor, y, 2)
        # a lossy round trip (through a type that drops bits or range): an exact one, as
        # bf16 -> fp32 -> bf16, is the identity, which recognition by meaning fuses
        dt = self.plan.dtype
        other = {torch.bfloat16: torch.float16, torch.float16: torch.bfloat16}.get(dt, torch.bfloat16)
        return t(CONVERT, t(CONVERT, y, other), dt)

    def apply(self, op: str, y: Node, blocked: bool) -> Node:
        t, s = self.t, shape(y)
        rank = len(s)
        if op == "view3d" and rank == 2:
            return t(aten.view.default, y, [1, *s])
        if op == "flatten" and rank == 3:
            if y.meta["val"].is_contiguous():
                return t(aten.view.default, y, [-1, s[-1]])
            y = t(aten.clone.default, y, memory_format=torch.contiguous_format)
            return t(aten._unsafe_view.default, y, [-1, s[-1]])
        if op == "unsqueeze" and rank < 4:
            return t(aten.unsqueeze.default, y, 0)
        if op == "squeeze" and rank > 2 and s[0] == 1:
            return t(aten.squeeze.dim, y, 0)
        if op == "slice_tokens" and s[-2] > 1:
            return t(aten.slice.Tensor, y, rank - 2, 1, 2**63 - 1)
        if op == "slice_hidden" and s[-1] > 8:
            return t(aten.slice.Tensor, y, rank - 1, 0, s[-1] - 8)  # as after a padded GEMM
        if op == "select" and rank >= 3:
            return t(aten.select.int, y, 0, s[0] - 1)
        if op == "clone":
            return t(aten.clone.default, y)
        if op == "permute" and rank >= 3:
            dims = [1, 0, *range(2, rank)]  # keeps the hidden dim last
            return t(aten.permute.default, y, dims)
        if op == "neg":
            return t(aten.neg.default, y)
        if op == "mul_scalar":
            return t(aten.mul.Tensor, y, 0.4)
        if op == "div_scalar":
            return t(aten.div.Tensor, y, 2.5)
        if op == "mul_replicated":
            return t(aten.mul.Tensor, y, t.input("replicated", s[-1:], self.plan.dtype))
        if op == "split" and s[-2] > 1:
            parts = t(aten.split_with_sizes.default, y, [1, s[-2] - 1], rank - 2)
            return t(operator.getitem, parts, 1)
        if op == "merge":
            self.merges_after_blocker += int(blocked)
            return t(aten.add.Tensor, y, t.all_reduce(t.input("partial", s, self.plan.dtype)))
        return y  # not applicable to this shape: skipped

    def norm(self, x: Node, w: Node, eps: float = 1e-6) -> Node:
        """HF Llama's RMSNorm (weight after the cast back) or F.rms_norm's (weight in fp32)."""
        t, dt = self.t, self.plan.dtype
        low = dt != torch.float32
        h = t(CONVERT, x, torch.float32) if low else x
        r = t(aten.rsqrt.default, t(aten.add.Tensor, t(aten.mean.dim, t(aten.pow.Tensor_Scalar, h, 2), [-1], True), eps))
        n = t(aten.mul.Tensor, h, r)
        if self.plan.hf_norm:
            return t(aten.mul.Tensor, w, t(CONVERT, n, dt) if low else n)
        n = t(aten.mul.Tensor, n, t(CONVERT, w, torch.float32) if low else w)
        return t(CONVERT, n, dt) if low else n


def build(plan: Plan):
    """(graph module, per-rank inputs, builder) for *plan*."""
    b = Builder(plan)
    gm = b.build()
    g = torch.Generator().manual_seed(plan.seed)
    base = [torch.randn(s, generator=g).to(dt) for _, s, dt in b.t.inputs]
    per_rank = [
        [torch.randn(s, generator=g).to(dt) if kind == "partial" else v.clone()
         for (kind, s, dt), v in zip(b.t.inputs, base)]
        for _ in range(plan.world)
    ]
    return gm, per_rank, b


def tolerance(plan: Plan) -> dict:
    """Unfused vs hoisted, max difference.

    Hoisting reorders roundings (DESIGN.md section 4): a scale moved before the sum rounds
    each rank's summand once more, a merge sums ``(a0 + b0) + (a1 + b1)`` instead of
    ``(a0 + a1) + (b0 + b1)``. Each rounding is at most half an ulp of the running value;
    there are at most ``world`` additions per merged operand and one per scale. RMSNorm is
    scale-invariant, so the relative error carries to its output, which is rounded once
    more. Hence rtol = (world * (merges + 1) + scales + 2) * eps; atol covers elements that
    cancel to near zero: the same count of ulps of a unit-rms value times the largest
    weight (|w| < 5 for the normal weights drawn here).
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
    ref = copy.deepcopy(gm)
    merges = plan.ops.count("merge")
    assert count(gm, AR) == 1 + merges
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
        assert count(gm, AR) == 1 + merges
        assert not first.fused and first.hoisted_over == []
        assert first.reason.startswith("not fused, graph unchanged at this site: ") or not any(
            s.hoisted_over for s in report.sites), first.reason
        assert BLOCKER_REASON[plan.blocker] in first.reason, first.reason
        node = next(n for n in gm.graph.nodes if n.name == first.blocker)
        assert target_name(node) == BLOCKER_NODE[plan.blocker]
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
    gm, _, _ = build(plan)
    twin = copy.deepcopy(gm)
    first, second = run_pass(gm), run_pass(twin)
    assert gm.code == twin.code
    assert first.to_dict() == second.to_dict()
