"""Which values Inductor's compile stores, and so rounds, before a later loop reads them.

The fused op must compute what the unfused compile computes (issue 22). Inductor keeps a
pointwise value in fp32 while it is recomputed inline in its readers, and rounds it to its
dtype only where it is stored (realized) as a buffer. Where it is stored, a reader in the
SAME loop as the store still gets the unrounded value (the code generator's store cache,
torch/_inductor/codegen/common.py ``CSEProxy.load``), and a reader in a later loop loads
the rounded buffer. In an add + RMSNorm (+ FP8 quant) kernel that gives, measured on CPU
(tests/test_compile_parity.py, docs/design.md "What Inductor keeps unrounded") and read
in Inductor's Triton code on an H100 (torch 2.11; results/README.md, "The stored-value
rules on the GPU"):

* the sum ``x + residual`` not stored: the variance and the normalization read it
  unrounded (``residual_in_fp32``), and so does the next site that recomputes it
  (``carry_fp32``);
* the sum stored: the variance, in the loop that stores it, reads it unrounded; the
  normalization, one loop later, reads the rounded buffer (``sum_stored``); the next site
  reads the rounded buffer (no carry);
* the norm output stored: the FP8 codes, one loop later, read it rounded (no
  ``quant_unrounded``); the dynamic scale's amax, in the loop that stores it, reads it
  unrounded on a GPU (``amax_unrounded``; the CPU's C++ amax reads the rounded value).

A Triton *persistent* reduction (one loop: a row of at most 1024 elements,
torch/_inductor/choices.py ``should_use_persistent_reduction``) reads every such value
from the store cache, unrounded. The thresholds are read as the running torch names them:
torch 2.11 has one op-count and one accumulated-reads threshold for every device and no
``realize_opusers_threshold`` (:func:`_rules`).

Whether a value is stored is decided during lowering (torch/_inductor/graph.py
``GraphLowering.run_node``, ir.py ``StorageBox.should_realize_on_reuse`` and
``has_exceeded_max_reads``): a pointwise value read by more than one node is stored when
the buffers its inlined computation reads exceed ``realize_reads_threshold`` (4), or its
computation is large; any value read by a non-pointwise op (a matmul, a custom op, a
collective) or returned is stored. :func:`analyse` replays those rules over the FX graph
in graph order, with Inductor's own thresholds (``torch._inductor.config``). Its op count
is an estimate (one per FX op and per read, where Inductor counts its loop-body ops); the
rules it replays are the ones above, not the scheduler's fusion decisions. A value
stored in an EARLIER kernel than the one whose loop reads it (a scheduling choice) reads
rounded everywhere, which this does not predict (docs/design.md).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import operator
from typing import Iterator

import torch
from torch.fx import Graph, Node

from fusion_passes import _compat

aten = torch.ops.aten
prims = torch.ops.prims

# Ops Inductor lowers to a view of their input (no loop of their own, no read of their own).
_VIEWS = frozenset({
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.expand.default,
    aten.permute.default, aten.t.default, aten.transpose.int, aten.unsqueeze.default, aten.squeeze.dim,
    aten.squeeze.dims, aten.squeeze.default, aten.slice.Tensor, aten.select.int, aten.alias.default,
    aten.view.dtype,
})
# Lowered to pointwise loops though not tagged pointwise: dtype conversions, copies, gathers.
_POINTWISE = frozenset({
    aten._to_copy.default, prims.convert_element_type.default, aten.clone.default, aten.embedding.default,
    aten.index.Tensor, aten.where.self, aten.full_like.default,
})
# Reductions read their inlined input in their own loop; their result is a buffer.
_REDUCTIONS = frozenset({
    aten.sum.dim_IntList, aten.sum.default, aten.mean.dim, aten.mean.default, aten.amax.default,
    aten.amin.default, aten.max.dim, aten.min.dim, aten.var.correction, aten.var_mean.correction,
    aten.prod.dim_int, aten.argmax.default, aten.argmin.default,
})
# CPU: reused values computing one of these are stored (ir.py should_realize_on_reuse)
# ir.py StorageBox.should_realize_on_reuse: CPU ops heavy enough to store a reused value.
# torch 2.11 lists two; the later rewrite that added realize_opusers_threshold lists seven.
_HEAVY_CPU = frozenset({"exp", "log", "log10", "log1p", "log2", "sigmoid", "tanh"})
_HEAVY_CPU_2_11 = frozenset({"exp", "sigmoid"})
PERSISTENT_MAX = 1024  # choices.py should_use_persistent_reduction: ReductionHint.INNER threshold
# Views after which a loop over the value is no longer one flat run of its buffer.
_NOT_FLAT_VIEWS = frozenset({aten.expand.default, aten.permute.default, aten.t.default, aten.transpose.int,
                             aten.slice.Tensor, aten.select.int})
_GATHERS = frozenset({aten.embedding.default, aten.index.Tensor})

UNROUNDED, STORED, ROUNDED = "unrounded", "stored", "rounded"
"""How a norm reads its sum (:meth:`Stores.sum_reads`): never stored (recomputed in fp32);
stored in the loop that computes the variance (the variance unrounded, the normalization
rounded); stored by a loop of its own before it (both rounded)."""


@dataclasses.dataclass
class _Value:
    reads: frozenset  # the buffers its inlined computation reads (itself, once stored)
    ops: int  # estimated loop-body ops when inlined
    heavy: bool = False  # computes a CPU-heavy op (_HEAVY_CPU)
    stored: bool = False
    # every element read at its own flat offset (no gather, broadcast or transposed view):
    # Inductor's C++ code then runs it as one flat loop, apart from a row reduction's loop
    flat: bool = True


class Stores:
    """The result of :func:`analyse`: :meth:`stored` per FX node, and nodes that take over
    a stored value's place (a fused op replacing the chain whose sum it was)."""

    def __init__(self, values: dict, device: str, flat: dict):
        self._values = values
        self.device = device
        self._flat = flat  # stored node -> whether its computation was one flat loop

    def stored(self, node: Node) -> bool:
        """Whether the compile stores *node*'s value as a buffer (read rounded in a later loop)."""
        v = self._values.get(node)
        return v is not None and v.stored

    def known(self, node: Node) -> bool:
        """Whether the analysis saw *node* (a node the pass made later is unknown, unless
        :meth:`same_as` named what it stands for)."""
        return node in self._values

    def same_as(self, new: Node, old: Node) -> None:
        """*new* (a fused op) now stands for *old*'s value (the sum it replaced)."""
        if old in self._values:
            self._values[new] = self._values[old]
            self._flat[new] = self._flat.get(old, False)

    def persistent(self, hidden: int | None) -> bool:
        """Whether Inductor's Triton code reduces a row of *hidden* in one loop (every
        stored value then read from the store cache, unrounded). Never on CPU."""
        return (self.device == "cuda" and hidden is not None and hidden <= PERSISTENT_MAX
                and bool(_compat.inductor_config.triton.persistent_reductions))

    def rounds_later_reads(self, node: Node, hidden: int | None) -> bool:
        """A later loop reads *node* rounded to its dtype: it is stored, and not by a
        persistent reduction."""
        return self.stored(node) and not self.persistent(hidden)

    def sum_reads(self, add: Node, hidden: int | None) -> str:
        """How the norm after *add* reads the sum: :data:`UNROUNDED`, :data:`STORED` or
        :data:`ROUNDED`. On CPU a stored sum computed as one flat loop (its reads all plain
        buffers of its shape) is stored by that loop, before the variance's (measured:
        tests/test_compile_parity.py); elsewhere (a gather or a broadcast in it, or Triton,
        which fuses the pointwise producer into the reduction's loop) in the variance's loop."""
        if not self.rounds_later_reads(add, hidden):
            return UNROUNDED
        return ROUNDED if self.device == "cpu" and self._flat.get(add, False) else STORED


