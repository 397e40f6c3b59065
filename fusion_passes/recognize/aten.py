"""The plain PyTorch dialect: ``_c10d_functional`` all-reduces, RMSNorm decomposed into aten
/ prims ops, and the residual add, read into the roles of :mod:`fusion_passes.recognize.roles`.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from fusion_passes import groups
from fusion_passes.recognize.fx import converts_to, dtype_of, is_named, is_op, short, val
from fusion_passes.recognize.roles import AllReduce, Miss, Norm

aten = torch.ops.aten
C10D_ALL_REDUCE = "_c10d_functional.all_reduce.default"
C10D_WAIT = "_c10d_functional.wait_tensor.default"


def all_reduce(node: Node) -> AllReduce | Miss | None:
    """The c10d :class:`AllReduce` rooted at *node* (``all_reduce`` then its one
    ``wait_tensor``), a Miss if it is one we cannot use, else None."""
    if not is_named(node, C10D_ALL_REDUCE):
        return None
    x, op, name = node.args[:3]
    if op != "sum":
        return Miss(f"all-reduce with op {op!r}: only 'sum' fuses", node)
    waits = [u for u in node.users if is_named(u, C10D_WAIT)]
    if len(waits) != 1 or len(node.users) != 1:
        return Miss(f"all-reduce {node.name} is not followed by exactly one wait_tensor", node)
    return AllReduce(node, x, waits[0], groups.qualify("c10d", name), (node, waits[0]))


# ----------------------------------------------------------------------------- RMSNorm

_LOW = (torch.bfloat16, torch.float16)


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
        entries = [u for u in x.users if converts_to(u, torch.float32)]
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
    if upcast and converts_to(nxt, in_dtype):
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
            if converts_to(base, torch.float32) and len(base.users) == 1:
                extra.add(base)
                base = base.args[0]
            w, gemma = base, True
        if not gemma and converts_to(w, torch.float32) and len(w.users) == 1 and weight_ok(w.args[0]):
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
        if not converts_to(conv, in_dtype):
            return Miss(f"{short(conv)} after the weight multiply is not the cast back to {in_dtype}", conv)
        return w, gemma, True, conv, {nxt, conv} | extra
    return Miss(f"{short(nxt)} follows the normalization; expected a cast back or a weight multiply", nxt)


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
