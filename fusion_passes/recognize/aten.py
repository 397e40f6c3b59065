"""Recognize: map dialect-specific nodes to the canonical roles the catalogue speaks of.

Roles: :class:`AllReduce` (a reduction and the node that carries its value),
:class:`Norm` (an RMSNorm, decomposed aten or a dialect op, optionally with the residual
add fused in, as vLLM's ``fused_add_rms_norm``). Every recognizer returns the role or a
:class:`Miss` whose ``reason`` says why not, in the spirit of MLIR's
``notifyMatchFailure``: the report and ``fusion-passes explain`` print it.

One adapter per dialect: :data:`PLAIN` (``_c10d_functional`` + decomposed aten) and
:data:`VLLM` (``vllm.all_reduce`` + ``vllm_ir`` norms). Patterns never name dialect ops.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
from torch.fx import Node

from fusion_passes import groups
from fusion_passes.recognize import fx as fx_util
from fusion_passes.variants import Flags

aten = torch.ops.aten
prims = torch.ops.prims
C10D_ALL_REDUCE = "_c10d_functional.all_reduce.default"
C10D_WAIT = "_c10d_functional.wait_tensor.default"
VLLM_ALL_REDUCE = "vllm.all_reduce.default"
VLLM_RMS_NORM = "vllm_ir.rms_norm.default"
VLLM_ADD_RMS_NORM = "vllm_ir.fused_add_rms_norm.default"


@dataclasses.dataclass(frozen=True)
class Miss:
    """A non-match: why, and the node that made it so."""

    reason: str
    node: Node | None = None

    def __bool__(self) -> bool:  # a Miss is falsy so ``if not (m := match(...))`` reads well
        return False


@dataclasses.dataclass
class AllReduce:
    """One sum all-reduce. ``value`` is the node whose result is the reduced tensor
    (``wait_tensor`` for c10d, the op itself for vLLM); ``nodes`` all belong to it."""

    node: Node
    input: Node
    value: Node
    group: str  # qualified: "c10d:<name>" / "vllm:<name>"
    nodes: tuple[Node, ...]


@dataclasses.dataclass
class Norm:
    """An RMSNorm of ``input`` (optionally ``input + residual``, fused in the op itself)."""

    input: Node
    weight: Node | None
    eps: float
    gemma: bool
    weight_in_fp32: bool
    out: Node  # the node whose value is the normalized tensor
    nodes: tuple[Node, ...]  # every node of the norm, out included, to be removed
    residual: Node | None = None  # set when the norm op adds the residual itself
    residual_out: Node | None = None  # ... and then the node carrying input + residual
    # vLLM's fused_add_rms_norm adds in fp32 and normalizes the UNROUNDED fp32 sum (only
    # the returned residual is rounded); the plain chain rounds the sum first.
    residual_in_fp32: bool = False
    # the norm output keeps the type promotion of weight and activations with the weight
    # multiplied in fp32 (fusion_passes.match.follow_inductor_precision)
    promote_out: bool = False
    # the sum and quant as Inductor's default compile reads them (match.follow_inductor_sum);
    # carry_fp32 is set on the previous site's op by the rewrite, never on a norm
    carry_fp32: bool = False
    quant_unrounded: bool = False
    # (node, same) pairs: nodes holding the very value of another, redirected to it right
    # before the rewrite (fusion_passes.recognize.inplace, fusion_passes.recognize.meaning)
    aliases: tuple = ()

    @property
    def flags(self) -> Flags:
        """The fused op's norm conventions for this norm (``fusion_passes.variants.FLAGS``:
        each is an attribute of the same name)."""
        return Flags(**{name: bool(getattr(self, name)) for name in Flags.__dataclass_fields__})


def target_name(node: Node) -> str:
    """``aten.mul.Tensor``-style name of a call_function target (no import of its library)."""
    return fx_util.op_name(node.target)


def short(node: Node) -> str:
    """``mul_3 (aten.mul.Tensor)``: how reasons name a node."""
    return f"{node.name} ({target_name(node)})" if node.op == "call_function" else node.name


def is_op(node: object, *targets) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def is_named(node: object, name: str) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and target_name(node) == name


def val(node: object):
    return node.meta.get("val") if isinstance(node, Node) else None


def dtype_of(node: object) -> torch.dtype | None:
    v = val(node)
    return v.dtype if isinstance(v, torch.Tensor) else None


# ---------------------------------------------------------------------------- all-reduce


def all_reduce(node: Node) -> AllReduce | Miss | None:
    """The :class:`AllReduce` rooted at *node*, a Miss if it is one we cannot use, else None."""
    if is_named(node, C10D_ALL_REDUCE):
        x, op, name = node.args[:3]
        if op != "sum":
            return Miss(f"all-reduce with op {op!r}: only 'sum' fuses", node)
        waits = [u for u in node.users if is_named(u, C10D_WAIT)]
        if len(waits) != 1 or len(node.users) != 1:
            return Miss(f"all-reduce {node.name} is not followed by exactly one wait_tensor", node)
        return AllReduce(node, x, waits[0], groups.qualify("c10d", name), (node, waits[0]))
    if is_named(node, VLLM_ALL_REDUCE):
        x = node.args[0]
        name = node.args[1] if len(node.args) > 1 else node.kwargs["group_name"]
        return AllReduce(node, x, node, groups.qualify("vllm", name), (node,))
    return None


# ----------------------------------------------------------------------------- RMSNorm

_CONVERTS = (prims.convert_element_type.default,)
_LOW = (torch.bfloat16, torch.float16)


def _convert_to(node: object, dtype: torch.dtype | None = None) -> bool:
    if is_op(node, *_CONVERTS):
        return dtype is None or node.args[1] == dtype
    if is_op(node, aten._to_copy.default):
        return dtype is None or node.kwargs.get("dtype") == dtype
    return False


def _other(node: Node, known: Node):
    """The operand of a binary op that is not *known* (None if both or neither are)."""
    a, b = node.args[:2]
    if a is known and b is not known:
        return b
    if b is known and a is not known:
        return a
    return None


def _sole_user(node: Node) -> Node | Miss:
    if len(node.users) != 1:
        names = ", ".join(u.name for u in node.users)
        return Miss(f"RMSNorm intermediate {node.name} has {len(node.users)} users ({names})", node)
    return next(iter(node.users))


def _is_square_of(node: Node, x: Node) -> bool:
    if is_op(node, aten.pow.Tensor_Scalar) and node.args[0] is x and node.args[1] == 2:
        return True
    return is_op(node, aten.mul.Tensor) and node.args[0] is x and node.args[1] is x


def decomposed_rms_norm(x: Node) -> Norm | Miss:
    """An RMSNorm applied to *x* in decomposed aten form, or why there is none.

    Accepted (every real model we traced uses one of these):
    ``[x32 = convert(x, f32)] ; rs = rsqrt(mean(x32^2, -1, keepdim) + eps) ; n = x32 * rs``
    then ``w * convert(n)`` (HF Llama), ``convert(n * w)`` (F.rms_norm, vLLM),
    ``convert(n * (1 + convert(w)))`` (Gemma), ``convert(n)`` (no weight), or, for fp32
    inputs, ``n * w`` / ``n``.
    """
    in_dtype = dtype_of(x)
    if in_dtype is None:
        return Miss(f"{x.name} has no tensor metadata", x)
    shape = val(x).shape
    if not shape or not isinstance(shape[-1], int):
        return Miss(f"{x.name}: hidden size is not a static int ({shape})", x)
    hidden = shape[-1]
    upcast = in_dtype in _LOW
    x32 = _norm_entry(x, in_dtype, upcast)
    if not x32:
        return x32
    core = _rms_core(x, x32, len(shape))
    if not core:
        return core
    sq, normed, eps, chain = core
    inner = chain | ({x32} if upcast else set())
    if upcast and set(x32.users) != {sq, normed}:
        return Miss(f"RMSNorm intermediate {x32.name} has users outside the norm", x32)
    tail = _norm_tail(normed, in_dtype, upcast, hidden)
    if not tail:
        return tail
    weight, gemma, w_fp32, out, tail_nodes = tail
    return Norm(x, weight, float(eps), gemma, w_fp32, out, tuple(inner | tail_nodes))


def _norm_entry(x: Node, in_dtype: torch.dtype, upcast: bool) -> Node | Miss:
    """The entry node of the norm: the fp32 upcast of *x* (or *x* itself for fp32 inputs)."""
    if upcast:
        entries = [u for u in x.users if _convert_to(u, torch.float32)]
        if not entries:
            if any(is_op(u, aten.pow.Tensor_Scalar) for u in x.users):
                return Miss(f"RMSNorm of {x.name} computed in {in_dtype} without fp32 upcast", x)
            return Miss(f"no RMSNorm consumes {x.name} (users: {_names(x.users)})", x)
        return entries[0]
    if in_dtype == torch.float32:
        return x
    return Miss(f"{x.name} has dtype {in_dtype}: RMSNorm fuses for bf16, fp16, fp32", x)


def _rms_core(x: Node, x32: Node, rank: int) -> tuple[Node, Node, float, set[Node]] | Miss:
    """``n = x32 * rsqrt(mean(x32^2, -1, keepdim) + eps)`` -> ``(x32^2, n, eps, its nodes)``."""
    squares = [u for u in x32.users if _is_square_of(u, x32)]
    if not squares:
        return Miss(f"no RMSNorm consumes {x.name} (users: {_names(x.users)})", x)
    sq = squares[0]
    mean = _sole_user(sq)
    if not mean:
        return mean
    if not is_op(mean, aten.mean.dim):
        return Miss(f"{short(mean)} after x^2 is not a mean", mean)
    dims = list(mean.args[1]) if len(mean.args) > 1 else []
    keepdim = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
    if dims not in ([-1], [rank - 1]) or not keepdim:
        return Miss(f"{short(mean)} reduces dims {dims} (keepdim={keepdim}); RMSNorm needs the last dim", mean)
    add_eps = _sole_user(mean)
    if not add_eps:
        return add_eps
    # (add_ appears in non-functionalized traces of F.rms_norm; it mutates only mean's result)
    if not is_op(add_eps, aten.add.Tensor, aten.add.Scalar, aten.add_.Scalar, aten.add_.Tensor) or not isinstance(
        eps := _other(add_eps, mean), (int, float)
    ):
        return Miss(f"{short(add_eps)} after mean is not + eps", add_eps)
    rs = _sole_user(add_eps)
    if not rs:
        return rs
    if not is_op(rs, aten.rsqrt.default):
        return Miss(f"{short(rs)} after mean + eps is not rsqrt", rs)
    normed = _sole_user(rs)
    if not normed:
        return normed
    if not is_op(normed, aten.mul.Tensor) or _other(normed, rs) is not x32:
        return Miss(f"{short(normed)} does not multiply {x32.name} by rsqrt", normed)
    return sq, normed, eps, {sq, mean, add_eps, rs, normed}


def _norm_tail(normed: Node, in_dtype, upcast: bool, hidden: int):
    """After ``n = x32 * rsqrt(...)``: the weight form, or a Miss."""

    def weight_ok(w) -> bool:
        v = val(w)
        return isinstance(w, Node) and isinstance(v, torch.Tensor) and tuple(v.shape) == (hidden,)

    nxt = _sole_user(normed) if normed.users else None
    if nxt is None or (not upcast and not is_op(nxt, aten.mul.Tensor)):
        return None, False, True, normed, set()  # fp32, no weight: n is the output
    if not nxt:
        return nxt
    if upcast and _convert_to(nxt, in_dtype):
        # n.to(dt) [* w]   (HF Llama multiplies by the weight after the cast back)
        if len(nxt.users) == 1 and is_op(mul := next(iter(nxt.users)), aten.mul.Tensor):
            w = _other(mul, nxt)
            if weight_ok(w):
                return w, False, False, mul, {nxt, mul}
        return None, False, True, nxt, {nxt}
    if is_op(nxt, aten.mul.Tensor):
        w = _other(nxt, normed)
        gemma = False
        extra: set[Node] = set()
        if is_op(w, aten.add.Tensor) and len(w.users) == 1 and 1 in [a for a in w.args[:2] if not isinstance(a, Node)]:
            # Gemma: n * (1 + w.float())
            base = next(a for a in w.args[:2] if isinstance(a, Node))
            extra = {w}
            if _convert_to(base, torch.float32) and len(base.users) == 1:
                extra.add(base)
                base = base.args[0]
            w, gemma = base, True
        if not gemma and _convert_to(w, torch.float32) and len(w.users) == 1 and weight_ok(w.args[0]):
            # n * w.float(): the fused op takes w itself (fp32 n * w promotes exactly the
            # same), so the cast does not survive as a kernel of its own
            extra, w = {w}, w.args[0]
        if not weight_ok(w):
            return Miss(f"{short(nxt)} multiplies the norm by {getattr(w, 'name', w)!r}, not a [{hidden}] weight", nxt)
        if not upcast:
            return w, gemma, True, nxt, {nxt} | extra
        conv = _sole_user(nxt)
        if not conv:
            return conv
        if not _convert_to(conv, in_dtype):
            return Miss(f"{short(conv)} after the weight multiply is not the cast back to {in_dtype}", conv)
        return w, gemma, True, conv, {nxt, conv} | extra
    return Miss(f"{short(nxt)} follows the normalization; expected a cast back or a weight multiply", nxt)


def _vllm_arg(node: Node, index: int, name: str, default=None):
    """Argument *index* / keyword *name* of a vLLM IR op call (schema order)."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _vllm_weight_order(node: Node, x: Node, w) -> bool | Miss:
    """``weight_in_fp32`` of a vLLM IR norm: its native implementation computes
    ``(normed32.to(w.dtype) * w).to(x.dtype)`` (vllm/ir/ops/layernorm.py), i.e. the
    multiply happens in the WEIGHT's dtype: fp32 for an fp32 weight, else the activation
    dtype after the cast (the Hugging Face order). Other weight dtypes: a Miss."""
    if w is None:
        return True
    wd, xd = dtype_of(w), dtype_of(x)
    if wd == torch.float32:
        return True
    if wd == xd:
        return False
    return Miss(f"{short(node)}: weight dtype {wd} is neither fp32 nor the activation dtype {xd}", node)