_CURRENT: contextvars.ContextVar[Stores | None] = contextvars.ContextVar("fusion_passes_stores", default=None)


def current() -> Stores | None:
    """The analysis of the graph the pass is matching (None outside :func:`reading`)."""
    return _CURRENT.get()


@contextlib.contextmanager
def reading(stores: Stores) -> Iterator[Stores]:
    """Inside, :func:`current` is *stores* (the pass sets it while it matches a graph)."""
    token = _CURRENT.set(stores)
    try:
        yield stores
    finally:
        _CURRENT.reset(token)


def _op_name(target) -> str:
    """``exp`` for ``aten.exp.default``."""
    name = str(target).split(".")
    return name[1] if len(name) > 2 else name[-1]


def _is_pointwise(node: Node) -> bool:
    t = node.target
    return t in _POINTWISE or torch.Tag.pointwise in getattr(t, "tags", ())


@dataclasses.dataclass(frozen=True)
class _Rules:
    """The store-or-inline thresholds of the running torch (config.py's ``realize_*``)."""

    reads: int  # realize_reads_threshold: reads of a value read twice
    acc: int  # realize_acc_reads_threshold: reads of any value
    ops: int  # realize_opcount_threshold
    users: int | None  # realize_opusers_threshold (CPU); None: this torch has no such rule
    heavy_cpu: frozenset
    delay_cheap_outputs: bool  # delay_realize_cheap_outputs: a read-free output is not stored


