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
    # The quant group size (elements per scale; per-group FP8, where it is an argument),
    # else None. Not the process group, which is the world size and single_node above.
    group_size: int | None = None
    # The measured table that may decide (its digest, fusion_passes.backends.measured), or
    # None: the shipped table (thresholds.py) decides.
    table: str | None = None
    # A graph site compiled for a range of token counts (vLLM's compile range, inclusive;
    # hi None = no upper end): only token counts in it matter. None: any token count.
    token_range: tuple[int, int | None] | None = None
    # A graph site's FP8 quant form (fusion_passes.fp8_forms), which only the reference computes.
    form: str | None = None
    # What a call inside a fused op knows of its arguments (left at these defaults for a
    # graph site, where they are not known): the option arguments set to a non-default
    # value, whether a residual is given, the weight's dtype (None: no weight), and the quant
    # arguments (name, value; a tensor as True), read by a backend's ``declines``.
    options: frozenset[str] = frozenset()
    residual: bool = False
    weight_dtype: torch.dtype | None = None
    residual_dtype: torch.dtype | None = None  # an fp32 residual: a previous site's carry_fp32 sum
    quant_args: tuple[tuple[str, object], ...] = ()

    def quant_arg(self, name: str, default=None):
        """The quant argument *name* as this call carries it (a tensor as True)."""
        return dict(self.quant_args).get(name, default)


def platform_reason(call: Call, dtypes, world_sizes, nodes_reason: str, world_note: str = "",
                    device: str | None = None, device_need: str = "") -> str | None:
    """The device, dtype, world-size and one-host checks every kernel backend makes, in that
    order: why *call* fails one, or None. *device* None: the caller checked the device
    itself; else *device_need* says what the backend needs. *world_note* ends the
    world-size reason; *nodes_reason* is the reason for a process group that spans several
    nodes (a process group of one rank never does)."""
    if device is not None and call.device != device:
        return f"{device_need}, got device {call.device!r}"
    if call.dtype not in dtypes:
        return f"dtype {call.dtype} not in {[str(d) for d in dtypes]}"
    if call.world_size not in world_sizes:
        return f"world size {call.world_size} not in {world_sizes}{world_note}"
    if call.world_size > 1 and not call.single_node:
        return nodes_reason
    return None


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

    ``declines(call) -> str | None`` (optional): why its kernel would compute this call's
    ARGUMENTS differently (``Call.residual``, ``weight_dtype``, ``quant_args``: known inside
    a fused op only), or None. The selector (:mod:`fusion_passes.backends.selector`) asks it
    and runs such a call on the reference backend.
    """

    name: str
    variants: frozenset[str]

    def unsupported(self, call: Call) -> str | None:
        """Why this backend cannot run *call* (a :class:`Slower` when it can but was measured
        slower than the unfused chain), or ``None`` if it can."""

    def run(self, variant: str, args: FusedArgs) -> FusedOutputs:
        """Run one fused call of *variant* (the op orders the outputs)."""
