"""The vLLM dialect: ``vllm.all_reduce`` and the ``vllm_ir`` norm ops (vLLM 0.33), read into
the roles of :mod:`fusion_passes.recognize.roles`."""

from __future__ import annotations

import operator

import torch
from torch.fx import Node

from fusion_passes import groups
from fusion_passes.recognize.fx import dtype_of, is_named, short
from fusion_passes.recognize.roles import AllReduce, Miss, Norm

VLLM_ALL_REDUCE = "vllm.all_reduce.default"
VLLM_RMS_NORM = "vllm_ir.rms_norm.default"
VLLM_ADD_RMS_NORM = "vllm_ir.fused_add_rms_norm.default"


def all_reduce(node: Node) -> AllReduce | None:
    """vLLM's ``all_reduce(x, group_name)`` at *node* as an :class:`AllReduce`, else None."""
    if not is_named(node, VLLM_ALL_REDUCE):
        return None
    x = node.args[0]
    name = node.args[1] if len(node.args) > 1 else node.kwargs["group_name"]
    return AllReduce(node, x, node, groups.qualify("vllm", name), (node,))


def _vllm_arg(node: Node, index: int, name: str, default=None):
    """Argument *index* / keyword *name* of a vLLM IR op call (schema order)."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def vllm_weight_order(node: Node, x: Node, w) -> bool | Miss:
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
    w_fp32 = vllm_weight_order(u, x, w)
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
