"""In-place norm kernels under ``auto_functionalized`` / ``auto_functionalized_v2``.

Model code that calls an in-place kernel (vLLM's ``_C.fused_add_rms_norm``, SGLang's
``sgl_kernel.fused_add_rmsnorm``, vLLM IR's ``fused_add_rms_norm.maybe_inplace``) reaches a
post-grad graph functionalized: one ``auto_functionalized`` node (or ``_v2``, the default
of ``torch.compile``) that returns the op's outputs and then the NEW values of the
arguments it mutates, read through ``getitem``:

* v1: ``(*outputs, *mutated args in schema order)``;
* v2: ``(*outputs, *new bases)`` with ``_<arg>_base_index`` naming each argument's base
  in ``_all_bases``; an argument that is a view of its whole base (``_<arg>_alias``) reads
  as the base, one that is a part of a larger base (``_<arg>_size`` / ``_slice_*``) is
  refused: the fused op returns whole tensors. :func:`functionalized_call` reads both
  forms alike (the quant readers' :func:`fusion_passes.recognize.quant_read.c_op` uses it too).

An op that returns nothing still takes one output slot. :data:`OPS` says, per op, where the
normalized value and the new residual come out and which norm conventions its kernel
computes, so the rewrite replaces each ``getitem`` by the fused op's output of the same
value: the mutation semantics stay as the functional graph states them.

``maybe_inplace`` (vLLM IR) may or may not overwrite its activations: what they hold
afterwards is unspecified, and vLLM never reads them. The functional graph here holds them
unchanged (the native implementation is functional); a read of the new residual is
redirected to the residual (the same value), a read of the new ``x`` refuses the site.
"""

from __future__ import annotations

import dataclasses
import operator

from torch.fx import Node

from fusion_passes import _compat
from fusion_passes.recognize.fx import dtype_of, op_name, short
from fusion_passes.recognize.roles import Miss, Norm
from fusion_passes.recognize.vllm_ir import vllm_weight_order


@dataclasses.dataclass(frozen=True)
class InplaceNorm:
    """Where an in-place norm op's pieces are: argument names of the input, residual,
    weight and eps; ``normed`` / ``summed``: ``"out<i>"`` (the op's i-th output) or the name
    of the mutated argument that receives the value; the conventions its kernel computes
    (``weight_in_fp32=None``: by the weight's dtype, as vLLM IR)."""

    x: str
    residual: str | None
    weight: str
    eps: str
    normed: str
    summed: str | None
    residual_in_fp32: bool
    weight_in_fp32: bool | None
    source: str
    maybe: bool = False


OPS = {
    "vllm_ir.fused_add_rms_norm.maybe_inplace": InplaceNorm(
        "x", "x_residual", "weight", "epsilon", "out0", "out1", True, None,
        "vllm/ir/ops/layernorm.py fused_add_rms_norm (native: fp32 sum, x.to(weight.dtype) * weight)", maybe=True),
    "_C.fused_add_rms_norm.default": InplaceNorm(
        "input", "residual", "weight", "epsilon", "input", "residual", False, False,
        "vLLM csrc/layernorm_kernels.cu fused_add_rms_norm_kernel: z = input + residual in scalar_t, "
        "(scalar_t)(x * s) * weight"),
    "_C.rms_norm.default": InplaceNorm(
        "input", None, "weight", "epsilon", "result", None, False, False,
        "vLLM csrc/layernorm_kernels.cu rms_norm_kernel: (scalar_t)(x * s) * weight"),
    "sgl_kernel.fused_add_rmsnorm.default": InplaceNorm(
        "input", "residual", "weight", "eps", "input", "residual", True, True,
        "sgl-kernel -> FlashInfer norm.cuh FusedAddRMSNormKernel: fp32 sum, x * rms_rcp * float(w)"),
    "sgl_kernel.rmsnorm.default": InplaceNorm(
        "input", None, "weight", "eps", "output", None, False, True,
        "sgl-kernel -> FlashInfer norm.cuh RMSNormKernel: x * rms_rcp * float(w)"),
}
"""qualified op name -> :class:`InplaceNorm`."""


_VIEW_INFO = ("size", "stride", "storage_offset", "slice_dim", "slice_start", "slice_end", "length")
"""``auto_functionalized_v2`` keys of an argument that is a PART of its base (a slice, a
strided view, a list): the fused op returns whole tensors, so such a call is refused.
``_<arg>_alias`` is not among them: torch writes it when the argument is a view with the
base's own size, stride and offset (``is_alias`` in torch/_higher_order_ops/
auto_functionalize.py), e.g. ``y.view(y.shape)`` in vLLM's MoE blocks: the same values as
the base, before and after the op."""


@dataclasses.dataclass(frozen=True)
class Call:
    """One ``auto_functionalized(_v2)`` call, read the same way for v1 and v2: the op's
    qualified name, its arguments by name (a v2 argument replaced by its base, which holds
    the same values), each mutated argument's ``getitem`` index in the v1 numbering
    (``(*outputs, *mutated args in schema order)``) -> its index on this node, and the
    mutated arguments that are parts of their base (refused)."""

    name: str
    args: dict
    index: dict[str, int]
    v1_index: dict[int, int]
    partial_views: tuple[str, ...] = ()


