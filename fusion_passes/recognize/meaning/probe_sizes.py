"""At which token counts a chain is probed, and how its sizes follow.

An RMSNorm (and every quant the fused ops compute) works row by row, so a chain is probed
on a few rows of its real hidden size, never on the graph's full activation: at
:data:`TOKENS` token counts, each including every probe row kind
(:func:`fusion_passes.recognize.meaning.probes.sets_for`). A verdict holds only if the chain is bit-exact at
every one of them.

The token dimension is the one leading dimension of the all-reduced value that is not 1:

* in a graph compiled with static shapes it is an integer ``T``; sizes the chain's ops
  take (``view(x, [T, 32, 128])``, ``expand(w, [T, H])``, ``full([T, 1])``) name it as
  their leftmost size equal to ``T`` (or a leftmost multiple ``k * T``, a flattened view),
  and each is replaced by the probed count (``k * R``); every value's shape is then
  checked to follow (else the chain is not probed, with the reason);
* in a token-dynamic graph it is a symbol ``s0``; every size is an expression in it, and
  the graph's own size arithmetic (``sym_size``, ``s0 * 32``) computes the concrete sizes.

A chain whose last (reduction, hidden) dimension is not static, or whose sizes hold a
second symbol, is not probed. Static and token-dynamic forms of one chain describe their
sizes the same way (:meth:`Plan.key`: ``("T", k)`` for ``k * T``), so they share a verdict.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch.fx import Node

from fusion_passes.recognize.fx import op_name, val

TOKENS = (16, 1, 7)
"""Token counts probed: 16 rows hold every norm row kind twice (seven kinds,
fusion_passes.recognize.meaning.probes); 1 is a decode step; 7 is not a power of two."""
AS_IS_ROWS = 256
"""A static graph with several leading dimensions over 1 (batch and sequence) is probed as
it is up to this many rows: the rows fusion_passes.recognize.meaning.safe_eval.MAX_NUMEL allows at the
largest hidden size a fused kernel takes (256 x 16384)."""
MAX_HIDDEN = 65536
"""Largest hidden size probed: 4x the largest any fused kernel takes (16384:
fusion_passes/backends/thresholds.py ``max_hidden``)."""

SIZE_ARGS = {"aten.view.default": 1, "aten.reshape.default": 1, "aten._unsafe_view.default": 1,
             "aten.expand.default": 1, "aten.full.default": 0}
"""Ops that take a list of sizes, and its position."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """``token``: the static token count ``T`` (an int) or the token symbol (dynamic)."""

    token: object
    hidden: int
    as_is: bool = False

    @property
    def dynamic(self) -> bool:
        return not isinstance(self.token, int)

    @property
    def literal(self) -> bool:
        """A static graph probed as it is: one token (a size 1 names no token), or a few
        rows over several leading dimensions (``as_is``)."""
        return self.as_is or (self.token == 1 and not self.dynamic)

    @property
    def tokens(self) -> tuple[int, ...]:
        return (1,) if self.literal else TOKENS

    def key_args(self, node: Node, args: tuple) -> tuple:
        """*node*'s arguments with their sizes as :meth:`key` gives them (nodes kept)."""
        def one(a):
            v = val(a) if isinstance(a, Node) else a
            return ("size", self.key(v)) if isinstance(v, torch.SymInt) else a

        args = tuple(one(a) for a in args)
        pos = SIZE_ARGS.get(op_name(node.target)) if node.op == "call_function" else None
        if pos is not None and len(args) > pos and isinstance(args[pos], (list, tuple)):
            sizes = [one(a) for a in args[pos]]
            if not self.dynamic and not self.literal and (len(sizes) > 1 or self.per_token(sizes)):
                sizes = [("size", d) if isinstance(d, tuple) else d
                         for d in _static_key(sizes, self.token, last=len(sizes) == 1)]
            args = (*args[:pos], tuple(sizes), *args[pos + 1:])
        return args

    def per_token(self, sizes) -> bool:
        """A one-size list that is the static token count, not the hidden size: a per-token
        vector (``full([T], 1)``: transformers' per-row FP8 amax floor)."""
        return (len(sizes) == 1 and not self.dynamic and sizes[0] == self.token
                and sizes[0] != self.hidden)

    def key(self, d) -> object:
        """A size as the verdict cache sees it: ``("T", k)`` for ``k * T``, else itself."""
        if isinstance(d, torch.SymInt):
            expr = d.node.expr
            ratio = expr / self.token
            if ratio.is_Integer:
                return "T", int(ratio)
            return "expr", str(expr)
        return d

    def key_shape(self, shape) -> tuple:
        if self.dynamic:
            return tuple(self.key(d) for d in shape)
        return tuple(shape) if self.literal else _static_key(shape, self.token, last=True)

    def at(self, rows: int) -> "Sizes":
        return Sizes(self, rows)


