"""The roles recognition maps a graph's nodes to, the words the catalogue speaks.

:class:`AllReduce` (a reduction and the node that carries its value), :class:`Norm` (an
RMSNorm, optionally with the residual add fused in, as vLLM's ``fused_add_rms_norm``) and
:class:`Quant` (the quantization of the norm output). Every reader returns a role or a
:class:`Miss` whose ``reason`` says why not, in the spirit of MLIR's
``notifyMatchFailure``: the report and ``fusion-passes explain`` print it.

A leaf: it imports no other module of :mod:`fusion_passes.recognize`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch.fx import Node

from fusion_passes import variants
from fusion_passes.variants import Flags


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
    sum_stored: bool = False  # the compile stores the sum: the normalization reads it rounded
    amax_unrounded: bool = False  # the compile stores the norm output: its amax unrounded, codes rounded
    # (node, same) pairs: nodes holding the very value of another, redirected to it right
    # before the rewrite (fusion_passes.recognize.inplace, fusion_passes.recognize.meaning)
    aliases: tuple = ()

    @property
    def flags(self) -> Flags:
        """The fused op's norm conventions for this norm (``fusion_passes.variants.FLAGS``:
        each is an attribute of the same name)."""
        return Flags(**{name: bool(getattr(self, name)) for name in Flags.__dataclass_fields__})


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


__all__ = ["Miss", "AllReduce", "Norm", "Quant", "VARIANTS"]