def _rules(device: str) -> _Rules:
    """Inductor's thresholds for *device*. torch 2.11 has one op-count and one accumulated
    reads threshold for every device and no users rule; later versions split them by CPU
    and GPU (``None`` then picks the device's default) and add the users rule."""
    c = _compat.inductor_config
    cpu = device == "cpu"
    acc = c.realize_acc_reads_threshold
    if acc is None:
        acc = c.realize_cpu_acc_reads_threshold if cpu else c._realize_acc_reads_threshold_default
    ops = c.realize_opcount_threshold
    if ops is None:
        ops = c.realize_cpu_opcount_threshold if cpu else c._realize_opcount_threshold_default
    users = getattr(c, "realize_opusers_threshold", None)
    return _Rules(c.realize_reads_threshold, acc, ops, users, _HEAVY_CPU if users is not None else _HEAVY_CPU_2_11,
                  bool(getattr(c, "delay_realize_cheap_outputs", False)))


def _device(graph: Graph) -> str:
    for n in graph.nodes:
        v = n.meta.get("val")
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.device.type
    return "cpu"


def analyse(graph: Graph) -> Stores:
    """Replay Inductor's store-or-inline decisions over *graph* (module docstring)."""
    device = _device(graph)
    rules = _rules(device)
    values: dict[Node, _Value] = {}

    def buffer(n: Node) -> _Value:
        return _Value(frozenset([n]), 0, stored=True)

    flat: dict[Node, bool] = {}

    def store(n: Node) -> None:
        v = values[n]
        if not v.stored:
            flat[n] = v.flat
            values[n] = buffer(n)
            base = _base.get(n)
            if base is not None and base in values:  # a view: its base is what gets stored
                values[base] = buffer(base)

    _base: dict[Node, Node] = {}
    for n in graph.nodes:
        if n.op in ("placeholder", "get_attr"):
            values[n] = buffer(n)
            continue
        if n.op != "call_function":
            continue
        args: list[Node] = []  # every Node argument, nested, once per use (Inductor counts each read)
        torch.fx.node.map_arg((n.args, n.kwargs), args.append)
        ins = [values[a] for a in args if a in values]
        if n.target in _VIEWS and ins:
            src = n.args[0]
            values[n] = dataclasses.replace(values[src]) if src in values else buffer(n)
            values[n].flat = values[n].flat and n.target not in _NOT_FLAT_VIEWS
            _base[n] = _base.get(src, src)
        elif _is_pointwise(n):
            reads = frozenset().union(*(v.reads for v in ins)) if ins else frozenset()
            ops = sum(v.ops for v in ins if not v.stored) + 1 + len(ins)
            heavy = any(v.heavy for v in ins if not v.stored) or _op_name(n.target) in rules.heavy_cpu
            same = all(_numel(a) == _numel(n) for a in n.all_input_nodes if a in values)
            is_flat = same and n.target not in _GATHERS and all(v.flat for v in ins)
            values[n] = _Value(reads, ops, heavy, flat=is_flat)
        else:
            values[n] = buffer(n)  # reductions, matmuls, collectives, custom ops, getitems
            if n.target not in _REDUCTIONS and n.target is not operator.getitem:
                for a in n.all_input_nodes:  # ExternKernel.realize_input
                    if a in values:
                        store(a)
            continue
        v = values[n]
        if v.stored:
            continue
        users = set(n.users)
        if any(u.op == "output" for u in users) and (v.reads or v.ops > rules.ops or not rules.delay_cheap_outputs):
            store(n)
        elif len(users) > 1 and _reuse_stores(v, len(users), device, rules):
            store(n)
        elif len(v.reads) > rules.acc or v.ops > rules.ops:  # has_exceeded_max_reads -> realize_hint
            if len(v.reads) > 1:
                store(n)
    return Stores(values, device, flat)


def _numel(n: Node) -> int | None:
    v = n.meta.get("val")
    return v.numel() if isinstance(v, torch.Tensor) else None


def _reuse_stores(v: _Value, users: int, device: str, rules: _Rules) -> bool:
    """ir.py ``StorageBox.should_realize_on_reuse`` for a pointwise value read *users* times."""
    if device == "cpu":
        if v.heavy:
            return True
        if rules.users is not None and users > rules.users and v.ops > max(0, rules.ops - 2):
            return True
    return v.ops > rules.ops or len(v.reads) > rules.reads
