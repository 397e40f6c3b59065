"""Hoisting's legality rules: whether an all-reduce may move below an op, and why it is
exact (:mod:`fusion_passes.hoist` applies them). One op per row of :data:`RULES`; an op
without a row stops the all-reduce, and :data:`STOPS` names why for the ops worth naming.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Callable, Union

import torch
from torch.fx import Node

from fusion_passes.recognize.fx import is_named, is_op, op_name, short, val
from fusion_passes.recognize.roles import AllReduce, Miss
from fusion_passes.recognize.vllm_ir import VLLM_ADD_RMS_NORM, VLLM_RMS_NORM

aten = torch.ops.aten
prims = torch.ops.prims


# ------------------------------------------------------------------------- rule outcomes


@dataclasses.dataclass(frozen=True)
class Sink:
    """Move the all-reduce below ``user``: recompute ``user`` on the all-reduce's input."""


@dataclasses.dataclass(frozen=True)
class Merge:
    """``user`` adds / subtracts ``other``, an all-reduce of the same group: make one."""

    other: AllReduce


@dataclasses.dataclass(frozen=True)
class Boundary:
    """``user`` is where fusion starts (the residual add or the norm): stop, no miss."""


Outcome = Union[Sink, Merge, Boundary, Miss]


@dataclasses.dataclass
class Context:
    """What a rule may ask about the graph."""

    options: object
    partial: set[Node]  # values that hold a per-rank summand (see _partial_values)
    by_value: dict[Node, AllReduce]  # all-reduce value node -> its AllReduce

    def replicated(self, a: object) -> bool:
        """A Python scalar, or a node not derived from a Partial value."""
        if isinstance(a, Node):
            return a not in self.partial
        return isinstance(a, (int, float, bool, torch.SymInt, torch.SymFloat)) or a is None


Rule = Callable[[Node, Node, Context], Outcome]

# ---------------------------------------------------------------------------------- rules


def _others(u: Node, v: Node) -> list:
    """Every argument of *u* other than the single occurrence of *v* (flattened)."""
    flat: list = []
    torch.fx.node.map_aggregate((u.args, u.kwargs), flat.append)
    return [a for a in flat if a is not v]


def _same_meta(u: Node, v: Node) -> Miss | None:
    vu, vv = val(u), val(v)
    if not isinstance(vu, torch.Tensor) or not isinstance(vv, torch.Tensor):
        return Miss(f"{short(u)} has no tensor metadata", u)
    if vu.dtype != vv.dtype:
        return Miss(f"{short(u)} changes the dtype {vv.dtype} -> {vu.dtype} (type promotion)", u)
    return None


def layout(u: Node, v: Node, ctx: Context) -> Outcome:
    """Re-indexes the same elements (a view or copy): the sum commutes with any
    re-indexing, elementwise and bit for bit."""
    if u.args[0] is not v:
        return Miss(f"{short(u)} takes the all-reduce output {v.name} as an index, not as its tensor", u)
    bad = [a for a in _others(u, v) if isinstance(a, Node) and (isinstance(val(a), torch.Tensor) or not ctx.replicated(a))]
    if bad:
        return Miss(f"{short(u)} depends on the tensor {bad[0].name}", u)
    return _same_meta(u, v) or Sink()


def permute(u: Node, v: Node, ctx: Context) -> Outcome:
    """A permutation that keeps the last (hidden) dim last. Exact like any re-indexing; one
    that moves the hidden dim is refused: the fused kernels normalise contiguous rows, so
    they would need a transposing copy of their input, and no real graph has one."""
    dims = list(u.args[1])
    rank = len(val(v).shape)
    if dims and dims[-1] % rank != rank - 1:
        return Miss(f"{short(u)} moves the last (hidden) dim (dims {dims})", u)
    return layout(u, v, ctx)


def transpose(u: Node, v: Node, ctx: Context) -> Outcome:
    """``transpose(d0, d1)`` of two leading dims: a permutation that keeps the last dim."""
    rank = len(val(v).shape)
    if rank - 1 in {d % rank for d in u.args[1:3]}:
        return Miss(f"{short(u)} moves the last (hidden) dim", u)
    return layout(u, v, ctx)