def _static_key(shape, token: int, last: bool = False) -> tuple:
    """*shape* with its leftmost size equal to *token* (a leftmost multiple ``k * token``:
    a flattened view) as ``("T", k)``; the last size too when *last* (a per-token vector),
    else never (the hidden size)."""
    out, done = [], False
    for i, d in enumerate(shape):
        k = _multiple(d, token, i, len(shape)) if not done and (last or i < len(shape) - 1) else None
        done = done or k is not None
        out.append(("T", k) if k is not None else d)
    return tuple(out)


def _multiple(d, token: int, i: int, rank: int) -> int | None:
    """``k`` when size *d* (the *i*-th of *rank*) is ``k`` tokens' worth: *token* itself, or
    a multiple of it leading a shape of two or more sizes (rows of a flattened view)."""
    if not isinstance(d, int) or isinstance(d, bool):
        return None
    if d == token:
        return 1
    return d // token if i == 0 and rank > 1 and d > token and d % token == 0 else None


@dataclasses.dataclass(frozen=True)
class Sizes:
    """A :class:`Plan` at ``rows`` tokens: concrete shapes and size arguments."""

    plan: Plan
    rows: int

    def size(self, d) -> int:
        if isinstance(d, torch.SymInt):
            return int(d.node.expr.xreplace({self.plan.token: self.rows}))
        return d

    def shape(self, shape, last: bool = False) -> tuple:
        """A value's shape at this token count (*last*: see :func:`_static_key`)."""
        if self.plan.dynamic:
            return tuple(self.size(d) for d in shape)
        if self.plan.literal:
            return tuple(shape)
        return tuple(d[1] * self.rows if isinstance(d, tuple) else d
                     for d in _static_key(shape, self.plan.token, last))

    def args(self, node: Node, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """*node*'s evaluated arguments with its sizes at this token count."""
        args = tuple(self.size(a) if isinstance(a, torch.SymInt) else a for a in args)
        pos = SIZE_ARGS.get(op_name(node.target)) if node.op == "call_function" else None
        if pos is not None and len(args) > pos and isinstance(args[pos], (list, tuple)):
            sizes = [self.size(a) for a in args[pos]]
            if len(sizes) > 1 or self.plan.per_token(sizes):
                sizes = list(self.shape(sizes, last=len(sizes) == 1))
            args = (*args[:pos], sizes, *args[pos + 1:])
        return args, kwargs

    def value_shapes(self, node: Node) -> tuple:
        """The shapes *node*'s value may have at this token count (empty: not a tensor)."""
        v = val(node)
        if not isinstance(v, torch.Tensor):
            return ()
        return self.shape(tuple(v.shape)), self.shape(tuple(v.shape), last=True)


def plan(root: Node, nodes: list[Node]) -> Plan | str:
    """The :class:`Plan` of a chain (*root*: the all-reduced value; *nodes*: every node the
    probes evaluate or feed), or why it cannot be probed."""
    v = val(root)
    shape = tuple(v.shape)
    hidden = shape[-1]
    if not isinstance(hidden, int):
        return f"{root.name}: its last (reduction) dimension {hidden} is dynamic; only the token dimension may be"
    if hidden > MAX_HIDDEN:
        return f"{root.name}: hidden size {hidden} is over {MAX_HIDDEN}, more than any fused kernel takes"
    symbols = set()
    for n in [root, *nodes]:
        for d in _sizes_in(val(n)):
            if isinstance(d, torch.SymInt):
                symbols |= d.node.expr.free_symbols
    lead = [d for d in shape[:-1] if not (isinstance(d, int) and d == 1)]
    if symbols:
        if len(symbols) > 1 or len(lead) != 1 or not isinstance(lead[0], torch.SymInt) \
                or lead[0].node.expr not in symbols:
            return (f"{root.name}: its sizes {[str(d) for d in shape]} hold more than one dynamic size "
                    "(only one token dimension is probed)")
        return Plan(next(iter(symbols)), hidden)
    if len(lead) > 1:
        if math.prod(lead) <= AS_IS_ROWS:
            return Plan(1, hidden, as_is=True)
        return (f"{root.name}: shape {list(shape)} has more than one leading dimension over 1 and over "
                f"{AS_IS_ROWS} rows (probes rescale one token dimension)")
    return Plan(lead[0] if lead else 1, hidden)


def _sizes_in(v) -> list:
    if isinstance(v, torch.Tensor):
        return [*v.shape, *(v.stride() if v.layout == torch.strided else ())]
    if isinstance(v, (torch.SymInt, int)) and not isinstance(v, bool):
        return [v]
    if isinstance(v, (tuple, list)):
        return [d for x in v for d in _sizes_in(x)]
    return []
