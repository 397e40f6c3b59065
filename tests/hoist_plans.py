"""Random hoisting plans for tests/test_hoist_property.py: what to draw, and the graph each builds.

A :class:`Plan` is one drawn example (chain of hoistable ops, an optional blocker, dtype,
shape, world size, dialect, side of the residual add); :class:`Builder` turns it into a
post-grad-style aten graph with ``meta['val']`` on every node (:class:`Tracer`), and
:func:`build` adds per-rank inputs: "partial" inputs differ per rank, "replicated" ones not.
"""

from __future__ import annotations

import dataclasses
import functools
import operator

import torch
from hypothesis import strategies as st

from fusion_passes._compat import FakeTensorMode
from graphs import group_name

aten, c10d = torch.ops.aten, torch.ops._c10d_functional
CONVERT = torch.ops.prims.convert_element_type.default
Node = torch.fx.Node

AR_OP = {"c10d": "_c10d_functional.all_reduce", "vllm": "vllm.all_reduce"}


def _vllm_ops() -> bool:
    """vLLM's all_reduce and vllm_ir norm ops registered (the vllm extra), else only c10d."""
    try:
        import vllm.distributed.parallel_state  # noqa: F401  (torch.ops.vllm.all_reduce)
        import vllm.ir.ops  # noqa: F401  (torch.ops.vllm_ir.*)
    except ModuleNotFoundError as e:
        if e.name != "vllm":
            raise
        return False
    return True


DIALECTS = ("c10d", "vllm") if _vllm_ops() else ("c10d",)
VLLM_GROUPS = ("tp:0", "tp:1")  # vLLM's own group names; the second is "another group"

# hoistable ops: each maps (value, state) -> value and is skipped when the shape rules it out
HOISTABLE = ("view3d", "flatten", "unsqueeze", "squeeze", "slice_tokens", "slice_hidden", "select",
             "clone", "permute", "neg", "mul_scalar", "div_scalar", "mul_replicated", "split", "merge")
BLOCKERS = ("silu", "add_scalar", "second_user", "cast", "merge_other_group", "mul_partial")
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
    dialect: str = "c10d"
    residual_left: bool = False  # ``res + y`` instead of ``y + res``
    vllm_ir_norm: bool = False  # vLLM dialect: vllm_ir.fused_add_rms_norm instead of the aten chain

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
        dialect=draw(st.sampled_from(DIALECTS)),
        residual_left=draw(st.booleans()),
        vllm_ir_norm=draw(st.booleans()),
    )


class _FakeMode(FakeTensorMode):
    """The fake mode, asking once whether a GPU exists: FakeTensorMode.avoid_device_init
    asks on every ``with mode:``, and on a CUDA build without a driver each ask loads NVML
    through ctypes (about 20% of building a graph here)."""

    _no_device = not torch.cuda.is_available()

    @property
    def avoid_device_init(self) -> bool:
        return self._no_device


class Tracer:
    """Builds a post-grad-style aten graph node by node, ``meta['val']`` included.

    All examples share ONE fake mode so its dispatch cache stays warm: make_fx per example
    (a fresh fake mode and proxy machinery each time) was about 3x slower, too slow for
    1,000 examples in CI. The ops are the ones make_fx / Inductor emit for the same code
    (``prims.convert_element_type`` for casts, as in post-grad graphs).
    """

    mode = _FakeMode()

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

    def all_reduce(self, x: Node, dialect: str = "c10d", other_group: bool = False) -> Node:
        """all_reduce + wait_tensor (c10d) or ``vllm.all_reduce``; vals as their meta impls give
        them (contiguous / empty_like), set directly: the collectives' fake dispatch is
        uncached and slow. ``other_group``: a second process group of the same ranks."""
        if dialect == "vllm":
            ar = self.graph.call_function(torch.ops.vllm.all_reduce.default, (x, VLLM_GROUPS[other_group]))
            with self.mode:
                ar.meta["val"] = torch.empty_like(x.meta["val"])
            return ar
        name = _other_group().group_name if other_group else group_name()
        ar = self.graph.call_function(c10d.all_reduce.default, (x, "sum", name))
        wait = self.graph.call_function(c10d.wait_tensor.default, (ar,))
        with self.mode:
            ar.meta["val"] = torch.empty_like(x.meta["val"], memory_format=torch.contiguous_format)
            wait.meta["val"] = torch.empty_like(ar.meta["val"])
        return wait

    def gm(self, outputs) -> torch.fx.GraphModule:
        self.graph.output(tuple(outputs))
        return torch.fx.GraphModule(torch.nn.Module(), self.graph)


@functools.lru_cache(maxsize=1)
def _other_group():
    """A second c10d group over the same ranks (its own name): merging across it is wrong
    even though the ranks coincide, since the two collectives are not one."""
    import torch.distributed as dist

    return dist.new_group(list(range(dist.get_world_size())))


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
        self.x = t.input("partial", (self.plan.tokens, self.plan.hidden), dt)
        y = t.all_reduce(self.x, self.plan.dialect)
        self.first = (y if self.plan.dialect == "vllm" else y.args[0]).name  # the chain's own all-reduce
        self.other_group_ars = 0
        blocked = False
        for step in self.plan.steps():
            if step.startswith("!"):
                y, blocked = self.block(step[1:], y), True
            else:
                y = self.apply(step, y, blocked)
        res = t.input("replicated", shape(y), dt)
        w = t.input("replicated", shape(y)[-1:], dt)
        if self.plan.dialect == "vllm" and self.plan.vllm_ir_norm:
            x, r = (res, y) if self.plan.residual_left else (y, res)
            out = t(torch.ops.vllm_ir.fused_add_rms_norm.default, x, r, w, 1e-6)
            return t.gm([t(operator.getitem, out, 0), t(operator.getitem, out, 1), *self.taps])
        summed = t(aten.add.Tensor, res, y) if self.plan.residual_left else t(aten.add.Tensor, y, res)
        return t.gm([self.norm(summed, w), *self.taps])

    def block(self, kind: str, y: Node) -> Node:
        t = self.t
        if kind == "silu":
            return t(aten.silu.default, y)
        if kind == "add_scalar":
            return t(aten.add.Tensor, y, 0.5)
        if kind == "second_user":
            self.taps.append(y)  # a graph output reads the value: a second user
            return t(aten.mul.Tensor, y, 2)
        if kind == "merge_other_group":
            self.other_group_ars += 1
            other = t.all_reduce(t.input("partial", shape(y), self.plan.dtype), self.plan.dialect, other_group=True)
            return t(aten.add.Tensor, y, other)
        if kind == "mul_partial":  # row 0 of this rank's summand: a [hidden] "weight" that differs per rank
            row = t(aten.select.int, self.x, 0, 0)
            return t(aten.mul.Tensor, y, t(aten.slice.Tensor, row, 0, 0, shape(y)[-1]))
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
            return t(aten.add.Tensor, y, t.all_reduce(t.input("partial", s, self.plan.dtype), self.plan.dialect))
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
