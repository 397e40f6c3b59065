"""What recognition by meaning may run: an allowlist of pure, shape-bounded ops.

Probes (:mod:`fusion_passes.recognize.meaning.probes`) evaluate a candidate chain's nodes on inputs they own.
The nodes come from a graph, and a graph may come from a file (``fusion-passes explain
dump.json``): whatever a node names must not write, read files, print, draw random
numbers, talk to other ranks, mutate an input or allocate without bound. So a node is run
only if

* its target is one of the torch ops in :data:`PURE` (found by identity: a Python callable
  that merely carries an op's name is not one), each a functional op with no mutable
  argument, no random draw and no side effect (``tests/test_dump_safety.py`` checks the
  schemas), run on CPU: arithmetic, comparisons, casts, views, last-dim reductions and
  factories of a given size;
* or it is bounded Python integer / float arithmetic (:data:`PYTHON_OPS`, the size
  expressions of a dynamic-shape graph) or ``getitem`` of an op's tuple result;
* and every tensor it returns, computed first on the ``meta`` device (shapes only, no
  data), has at most :data:`MAX_NUMEL` elements.

Anything else is refused with a reason (:func:`call` raises :class:`Refused`); the probes
treat the node's value as unknown (see :func:`fusion_passes.recognize.meaning.decide.norm_envs`).
"""

from __future__ import annotations

import math
import operator

import torch

from fusion_passes import _compat

aten, prims = torch.ops.aten, torch.ops.prims

PURE = frozenset({
    # elementwise arithmetic and math
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.add.Scalar, aten.sub.Scalar, aten.mul.Scalar, aten.div.Scalar, aten.pow.Tensor_Scalar,
    aten.pow.Tensor_Tensor, aten.maximum.default, aten.minimum.default,
    aten.neg.default, aten.abs.default, aten.reciprocal.default, aten.rsqrt.default, aten.sqrt.default,
    aten.sign.default, aten.log2.default, aten.exp2.default, aten.ceil.default, aten.floor.default,
    aten.round.default, aten.square.default,
    aten.clamp.default, aten.clamp.Tensor, aten.clamp_min.default, aten.clamp_min.Tensor,
    aten.clamp_max.default, aten.clamp_max.Tensor,
    aten.where.self, aten.where.ScalarSelf, aten.where.ScalarOther, aten.where.Scalar,
    aten.masked_fill.Scalar, aten.masked_fill.Tensor,
    # comparisons and bit operations
    *(getattr(aten, op).Tensor for op in ("eq", "ne", "gt", "ge", "lt", "le")),
    *(getattr(aten, op).Scalar for op in ("eq", "ne", "gt", "ge", "lt", "le")),
    aten.logical_and.default, aten.logical_or.default, aten.logical_not.default,
    aten.bitwise_and.Tensor, aten.bitwise_or.Tensor, aten.bitwise_and.Scalar, aten.bitwise_or.Scalar,
    aten.bitwise_left_shift.Tensor, aten.bitwise_right_shift.Tensor,
    # casts and copies (a new tensor; never into an existing one)
    prims.convert_element_type.default, aten._to_copy.default, aten.clone.default,
    aten.lift_fresh_copy.default, aten.copy.default, aten.index_put.default,
    # views and layout
    aten.view.default, aten.view.dtype, aten.reshape.default, aten._unsafe_view.default,
    aten.expand.default, aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims,
    aten.unsqueeze.default, aten.permute.default, aten.transpose.int, aten.t.default, aten.alias.default,
    aten.slice.Tensor, aten.select.int,
    # reductions
    aten.amax.default, aten.amin.default, aten.max.default, aten.min.default, aten.max.dim,
    aten.min.dim, aten.aminmax.default, aten.mean.dim, aten.sum.dim_IntList,
    # factories of a given size and value (no random draw; the size is bounded below)
    aten.full.default, aten.full_like.default, aten.zeros_like.default, aten.ones_like.default,
    aten.scalar_tensor.default,
    # a size of a tensor (dynamic-shape graphs)
    aten.sym_size.int,
})
"""The torch ops probes run (by identity)."""

PYTHON_OPS = {
    operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv, operator.mod,
    operator.neg, operator.pow, operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
}
"""Python operators probes run on plain numbers (a dynamic graph's size arithmetic)."""