def split(u: Node, v: Node, ctx: Context) -> Outcome:
    """``split`` / ``unbind`` whose tuple is read at ONE index: ``getitem(split(AR(x)), k) ==
    AR(getitem(split(x), k))``. Moving it shrinks the collective to the piece that is used."""
    getters = [g for g in u.users if g.users or g.target is not operator.getitem]  # dead pieces don't count
    if len(getters) != 1 or getters[0].target is not operator.getitem:
        return Miss(f"{short(u)}: {len(getters)} pieces used ({', '.join(g.name for g in getters)}); "
                    "moving the all-reduce would need one per piece", u)
    return layout(u, v, ctx)


def scale(u: Node, v: Node, ctx: Context) -> Outcome:
    """``AR(x) * c == AR(x * c)`` and ``AR(x) / c == AR(x / c)`` for a ``c`` equal on every
    rank (a scalar, or a tensor not derived from a Partial value): distributivity.
    A divisor that is the all-reduce output itself is nonlinear and stops."""
    a, b = u.args[:2]
    if op_name(u.target).startswith("aten.div") and a is not v:
        return Miss(f"{short(u)} divides BY the all-reduce output (nonlinear)", u)
    c = b if a is v else a
    if a is v and b is v:
        return Miss(f"{short(u)} multiplies the all-reduce output by itself (nonlinear)", u)
    if not ctx.replicated(c):
        return Miss(f"{short(u)} scales by {getattr(c, 'name', c)}, a per-rank partial value "
                    "(not replicated across ranks)", u)
    if isinstance(c, Node) and isinstance(vc := val(c), torch.Tensor) and tuple(val(u).shape) != tuple(val(v).shape):
        return Miss(f"{short(u)} broadcasts {c.name} {tuple(vc.shape)} to a larger tensor", u)
    return _same_meta(u, v) or Sink()


def negate(u: Node, v: Node, ctx: Context) -> Outcome:
    """``-AR(x) == AR(-x)``: bit-exact (a sign flip commutes with rounding)."""
    return _same_meta(u, v) or Sink()


def add_or_sub(u: Node, v: Node, ctx: Context) -> Outcome:
    """``AR(a) +- AR(b) == AR(a +- b)`` for two all-reduces of one group (merge, saving a
    collective); ``AR(a) + r`` with a replicated ``r`` is the residual add, the fusion
    boundary. Adding a scalar or a partial value stops (the scalar would be summed once
    per rank)."""
    if len(u.args) != 2 or u.args[0] is u.args[1]:
        return Miss(f"{short(u)} uses the all-reduce output {v.name} twice", u)
    other = u.args[1] if u.args[0] is v else u.args[0]
    theirs = ctx.by_value.get(other) if isinstance(other, Node) else None
    mine = ctx.by_value[v]
    if theirs is not None and len(other.users) == 1:
        if theirs.group != mine.group:
            return Miss(f"{short(u)} adds all-reduces of two groups ({mine.group}, {theirs.group})", u)
        if (val(other).dtype, tuple(val(other).shape)) != (val(v).dtype, tuple(val(v).shape)):
            return Miss(f"{short(u)} adds all-reduces of different shapes or dtypes", u)
        return Merge(theirs)
    if not isinstance(other, Node):
        return Miss(f"{short(u)} adds the scalar {other!r}: it would be summed once per rank", u)
    if not ctx.replicated(other):
        return Miss(f"{short(u)} adds {other.name}, a per-rank partial value (not replicated)", u)
    if is_op(u, aten.add.Tensor):
        return Boundary()
    return Miss(f"{short(u)} subtracts a replicated value: not a residual add", u)


def cast(u: Node, v: Node, ctx: Context) -> Outcome:
    """A dtype cast. Not exact: moving it changes the precision of the cross-rank sum
    (see the module docstring); allowed only with ``hoist_casts``."""
    if not getattr(ctx.options, "hoist_casts", False):
        blocker = _beyond_cast(u)
        if blocker is not None:  # moving the cast would not reach a norm: name what stops it
            return Miss(f"{stop_reason(blocker)} (after the cast {u.name}: moving the cast would not help)",
                        blocker)
        return Miss(f"{short(u)} casts the all-reduce output; moving a cast changes the sum's "
                    "precision (enable hoist_casts to allow it)", u)
    extra = set(u.kwargs) - {"dtype"}
    if u.target is aten._to_copy.default and extra:
        return Miss(f"{short(u)} also changes {sorted(extra)}", u)
    return Sink()


