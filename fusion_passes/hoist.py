"""Hoisting: sink each all-reduce along its value's path until it meets its norm.

Real graphs put ops between an all-reduce and the residual add + RMSNorm it should fuse
with (DESIGN.md section 4): vLLM DeepSeek-V3 fp16 scales by ``0.4`` after the
all-reduce, HF transformers reshapes after ``wait_tensor``, HF DeepSeek-V3 MoE reduces the
routed and the shared experts separately and adds the two sums. Per rank a value is
*Partial* (this rank's summand) or *Replicated*; the all-reduce ``AR`` maps P -> R. ``AR``
may move below a user ``u`` when ``u(AR(x), r...) == AR(u(x, r...))``: then the graph
computes ``u`` on each rank's summand and reduces afterwards.

:data:`RULES` holds the legality rules as data, one op per row with the reason it is
exact; an op without a row stops the all-reduce, and :data:`STOPS` names why for the
ops worth naming. Two all-reduces of the same group that meet in an ``add`` / ``sub``
become ONE all-reduce of the summands' sum (a collective saved per site).

"Exact" means exact in real arithmetic. In floating point a moved scale or a merged sum
rounds in a different order: each rank's summand is scaled before the sum instead of
the sum after it, and ``(a0 + a1) + (b0 + b1)`` becomes ``(a0 + b0) + (a1 + b1)``. The
difference is a few units in the last place of the activation dtype, the same order as
the difference between two all-reduce algorithms (ring vs. tree) on the unfused graph.
Negation, layout ops and scales by a power of two are bit-exact. Dtype casts are NOT
moved unless ``FusionOptions.hoist_casts``: moving a downcast (fp32 -> bf16) inside the
sum makes every rank round its summand and the collective accumulate in bf16 (error
grows with the world size); moving an upcast makes the sum MORE precise than the
unfused graph and doubles the bytes sent. Either way the numerics change.

Structure preserving: hoisting only MOVES the existing all-reduce nodes (they keep their
names, so the report's keys are the names in the graph the pass was given) and replaces
each op it crosses by the same op on the all-reduce's input, inserted right before the op
it replaces. Every new node therefore follows all of its inputs: those inputs preceded
the old op, so the graph stays topologically sorted and acyclic by construction (checked
by ``graph.lint()`` in :class:`~fusion_passes.FusionPass` and the tests). ``meta['val']``
of new and moved nodes is recomputed under the graph's fake mode.

An all-reduce that stops short of its norm keeps the moves made so far (each one is
exact); the report lists them (``hoisted_over``) and names the op that stopped it. When
its site then does not fuse, :class:`~fusion_passes.FusionPass` undoes every move of it
(:func:`wasted` names those all-reduces; a second run with them ``frozen`` leaves them in
place): a move changes the rounding of the sum and only pays off in a fused site.
Permutes move only when they keep the hidden dim last (see :func:`permute`).
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Callable, Union

import torch
from torch.fx import Graph, Node

from fusion_passes import _compat
from fusion_passes.recognize import (
    VLLM_ADD_RMS_NORM,
    VLLM_RMS_NORM,
    AllReduce,
    Miss,
    all_reduce,
    is_named,
    is_op,
    rms_norm,
    short,
    target_name,
    val,
)
from fusion_passes.rewrite import FakeVals

aten = torch.ops.aten
prims = torch.ops.prims


@dataclasses.dataclass
class HoistResult:
    """What :func:`run` did, keyed by the all-reduce node names of the graph it was given.

    ``hoisted_over``: the ops each all-reduce moved across, in order (``aten.mul.Tensor``).
    ``stopped``: why an all-reduce stopped short of a residual add / norm (the Miss names
    the op that stopped it). Absent for an all-reduce that reached its add or norm.
    ``merged``: an all-reduce merged away -> the all-reduce that now carries its sum.
    """

    hoisted_over: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    stopped: dict[str, Miss] = dataclasses.field(default_factory=dict)
    merged: dict[str, str] = dataclasses.field(default_factory=dict)

    def survivor(self, name: str) -> str:
        """The all-reduce that finally carries *name*'s sum (follows chains of merges)."""
        while name in self.merged:
            name = self.merged[name]
        return name

    @property
    def changed(self) -> bool:
        """Whether the graph was modified."""
        return bool(self.merged) or any(self.hoisted_over.values())


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
class _Context:
    """What a rule may ask about the graph."""

    options: object
    partial: set[Node]  # values that hold a per-rank summand (see _partial_values)
    by_value: dict[Node, AllReduce]  # all-reduce value node -> its AllReduce

    def replicated(self, a: object) -> bool:
        """A Python scalar, or a node not derived from a Partial value."""
        if isinstance(a, Node):
            return a not in self.partial
        return isinstance(a, (int, float, bool, torch.SymInt, torch.SymFloat)) or a is None


