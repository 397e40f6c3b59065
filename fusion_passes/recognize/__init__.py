"""Recognition: map a graph's dialect-specific nodes to the roles the catalogue speaks of.

The flow, from an all-reduce node to a rewrite-ready site (:func:`fusion_passes.match.find_site`
asks in this order)::

    all_reduce(node)      -> AllReduce | Miss | None   aten (c10d), vllm_ir (vllm.all_reduce)
    aten.residual_add(v)  -> (add, residual) | Miss | None
    rms_norm(x)           -> Norm | Miss               vllm_ir, inplace, aten (decomposed)
    find_quant(norm.out)  -> Quant | Miss | None       quant_scaled, quant_group, quant_fp4
    meaning.recognize(ar) -> the same roles, read by evaluating the chain when the
                             structural readers miss (fusion_passes.recognize.meaning)

The modules, bottom up (a module imports only those above it in this list, never this
package's ``__init__``):

* :mod:`~fusion_passes.recognize.roles`: ``Miss``, ``AllReduce``, ``Norm``, ``Quant``;
* :mod:`~fusion_passes.recognize.fx`: FX helpers (op names, node tests, values) and
  ``FakeVals``, the one writer of ``meta['val']``;
* a reader per dialect: :mod:`~fusion_passes.recognize.aten` (``_c10d_functional`` and
  decomposed aten), :mod:`~fusion_passes.recognize.vllm_ir` (vLLM's ``all_reduce`` and IR
  norms), :mod:`~fusion_passes.recognize.inplace` (in-place kernels under
  ``auto_functionalized``);
* quant readers by kind, each kind's custom ops and native aten chain together:
  :mod:`~fusion_passes.recognize.quant_scaled` (FP8 static / per tensor / per token),
  :mod:`~fusion_passes.recognize.quant_group` (FP8 per group),
  :mod:`~fusion_passes.recognize.quant_fp4` (NVFP4), sharing
  :mod:`~fusion_passes.recognize.quant_read`; each exports its tables
  (``FUNCTIONALIZED``, ``OPS``, ``NATIVE``), merged here;
* :mod:`~fusion_passes.recognize.meaning`: recognition by meaning (above the readers).

Every reader returns its role, a :class:`~fusion_passes.recognize.roles.Miss` saying why
not (the report and ``fusion-passes explain`` print it), or None when the node is not one
of its ops. Patterns never name dialect ops.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from fusion_passes.recognize import aten, quant_fp4, quant_group, quant_scaled, vllm_ir
from fusion_passes.recognize.fx import is_op, op_name
from fusion_passes.recognize.inplace import functionalized_call, inplace_rms_norm
from fusion_passes.recognize.roles import VARIANTS, AllReduce, Miss, Norm, Quant

_KINDS = (quant_scaled, quant_group, quant_fp4)
FUNCTIONALIZED = {name: r for kind in _KINDS for name, r in kind.FUNCTIONALIZED.items()}
"""quant op called through ``auto_functionalized(_v2)`` -> ``reader(y, u, call)``."""
OPS = {name: r for kind in _KINDS for name, r in kind.OPS.items()}
"""quant op called directly -> ``reader(y, u)``."""
NATIVE = tuple(r for kind in _KINDS for r in kind.NATIVE)
"""readers of native aten quant chains, asked of every user: ``reader(y, u)``."""


def all_reduce(node: Node) -> AllReduce | Miss | None:
    """The :class:`AllReduce` rooted at *node*, a Miss if it is one we cannot use, else None."""
    found = aten.all_reduce(node)
    return found if found is not None else vllm_ir.all_reduce(node)


def rms_norm(x: Node) -> Norm | Miss:
    """Any RMSNorm of *x*: vLLM's IR norm ops, in-place norm kernels under
    ``auto_functionalized`` (:mod:`fusion_passes.recognize.inplace`), or the decomposed aten chain."""
    found = vllm_ir.vllm_rms_norm(x)
    if found is None:
        found = inplace_rms_norm(x)
    return found if found is not None else aten.decomposed_rms_norm(x)


def find_quant(y: Node) -> Quant | Miss | None:
    """The quantization of norm output *y*: a :class:`Quant`, a :class:`Miss` when a user
    looks like one but cannot fuse (the reason names the node), or None when no user
    quantizes *y*. Each user is asked of the reader of its op, then of the native chains."""
    miss = None
    for u in list(y.users):
        for found in _readings(y, u):
            if isinstance(found, Quant):
                return found
            if isinstance(found, Miss) and miss is None:
                miss = found
    return miss


def _readings(y: Node, u: Node):
    """What the readers that apply to user *u* of *y* say, lazily, op readers first."""
    call = functionalized_call(u)
    if call is not None:
        if (reader := FUNCTIONALIZED.get(call.name)) is not None:
            yield reader(y, u, call)
    elif u.op == "call_function" and (reader := OPS.get(op_name(u.target))) is not None:
        yield reader(y, u)
    for reader in NATIVE:
        yield reader(y, u)


def dead_buffers(quant: Quant) -> list[Node]:
    """The ``empty`` output buffers a functionalized custom op wrote into (dead after rewrite)."""
    calls = [c for n in quant.nodes if (c := functionalized_call(n)) is not None]
    if not calls:
        return []
    call = calls[0]
    out = []
    for k, n in call.args.items():
        if isinstance(n, Node) and k in ("result", "output_q", "output_s", "output", "output_scale", "out"):
            chain = [n]
            while is_op(chain[-1], torch.ops.aten.permute.default, torch.ops.aten.transpose.int,
                        torch.ops.aten.view.default):
                chain.append(chain[-1].args[0])
            out += chain
    scale = call.args.get("scale")
    if call.name == quant_scaled.C_PER_TENSOR and is_op(scale, torch.ops.aten.empty.memory_format):
        out.append(scale)  # its scale is an output buffer too (static's scale is a parameter)
    return out


__all__ = ["AllReduce", "Miss", "Norm", "Quant", "VARIANTS", "all_reduce", "dead_buffers", "find_quant",
           "rms_norm"]
