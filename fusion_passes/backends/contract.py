"""What the selector knows about a call, and what a backend is.

Its own module so that the backends import it without importing the registry in
:mod:`fusion_passes.backends` (which imports them), keeping the import graph acyclic.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch

from fusion_passes.variants import Flags, FusedArgs, FusedOutputs


@dataclasses.dataclass(frozen=True)
class Call:
    """What the selector knows about one fused call (or, with ``tokens=None``, a graph site)."""

    variant: str
    device: str  # "cpu", "cuda" or "rocm"
    dtype: torch.dtype
    hidden: int
    world_size: int
    tokens: int | None = None
    single_node: bool = True
    # The norm's conventions (fusion_passes.variants.SIGNATURE): a backend whose kernel
    # rounds differently under one of them declines the call instead of answering it inexactly.
    flags: Flags = dataclasses.field(default_factory=Flags)
    # Variants whose scale block is an argument (per-group FP8): its value (else None).
    group_size: int | None = None


class Slower(str):
    """A decline because the backend was MEASURED slower than the unfused chain for this call
    (a crossover in thresholds.py), not because it cannot run it. It counts where the unfused
    chain is the alternative (choosing a graph site's fusion); at run time, inside a fused op,
    the chain is gone and the choice is only among backends, so the selector ignores it."""


class Backend(Protocol):
    """A backend: a name, the variants it implements, a gate and a runner.

    ``quant_options`` (optional): the option arguments (``fusion_passes.variants.Arg.option``)
    whose non-default values it computes itself; a call with another option set runs on the
    reference backend.
    """

    name: str
    variants: frozenset[str]

    def unsupported(self, call: Call) -> str | None:
        """Why this backend cannot run *call* (a :class:`Slower` when it can but was measured
        slower than the unfused chain), or ``None`` if it can."""

    def run(self, variant: str, args: FusedArgs) -> FusedOutputs:
        """Run one fused call of *variant* (the op orders the outputs)."""