def _beyond_cast(u: Node, steps: int = 8) -> Node | None:
    """The op that would stop the all-reduce after the cast *u* (None when the walk reaches
    a residual add, a norm, a merge or a branch: then moving the cast might pay off)."""
    cur = u
    for _ in range(steps):
        if len(cur.users) != 1:
            return None
        nxt = next(iter(cur.users))
        if nxt.op != "call_function" or is_norm_op(nxt):
            return None
        rule = RULES.get(nxt.target)
        if rule is None and nxt.target is operator.getitem and RULES.get(cur.target) is split:
            cur = nxt  # the piece of a split, which moves with it
            continue
        if rule is None:
            return nxt
        if rule is add_or_sub:
            return None
        cur = nxt
    return None


RULES: dict[object, Rule] = {
    # layout ops: the same elements re-indexed, so each rank's summand re-indexes alike
    aten.view.default: layout,
    aten.reshape.default: layout,
    aten._unsafe_view.default: layout,
    aten.squeeze.default: layout,
    aten.squeeze.dim: layout,
    aten.squeeze.dims: layout,
    aten.unsqueeze.default: layout,
    aten.slice.Tensor: layout,  # keeps a sub-range: shrinks the collective
    aten.select.int: layout,  # drops a dim at one index: shrinks the collective
    aten.clone.default: layout,  # a copy
    aten.contiguous.default: layout,  # a copy (pre-dispatch graphs only; aten has clone)
    aten.alias.default: layout,
    aten.permute.default: permute,  # only if the hidden dim stays last
    aten.transpose.int: transpose,  # likewise
    aten.split.Tensor: split,  # read at one index: the getitem of the tuple moves with it
    aten.split_with_sizes.default: split,
    aten.unbind.int: split,
    # linear in the summand: distributivity over the sum
    aten.mul.Tensor: scale,
    aten.mul.Scalar: scale,
    aten.div.Tensor: scale,
    aten.div.Scalar: scale,
    aten.neg.default: negate,
    # two sums of one group add into one sum; the residual add is the boundary
    aten.add.Tensor: add_or_sub,
    aten.sub.Tensor: add_or_sub,
    # casts: only under hoist_casts (they change the sum's precision)
    prims.convert_element_type.default: cast,
    aten._to_copy.default: cast,
}
"""op -> rule: whether an all-reduce may move below that op, and why it is exact."""

_REDUCTIONS = ("sum", "mean", "amax", "amin", "max", "min", "var", "std", "prod", "norm", "logsumexp",
               "linalg_vector_norm", "var_mean", "argmax", "argmin", "cumsum", "softmax", "_softmax")
STOPS: dict[str, str] = {
    **{f"aten.{r}": "reduces over a dim: an RMSNorm-style statistic, not a summand-wise op" for r in _REDUCTIONS},
    "aten.expand": "broadcasts: it would grow the tensor the collective sends",
    "aten.repeat": "copies: it would grow the tensor the collective sends",
    "aten.mm": "is a matmul consuming the reduced value (the next layer's GEMM)",
    "aten.addmm": "is a matmul consuming the reduced value (the next layer's GEMM)",
    "aten.bmm": "is a matmul consuming the reduced value",
}
"""Why an op without a rule stops an all-reduce, for ops worth naming (prefix -> reason);
any other op stops it as 'nonlinear or unknown'."""


def stop_reason(u: Node) -> str:
    name = op_name(u.target)
    for prefix, why in STOPS.items():
        if name == prefix or name.startswith(prefix + "."):
            return f"hoisting stopped at {short(u)}: it {why}"
    return (f"hoisting stopped at {short(u)}: no rule says it commutes with a cross-rank sum "
            "(nonlinear or unknown op)")


def is_norm_op(node: Node) -> bool:
    """A dialect's norm op (or an in-place norm kernel): the fusion boundary, never a
    blocker to hoist past."""
    from fusion_passes.recognize.inplace import is_inplace_norm

    return is_named(node, VLLM_RMS_NORM) or is_named(node, VLLM_ADD_RMS_NORM) or is_inplace_norm(node)
