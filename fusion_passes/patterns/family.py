"""What one fused family declares."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Family:
    """One fused family.

    ``matches`` is the chain of roles after the all-reduce, as the report prints it;
    ``residual`` says whether a residual add sits between all-reduce and norm;
    ``residual_out`` whether the sum (or the reduced value) also feeds other users and so
    must be returned; ``quant`` names the quant epilogue (None: the bf16/fp16 norm output);
    ``becomes`` is the fused op; ``variant`` is its name in :mod:`fusion_passes.variants`.
    """

    name: str
    matches: str
    residual: bool
    residual_out: bool | None  # None: either
    becomes: str
    variant: str
    where: str
    quant: str | None = None