def _vllm_norm_args(u: Node, x: Node, w_pos: int) -> tuple[Node, float, bool] | Miss:
    """``(weight, eps, weight_in_fp32)`` of a vLLM norm whose weight is argument *w_pos*
    (epsilon and variance_size follow it), or why it does not fuse."""
    w, eps = _vllm_arg(u, w_pos, "weight"), _vllm_arg(u, w_pos + 1, "epsilon")
    if _vllm_arg(u, w_pos + 2, "variance_size") is not None:
        return Miss(f"{short(u)} normalizes over a variance_size prefix", u)
    w_fp32 = _vllm_weight_order(u, x, w)
    return w_fp32 if isinstance(w_fp32, Miss) else (w, float(eps), w_fp32)


def vllm_rms_norm(x: Node) -> Norm | Miss | None:
    """vLLM's IR norms consuming *x*, as vLLM 0.33 traces them (``ir_enable_torch_wrap``):

    * ``vllm_ir.rms_norm.default(x, weight, epsilon, variance_size=None)``
    * ``vllm_ir.fused_add_rms_norm.default(x, x_residual, weight, epsilon,
      variance_size=None) -> (out, residual_out)``, read through ``getitem`` 0 / 1; the
      final norm of a model has no ``getitem 1``. Its sum is taken in fp32 and symmetric
      in ``x`` and ``x_residual``, so *x* may sit in either position.

    ``variance_size`` (a norm over a prefix of the hidden dim) does not fuse."""
    for u in x.users:
        if is_named(u, VLLM_RMS_NORM) and _vllm_arg(u, 0, "x") is x:
            args = _vllm_norm_args(u, x, 1)
            if isinstance(args, Miss):
                return args
            w, eps, w_fp32 = args
            return Norm(x, w, eps, False, w_fp32, u, (u,))
        if is_named(u, VLLM_ADD_RMS_NORM):
            a, b = _vllm_arg(u, 0, "x"), _vllm_arg(u, 1, "x_residual")
            if a is x and b is not x:
                res = b
            elif b is x and a is not x:
                if dtype_of(a) != dtype_of(x):  # x's dtype is the output dtype: not symmetric
                    return Miss(f"{short(u)}: residual and input dtypes differ", u)
                res = a
            else:
                continue
            args = _vllm_norm_args(u, x, 2)
            if isinstance(args, Miss):
                return args
            w, eps, w_fp32 = args
            if any(g.target is not operator.getitem for g in u.users):
                return Miss(f"{short(u)}: its tuple is used other than through getitem", u)
            getitems: dict[int, Node] = {}
            for g in u.users:
                if g.args[1] in getitems:  # two getitems of one output: keep the graph simple
                    return Miss(f"{short(u)}: output {g.args[1]} read by two getitems", g)
                getitems[g.args[1]] = g
            if 0 not in getitems:
                return Miss(f"{short(u)}: norm output unused", u)
            nodes = (u, *getitems.values())
            return Norm(x, w, float(eps), False, w_fp32, getitems[0], nodes, res, getitems.get(1),
                        residual_in_fp32=True)
    return None


def residual_add(value: Node) -> tuple[Node, Node] | Miss | None:
    """``value + residual`` (either order): ``(add node, residual)``, or None if the only
    user of *value* is not an add."""
    if len(value.users) != 1:
        return None
    add = next(iter(value.users))
    if not is_op(add, aten.add.Tensor) or len(add.args) != 2 or add.kwargs.get("alpha", 1) != 1:
        return None
    res = _other(add, value)
    if not isinstance(res, Node):
        return Miss(f"{short(add)} adds a scalar, not a residual", add)
    if dtype_of(res) != dtype_of(value) or val(res).shape != val(value).shape:
        return Miss(f"{short(add)}: residual {res.name} differs in shape or dtype (broadcast add)", add)
    return add, res


def _names(nodes) -> str:
    return ", ".join(short(n) for n in nodes) or "none"
