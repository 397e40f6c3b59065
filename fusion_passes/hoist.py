"""Hoisting: sink each all-reduce along its value's path until it meets its norm.

Real graphs put ops between an all-reduce and the residual add + RMSNorm it should fuse
with (each seen in traces of unmodified model code): vLLM DeepSeek-V3 fp16 scales by
``0.4`` after the all-reduce, HF transformers reshapes after ``wait_tensor``, HF
DeepSeek-V3 MoE reduces the routed and the shared experts separately and adds the two
sums. Per rank a value is *Partial* (this rank's summand) or *Replicated*; the all-reduce
``AR`` maps P -> R. ``AR`` may move below a user ``u`` when
``u(AR(x), r...) == AR(u(x, r...))``: then the graph computes ``u`` on each rank's summand
and reduces afterwards.

:data:`~fusion_passes.hoist_rules.RULES` holds the legality rules as data, one op per row
with the reason it is exact; an op without a row stops the all-reduce, and
:data:`~fusion_passes.hoist_rules.STOPS` names why for the ops worth naming. Two all-reduces of the same group that meet in an ``add`` / ``sub``
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
Permutes move only when they keep the hidden dim last (see
:func:`fusion_passes.hoist_rules.permute`).
"""

from __future__ import annotations

import dataclasses

import torch
from torch.fx import Graph, Node

from fusion_passes.recognize import all_reduce, rms_norm
from fusion_passes.recognize.fx import FakeVals, op_name, short, val
from fusion_passes.recognize.roles import AllReduce, Miss
from fusion_passes.hoist_rules import (  # noqa: F401  (RULES, STOPS: the rules' public names)
    RULES,
    STOPS,
    Boundary,
    Merge,
    Sink,
    Context,
    add_or_sub,
    is_norm_op,
    split,
    stop_reason,
)

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


# ------------------------------------------------------------------------------ the pass


# node.meta key: names of the inputs of an op moved above an all-reduce that were the sum's
PARTIAL_INPUTS = "fusion_passes_partial_inputs"


def _partial_values(graph: Graph, ars: list[AllReduce]) -> set[Node]:
    """Nodes holding a per-rank summand: every all-reduce input, the values it is a
    function of alone (below), and everything computed from those without passing
    through an all-reduce. Everything else counts as replicated (weights, the residual
    stream, all-reduce outputs and what derives from them). A sharded weight is not
    Partial but also not replicated; it cannot broadcast against the full hidden dim,
    which :func:`scale` requires of a tensor scale.

    An all-reduce input computed from ONE tensor (``view(x)``, ``x * 0.5``, ``x[1:]``) differs
    per rank only if that tensor does, so the tensor is a per-rank value as well: after
    one hoist the all-reduce reads ``view(x)``, and a scale taken from ``x`` must stay
    per-rank on the next run (the pass is idempotent). An op this pass moved above an
    all-reduce names the inputs that carried the sum in ``meta[PARTIAL_INPUTS]`` (after
    ``AR(x) * w -> AR(x * w)`` the next run cannot tell ``x`` from ``w`` otherwise)."""
    inner = {n for ar in ars for n in ar.nodes}
    values = {ar.value for ar in ars}
    seeds = set()
    stack = [ar.input for ar in ars if isinstance(ar.input, Node)]
    while stack:
        n = stack.pop()
        if n in seeds or n in inner or n in values:
            continue
        seeds.add(n)
        tensors = [a for a in n.all_input_nodes if isinstance(val(a), (torch.Tensor, tuple, list))]
        if len(tensors) == 1:
            stack.append(tensors[0])
        marked = n.meta.get(PARTIAL_INPUTS, ())  # an op this pass moved above an all-reduce
        stack.extend(a for a in n.all_input_nodes if a.name in marked)
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
        self.ctx = Context(options, _partial_values(graph, ars), {a.value: a for a in ars})
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
        elif not isinstance(rms_norm(v), Miss) or any(is_norm_op(u) for u in users):
            return None  # already feeds its norm (a refused norm: the matcher says why)
        elif len(users) > 1:
            return self._stop(name, Miss(
                f"all-reduce output {v.name} has {len(users)} users ({', '.join(short(u) for u in users)}): "
                "a second user blocks hoisting", v))
        u = users[0]
        if u.op != "call_function":
            return self._stop(name, Miss(f"all-reduce output {v.name} is a graph output", v))
        rule = RULES.get(u.target)
        outcome = rule(u, v, self.ctx) if rule is not None else Miss(stop_reason(u), u)
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
            out = torch.empty_like(self.fake.fake(new_input), **_AR_FAKE_FORMAT.get(op_name(ar.node.target), {}))
        for n in ar.nodes:
            self.fake.update(n, out)
        moved = dataclasses.replace(ar, input=new_input)
        del self.ctx.by_value[ar.value]
        self.ctx.by_value[moved.value] = moved
        self.ars[moved.node] = moved
        return moved

    def _clone_onto(self, u: Node, replace: dict[Node, Node]) -> Node:
        """``u`` recomputed with its arguments replaced, inserted right before ``u``."""
        args = torch.fx.node.map_arg(u.args, lambda a: replace.get(a, a))
        kwargs = torch.fx.node.map_arg(u.kwargs, lambda a: replace.get(a, a))
        with self.graph.inserting_before(u):
            new = self.graph.call_function(u.target, args, kwargs)
        new.meta.update({k: x for k, x in u.meta.items() if k != "val"})
        new.meta[PARTIAL_INPUTS] = tuple(sorted(r.name for r in replace.values() if isinstance(r, Node)))
        self.fake.update(new)
        self.ctx.partial.add(new)
        return new

    def _sink(self, ar: AllReduce, u: Node) -> AllReduce:
        """``u(AR(x))`` -> ``AR(u(x))``; for a split, its getitem moves along."""
        v = ar.value
        ops = [op_name(u.target)]
        new_u = self._clone_onto(u, {v: ar.input})
        last_old, last_new = u, new_u
        if RULES.get(u.target) is split:  # the tuple is read at one index: move the getitem too
            for dead in [g for g in u.users if not g.users]:
                self.graph.erase_node(dead)
            get = next(iter(u.users))
            new_get = self._clone_onto(get, {u: new_u})
            ops.append(op_name(get.target))
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
        op = op_name(u.target)
        self.result.hoisted_over[keep.node.name].append(op)
        self.result.hoisted_over.setdefault(gone.node.name, []).append(op)
        self.result.merged[gone.node.name] = keep.node.name
        self.result.stopped.pop(gone.node.name, None)
        return moved


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