def functionalized_call(af: Node) -> Call | None:
    """The :class:`Call` of an ``auto_functionalized(_v2)`` node, or None."""
    kind = getattr(af.target, "__name__", "")
    if af.op != "call_function" or kind not in ("auto_functionalized", "auto_functionalized_v2"):
        return None
    op = af.args[0]
    if not isinstance(op, _compat.OpOverload):
        return None
    schema = _compat.op_schema(op)
    slots = max(1, len(schema.returns))
    mutated = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    args = dict(af.kwargs)
    if kind == "auto_functionalized":
        index = {name: slots + i for i, name in enumerate(mutated)}
        return Call(op_name(op), args, index, {i: i for i in range(slots + len(mutated))})
    bases = args.pop("_all_bases", [])
    index, views = {}, []
    for name in mutated:  # torch/_higher_order_ops/auto_functionalize.py writes a view's info
        if any(f"_{name}_{k}" in args for k in _VIEW_INFO):
            views.append(name)
        at = args.pop(f"_{name}_base_index", None)
        args.pop(f"_{name}_alias", None)
        if at is None:  # an optional mutated argument passed as None
            continue
        index[name] = slots + at
        args[name] = bases[at]
    v1 = {i: i for i in range(slots)}
    v1.update({slots + i: index[name] for i, name in enumerate(mutated) if name in index})
    return Call(op_name(op), args, index, v1, tuple(views))


def partial_view_miss(af: Node, call: Call) -> Miss:
    """Why a call that writes into a part of a larger tensor is not fused."""
    return Miss(f"{short(af)}: {', '.join(call.partial_views)} is a slice or strided view of a larger "
                "tensor (auto_functionalized_v2); the fused op writes whole tensors", af)


def is_inplace_norm(node: Node) -> bool:
    """Whether *node* is an ``auto_functionalized(_v2)`` call of an op in :data:`OPS` (a
    norm: where hoisting stops, as at any norm)."""
    call = functionalized_call(node) if node.op == "call_function" else None
    return call is not None and call.name in OPS


def inplace_rms_norm(x: Node) -> Norm | Miss | None:
    """An in-place norm op of :data:`OPS` reading *x* (the all-reduced value), as a
    :class:`~fusion_passes.recognize.roles.Norm` whose ``out`` / ``residual_out`` are the getitems
    carrying the normalized value and the new residual; None when no user is one."""
    for af in x.users:
        call = functionalized_call(af)
        if call is None or call.name not in OPS:
            continue
        if call.partial_views:
            return partial_view_miss(af, call)
        name, args, index = call.name, call.args, call.index
        spec = OPS[name]
        res = _residual(spec, args, x)
        if isinstance(res, Miss) or res is False:
            return res if isinstance(res, Miss) else Miss(f"{short(af)} does not normalize {x.name}", af)
        return _norm(af, spec, args, index, x, res)
    return None


def _residual(spec: InplaceNorm, args: dict, x: Node):
    """The residual operand (None without one), False when *x* is not the op's input."""
    if spec.residual is None:
        return None if args.get(spec.x) is x else False
    a, b = args.get(spec.x), args.get(spec.residual)
    if (a is x) == (b is x):
        return False
    other = b if a is x else a
    if dtype_of(other) != dtype_of(x):  # the sum is symmetric only in one dtype
        return Miss(f"{other.name}: residual and input dtypes differ", other)
    return other


def _norm(af: Node, spec: InplaceNorm, args: dict, index: dict[str, int], x: Node, res) -> Norm | Miss:
    items: dict[int, Node] = {}
    for g in af.users:
        if g.target is not operator.getitem:
            return Miss(f"{short(af)} is used by {short(g)}, not only through getitem", g)
        items[g.args[1]] = g
    slot = {k: (int(k[3:]) if k.startswith("out") else index.get(k)) for k in (spec.normed, spec.summed) if k}
    out = items.get(slot[spec.normed])
    if out is None:
        return Miss(f"{short(af)}: its normalized output is unused", af)
    summed = items.get(slot[spec.summed]) if spec.summed else None
    aliases = []
    for name, i in index.items():
        g = items.get(i)
        if g is None or g in (out, summed) or not g.users:
            continue
        if spec.maybe and name == spec.residual and res is not None and args[name] is res:
            aliases.append((g, res))
        elif spec.maybe:
            return Miss(f"{short(af)}: {g.name} reads {name} back after maybe_inplace (its value is "
                        "unspecified)", af)
        else:
            return Miss(f"{short(af)}: {g.name} reads back {name}, a value the fused op does not return", af)
    if args.get("variance_size") is not None:
        return Miss(f"{short(af)} normalizes over a variance_size prefix", af)
    weight = args.get(spec.weight)
    w_fp32 = spec.weight_in_fp32 if spec.weight_in_fp32 is not None else vllm_weight_order(af, x, weight)
    if isinstance(w_fp32, Miss):
        return w_fp32
    nodes = (af, *items.values())
    return Norm(x, weight, float(args[spec.eps]), False, w_fp32, out, nodes, res, summed,
                residual_in_fp32=spec.residual_in_fp32 and res is not None, aliases=tuple(aliases))