Rule = Callable[[Node, Node, _Context], Outcome]

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


def layout(u: Node, v: Node, ctx: _Context) -> Outcome:
    """Re-indexes the same elements (a view or copy): the sum commutes with any
    re-indexing, elementwise and bit for bit."""
    if u.args[0] is not v:
        return Miss(f"{short(u)} takes the all-reduce output {v.name} as an index, not as its tensor", u)
    bad = [a for a in _others(u, v) if isinstance(a, Node) and (isinstance(val(a), torch.Tensor) or not ctx.replicated(a))]
    if bad:
        return Miss(f"{short(u)} depends on the tensor {bad[0].name}", u)
    return _same_meta(u, v) or Sink()


def permute(u: Node, v: Node, ctx: _Context) -> Outcome:
    """A permutation that keeps the last (hidden) dim last. Exact like any re-indexing; one
    that moves the hidden dim is refused: the fused kernels normalise contiguous rows, so
    they would need a transposing copy of their input, and no real graph has one."""
    dims = list(u.args[1])
    rank = len(val(v).shape)
    if dims and dims[-1] % rank != rank - 1:
        return Miss(f"{short(u)} moves the last (hidden) dim (dims {dims})", u)
    return layout(u, v, ctx)


def transpose(u: Node, v: Node, ctx: _Context) -> Outcome:
    """``transpose(d0, d1)`` of two leading dims: a permutation that keeps the last dim."""
    rank = len(val(v).shape)
    if rank - 1 in {d % rank for d in u.args[1:3]}:
        return Miss(f"{short(u)} moves the last (hidden) dim", u)
    return layout(u, v, ctx)


def split(u: Node, v: Node, ctx: _Context) -> Outcome:
    """``split`` / ``unbind`` whose tuple is read at ONE index: ``getitem(split(AR(x)), k) ==
    AR(getitem(split(x), k))``. Moving it shrinks the collective to the piece that is used."""
    getters = [g for g in u.users if g.users or g.target is not operator.getitem]  # dead pieces don't count
    if len(getters) != 1 or getters[0].target is not operator.getitem:
        return Miss(f"{short(u)}: {len(getters)} pieces used ({', '.join(g.name for g in getters)}); "
                    "moving the all-reduce would need one per piece", u)
    return layout(u, v, ctx)


def scale(u: Node, v: Node, ctx: _Context) -> Outcome:
    """``AR(x) * c == AR(x * c)`` and ``AR(x) / c == AR(x / c)`` for a ``c`` equal on every
    rank (a scalar, or a tensor not derived from a Partial value): distributivity.
    A divisor that is the all-reduce output itself is nonlinear and stops."""
    a, b = u.args[:2]
    if target_name(u).startswith("aten.div") and a is not v:
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


def negate(u: Node, v: Node, ctx: _Context) -> Outcome:
    """``-AR(x) == AR(-x)``: bit-exact (a sign flip commutes with rounding)."""
    return _same_meta(u, v) or Sink()


def add_or_sub(u: Node, v: Node, ctx: _Context) -> Outcome:
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