MAX_NUMEL = 2 ** 22
"""Most elements one evaluated tensor may have: 256 rows of the largest hidden size a fused
kernel takes (16384: fusion_passes/backends/thresholds.py ``max_hidden``); probes hold at
most 16 rows (fusion_passes.recognize.meaning.probe_sizes.TOKENS)."""
MAX_BYTES = 1 << 30
"""Bytes the tensors evaluated for one set of probe environments may take in all (the norm
probes of a chain, or the quant probes of one reading): about 4x the most measured,
246 MiB for the quant probes of vLLM's reference NVFP4 chain at hidden 16384 (74 MiB for
its norm probes; per-token, per-group and per-tensor FP8 take under 50 MiB there: the
corpus cases vllm_ref_nvfp4, vllm_native_per_token, sglang_native_group128 and
torchao_training_tensorwise with ``hidden=16384``, token-dynamic)."""

MAX_INT = 2 ** 62
"""Largest magnitude of a Python number an evaluated operator reads or returns (a tensor
size fits in int64; ``pow`` also needs an exponent of at most :data:`MAX_EXPONENT`)."""
MAX_EXPONENT = 64


class Refused(Exception):
    """A node probes do not run (the message says why)."""


class Budget:
    """Bytes the tensors of one set of probe environments may take in all (:data:`MAX_BYTES`)."""

    def __init__(self, left: int | None = None):
        self.left = MAX_BYTES if left is None else left

    def take(self, out) -> None:
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.left -= t.numel() * t.element_size()
        if self.left < 0:
            raise Refused(f"the probes of this chain would take over {MAX_BYTES >> 20} MiB")


def call(target, args: tuple, kwargs: dict, budget: Budget | None = None):
    """``target(*args, **kwargs)`` if it is pure and bounded (module docstring), else raise
    :class:`Refused`. *args* hold probe values (tensors the probe owns, numbers); the
    tensors it returns are charged to *budget*."""
    if target is operator.getitem:
        if not isinstance(args[0], (tuple, list)) or not isinstance(args[1], int):
            raise Refused("getitem of something other than an op's tuple result")
        return args[0][args[1]]
    if target in PYTHON_OPS:
        return _number_op(target, args, kwargs)
    if not isinstance(target, _compat.OpOverload) or target not in PURE:
        raise Refused("not an op recognition by meaning evaluates (pure arithmetic, casts, views, "
                      "reductions)")
    if any(a.name == "device" and a.kwarg_only for a in _compat.op_schema(target).arguments):
        kwargs = {**kwargs, "device": torch.device("cpu")}  # a factory: on the probe's device
    _check_sizes(target, args, kwargs)
    out = target(*args, **kwargs)
    if budget is not None:
        budget.take(out)
    return out


def _number_op(target, args: tuple, kwargs: dict):
    if kwargs or not all(type(a) in (int, float, bool) for a in args):
        raise Refused(f"operator.{target.__name__} on something other than plain numbers")
    if any(abs(a) > MAX_INT for a in args if not (isinstance(a, float) and math.isnan(a))):
        raise Refused(f"operator.{target.__name__} on a number over 2**62")
    if target is operator.pow and (abs(args[1]) > MAX_EXPONENT or abs(args[0]) > MAX_INT ** 0.5):
        raise Refused("operator.pow with an exponent over 64 or a base over 2**31")
    out = target(*args)
    if isinstance(out, (int, float)) and not isinstance(out, bool) and math.isfinite(out) and abs(out) > MAX_INT:
        raise Refused(f"operator.{target.__name__} gives a number over 2**62")
    return out


def _check_sizes(target, args: tuple, kwargs: dict) -> None:
    """Run *target* on the meta device (shapes only) and bound what it returns."""
    def meta(a):
        return a.to("meta") if isinstance(a, torch.Tensor) else a

    m_args = torch.utils._pytree.tree_map(meta, args)
    m_kwargs = {k: (torch.device("meta") if k == "device" else meta(v)) for k, v in kwargs.items()}
    try:
        out = target(*m_args, **m_kwargs)
    except Exception as e:  # noqa: BLE001 - a bad call is refused, not run
        raise Refused(f"does not run on these shapes ({type(e).__name__})") from None
    for t in torch.utils._pytree.tree_leaves(out):
        if isinstance(t, torch.Tensor) and t.numel() > MAX_NUMEL:
            raise Refused(f"would make a tensor of {t.numel()} elements (probes evaluate at most {MAX_NUMEL})")
