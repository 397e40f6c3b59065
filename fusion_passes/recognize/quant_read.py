"""The :class:`Quant` role, and the node readers every quant recognizer shares.

The recognizers themselves are in :mod:`fusion_passes.recognize.quant_aten` (the native aten
chains) and :mod:`fusion_passes.recognize.quant_ops` (vLLM's and ROCm's custom ops);
:func:`fusion_passes.recognize.quant.find` asks them in turn.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
from torch.fx import Node

from fusion_passes import epilogue, variants
from fusion_passes.recognize.aten import Miss, _convert_to, is_op, short, val

aten = torch.ops.aten

# quant kinds -> fused-op variant (fusion_passes.variants)
VARIANTS = {kind: v.name for kind, v in variants.BY_KIND.items()}


@dataclasses.dataclass
class Quant:
    """One quantization of the norm output.

    ``kind``: a key of :data:`VARIANTS`; ``params``: the fused op's quant arguments by
    name (nodes or constants; one omitted takes its default, ``fusion_passes.variants``);
    ``nodes``: every node the fused op replaces (all used only inside the quant or
    through ``outputs``); ``outputs``: ``"q"`` and ``"scales"`` (None when the chain
    exposes no scale, e.g. static) -> the node carrying that value;
    ``scale_view``: the dtype the graph's scale output has when it differs from the fused
    op's (NVFP4's ``scaled_fp4_quant.out`` writes its FP8 scales into int32 / uint8).
    """

    kind: str
    params: dict[str, Any]
    nodes: tuple[Node, ...]
    outputs: dict[str, Node | None]
    scale_view: torch.dtype | None = None

    @property
    def variant(self) -> str:
        """The fused op's variant name."""
        return variants.BY_KIND[self.kind].name


def arg(node: Node, name: str, pos: int | None = None, default=None):
    """Argument *name* of *node*: its keyword, else positional argument *pos*, else *default*."""
    if name in node.kwargs:
        return node.kwargs[name]
    if pos is not None and len(node.args) > pos:
        return node.args[pos]
    return default


def getitems(node: Node) -> dict[int, Node] | Miss:
    """The ``getitem`` users of a multi-output *node* by index; a Miss if another op uses it."""
    out: dict[int, Node] = {}
    for u in node.users:
        if u.target is not operator.getitem:
            return Miss(f"{short(node)} is used by {short(u)}, not only through getitem", u)
        out[u.args[1]] = u
    return out


def is_fp8(dtype) -> bool:
    """Whether *dtype* is one of the FP8 dtypes a fused op writes."""
    return dtype in epilogue.FP8_DTYPES


def _ancestors(node: Node, limit: int = 64) -> set[Node]:
    seen, todo = set(), [node]
    while todo and len(seen) < limit:
        n = todo.pop()
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                todo.append(a)
    return seen


_LAYOUT = (aten.view.default, aten.reshape.default, aten.expand.default, aten.squeeze.default,
           aten.squeeze.dim, aten.unsqueeze.default, aten.clone.default)


def static_scale(s: object, y: Node) -> Node | Miss:
    """A per-tensor scale that is a model parameter (placeholder / get_attr through
    layout ops and fp32 converts), not computed in the graph."""
    if not isinstance(s, Node):
        return Miss(f"static scale {s!r} is not a tensor", None)
    base = s
    while base.op == "call_function" and (is_op(base, *_LAYOUT) or _convert_to(base, torch.float32)):
        base = base.args[0]
    if base is y or y in _ancestors(base):
        return Miss(f"the scale {s.name} is computed from the norm output by an unrecognized chain", s)
    if base.op not in ("placeholder", "get_attr"):
        return Miss(f"the scale {s.name} is computed (by {short(base)}) from another tensor, "
                    "not a static parameter", base)
    v = val(s)
    if not isinstance(v, torch.Tensor) or v.numel() != 1:
        return Miss(f"the scale {s.name} has shape {getattr(v, 'shape', '?')}: per-tensor FP8 needs 1 element", s)
    return s


__all__ = ["Quant", "VARIANTS", "arg", "getitems", "is_fp8", "static_scale"]