def cast(u: Node, v: Node, ctx: _Context) -> Outcome:
    """A dtype cast. Not exact: moving it changes the precision of the cross-rank sum
    (see the module docstring); allowed only with ``hoist_casts``."""
    if not getattr(ctx.options, "hoist_casts", False):
        blocker = _beyond_cast(u)
        if blocker is not None:  # moving the cast would not reach a norm: name what stops it
            return Miss(f"{_stop_reason(blocker)} (after the cast {u.name}: moving the cast would not help)",
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
        if nxt.op != "call_function" or _is_norm_op(nxt):
            return None
        rule = RULES.get(nxt.target)
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


def _stop_reason(u: Node) -> str:
    name = target_name(u)
    for prefix, why in STOPS.items():
        if name == prefix or name.startswith(prefix + "."):
            return f"hoisting stopped at {short(u)}: it {why}"
    return (f"hoisting stopped at {short(u)}: no rule says it commutes with a cross-rank sum "
            "(nonlinear or unknown op)")


# ------------------------------------------------------------------------------ the pass


def _partial_values(graph: Graph, ars: list[AllReduce]) -> set[Node]:
    """Nodes holding a per-rank summand: every all-reduce input and everything computed
    from one without passing through an all-reduce. Everything else counts as
    replicated (weights, the residual stream, all-reduce outputs and what derives from
    them). A sharded weight is not Partial but also not replicated; it cannot broadcast
    against the full hidden dim, which :func:`scale` requires of a tensor scale."""
    seeds = {ar.input for ar in ars if isinstance(ar.input, Node)}
    inner = {n for ar in ars for n in ar.nodes}
    partial: set[Node] = set()
    for n in graph.nodes:
        if n in inner:
            continue
        if n in seeds or any(a in partial for a in n.all_input_nodes):
            partial.add(n)
    return partial


_AR_FAKE_FORMAT = {
    # torch/distributed/_functional_collectives.py _all_reduce_meta: a contiguous result
    "_c10d_functional.all_reduce.default": {"memory_format": torch.contiguous_format},
    # vllm/distributed/parallel_state.py all_reduce_fake: plain empty_like
}


class _Hoister:
    def __init__(self, graph: Graph, options, frozen: frozenset = frozenset()):
        self.graph = graph
        self.options = options
        self.frozen = frozen  # all-reduce names that must not move (their moves led nowhere)
        self.fake = FakeVals(graph)
        self.result = HoistResult()
        ars = [a for n in graph.nodes if isinstance(a := all_reduce(n), AllReduce)]
        self.ctx = _Context(options, _partial_values(graph, ars), {a.value: a for a in ars})
        self.ars = {a.node: a for a in ars}
        self.first = {a.node: i for i, a in enumerate(ars)}  # graph order as given: merges keep the first

    def run(self) -> HoistResult:
        budget = 4 * len(self.graph.nodes) + 16  # each step erases one op after an all-reduce
        progress = True
        while progress:
            progress = False
            for node in list(self.ars):
                ar = self.ars.get(node)
                if ar is None:  # merged away during this sweep
                    continue
                while (step := self._step(ar)) is not None:
                    progress = True
                    budget -= 1
                    if budget < 0:
                        raise RuntimeError("hoisting did not converge")
                    ar = step
        return self.result

    def _step(self, ar: AllReduce) -> AllReduce | None:
        """Move *ar* one op down; the (possibly new) AllReduce, or None when it stays."""
        name = ar.node.name
        self.result.hoisted_over.setdefault(name, [])
        if name in self.frozen:
            return None
        v = ar.value
        users = list(v.users)
        self.result.stopped.pop(name, None)
        if not users:
            return None
        if len(users) == 1 and RULES.get(users[0].target) is add_or_sub:
            pass  # a merge or the residual add: the rule decides
        elif not isinstance(rms_norm(v), Miss) or any(_is_norm_op(u) for u in users):
            return None  # already feeds its norm (a refused norm: the matcher says why)
        elif len(users) > 1:
            return self._stop(name, Miss(
                f"all-reduce output {v.name} has {len(users)} users ({', '.join(short(u) for u in users)}): "
                "a second user blocks hoisting", v))
        u = users[0]
        if u.op != "call_function":
            return self._stop(name, Miss(f"all-reduce output {v.name} is a graph output", v))
        rule = RULES.get(u.target)
        outcome = rule(u, v, self.ctx) if rule is not None else Miss(_stop_reason(u), u)
        if isinstance(outcome, Miss):
            return self._stop(name, outcome)
        if isinstance(outcome, Boundary):
            return None
        if isinstance(outcome, Merge):
            if outcome.other.node.name in self.frozen:
                return self._stop(name, Miss(f"{short(u)} adds an all-reduce whose moves were undone", u))
            return self._merge(ar, outcome.other, u)
        return self._sink(ar, u)

    def _stop(self, name: str, miss: Miss) -> None:
        self.result.stopped[name] = miss
        return None

    def _place(self, ar: AllReduce, new_input: Node, before: Node) -> AllReduce:
        """Move *ar*'s nodes right before *before*, reading *new_input*."""
        for n in ar.nodes:
            before.prepend(n)
        ar.node.update_arg(0, new_input)
        with self.fake.mode:  # what the dialects' fake impls return (without their dispatch cost)
            out = torch.empty_like(self._fake(new_input), **_AR_FAKE_FORMAT.get(target_name(ar.node), {}))
        for n in ar.nodes:
            n.meta["val"] = out
        moved = dataclasses.replace(ar, input=new_input)
        del self.ctx.by_value[ar.value]
        self.ctx.by_value[moved.value] = moved
        self.ars[moved.node] = moved
        return moved

    def _fake(self, n: Node):
        v = val(n)
        if isinstance(v, torch.Tensor) and not isinstance(v, _compat.FakeTensor):
            v = self.fake.mode.from_tensor(v)
        return v

    def _clone_onto(self, u: Node, replace: dict[Node, Node]) -> Node:
        """``u`` recomputed with its arguments replaced, inserted right before ``u``."""
        args = torch.fx.node.map_arg(u.args, lambda a: replace.get(a, a))
        kwargs = torch.fx.node.map_arg(u.kwargs, lambda a: replace.get(a, a))
        with self.graph.inserting_before(u):
            new = self.graph.call_function(u.target, args, kwargs)
        new.meta.update({k: x for k, x in u.meta.items() if k != "val"})
        with self.fake.mode:
            new.meta["val"] = u.target(*torch.fx.node.map_arg(args, self._fake),
                                       **torch.fx.node.map_arg(kwargs, self._fake))
        self.ctx.partial.add(new)
        return new

    def _sink(self, ar: AllReduce, u: Node) -> AllReduce:
        """``u(AR(x))`` -> ``AR(u(x))``; for a split, its getitem moves along."""
        v = ar.value
        ops = [target_name(u)]
        new_u = self._clone_onto(u, {v: ar.input})
        last_old, last_new = u, new_u
        if RULES.get(u.target) is split:  # the tuple is read at one index: move the getitem too
            for dead in [g for g in u.users if not g.users]:
                self.graph.erase_node(dead)
            get = next(iter(u.users))
            new_get = self._clone_onto(get, {u: new_u})
            ops.append(target_name(get))
            last_old, last_new = get, new_get
        moved = self._place(ar, last_new, last_old)
        last_old.replace_all_uses_with(moved.value)
        for n in ([last_old, u] if last_old is not u else [u]):
            self.graph.erase_node(n)
        self.result.hoisted_over[ar.node.name].extend(ops)
        return moved

    def _merge(self, ar: AllReduce, other: AllReduce, u: Node) -> AllReduce:
        """``AR(a) +- AR(b)`` -> ``AR(a +- b)``, keeping the all-reduce that comes first.

        Acyclic: ``b``'s value has ``u`` as its only user and so does ``a``'s, so neither
        input can depend on the other's value; the new add goes right before ``u``, after
        both inputs."""
        keep, gone = sorted((ar, other), key=lambda a: self.first[a.node])
        new_add = self._clone_onto(u, {ar.value: ar.input, other.value: other.input})
        moved = self._place(keep, new_add, u)
        u.replace_all_uses_with(moved.value)
        self.graph.erase_node(u)
        for n in reversed(gone.nodes):
            self.graph.erase_node(n)
        del self.ctx.by_value[gone.value]
        del self.ars[gone.node]
        op = target_name(u)
        self.result.hoisted_over[keep.node.name].append(op)
        self.result.hoisted_over.setdefault(gone.node.name, []).append(op)
        self.result.merged[gone.node.name] = keep.node.name
        self.result.stopped.pop(gone.node.name, None)
        return moved


def _is_norm_op(node: Node) -> bool:
    """A dialect's norm op (or an in-place norm kernel): the fusion boundary, never a
    blocker to hoist past."""
    from fusion_passes.inplace import is_inplace_norm

    return is_named(node, VLLM_RMS_NORM) or is_named(node, VLLM_ADD_RMS_NORM) or is_inplace_norm(node)


def run(graph: Graph, options, frozen=frozenset()) -> HoistResult:
    """Sink every all-reduce of *graph* toward its norm and merge sums of one group; the
    all-reduces named in *frozen* stay where they are.

    In place; returns a :class:`HoistResult`. A no-op when each all-reduce already feeds
    its residual add or norm, and idempotent: a second run changes nothing more.
    """
    if not any(all_reduce(n) is not None for n in graph.nodes):
        return HoistResult()
    return _Hoister(graph, options, frozenset(frozen)).run()


def wasted(result: HoistResult, report) -> set[str]:
    """All-reduces that moved (or merged) but whose site did not fuse: their moves changed
    the sum's rounding for nothing and are to be undone. A merge undone frees both sums."""
    unfused = {s.all_reduce for s in report.sites if not s.fused}
    out = {name for name in unfused if result.hoisted_over.get(name)}
    for gone in result.merged:
        keep = result.survivor(gone)
        if keep in out or gone in out:
            out |= {gone, keep}
    return out


def report_merged(result: HoistResult, report) -> None:
    """Give each merged-away all-reduce a report entry right after its survivor's.

    The entry copies the survivor's outcome (fused, variant, backend) and says in
    ``reason`` that its sum now travels in the survivor's collective.
    """
    from fusion_passes.report import SiteReport

    for gone in sorted(result.merged):
        keep = result.survivor(gone)
        at = next((i for i, s in enumerate(report.sites) if s.all_reduce == keep), None)
        if at is None:
            continue
        partner = report.sites[at]
        outcome = "fused there" if partner.fused else f"not fused: {partner.reason}"
        entry = SiteReport(
            gone,
            fused=partner.fused,
            variant=partner.variant,
            backend=partner.backend,
            hoisted_over=list(result.hoisted_over.get(gone, [])),
            reason=f"merged into all-reduce {keep} (one collective for both sums); {outcome}",
            blocker=partner.blocker,
            source=partner.source,
        )
        report.sites.insert(at + 1, entry)
