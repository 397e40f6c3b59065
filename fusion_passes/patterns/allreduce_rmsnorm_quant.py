"""all-reduce -> [+ residual] -> RMSNorm -> quant: the norm output quantized for the next GEMM.

One family set per quant variant of :data:`fusion_passes.variants.VARIANTS` (its kind, its
fused op and how graphs spell the quant come from there); each expands to four families:
with / without the residual add, and the "Out" form where a second consumer (a bf16 GEMM,
a hidden-state tap) also reads the norm output, so the fused op returns it too. Largest
first: the engine tries these before the plain families of
:mod:`fusion_passes.patterns.allreduce_rmsnorm`.
"""

from __future__ import annotations

import dataclasses

from fusion_passes import variants
from fusion_passes.patterns.family import Family


@dataclasses.dataclass(frozen=True)
class QuantFamily(Family):
    """A quant family; ``norm_out``: the norm output also feeds a consumer besides the quant."""

    norm_out: bool = False


FAMILIES = tuple(
    QuantFamily(
        f"allreduce_{'add_' if res else ''}rmsnorm_{v.kind}{'_out' if out else ''}",
        f"all_reduce -> {'add(residual) -> ' if res else ''}rms_norm -> {v.kind}{' (+ norm out)' if out else ''}: "
        f"{v.spelling}",
        res, None, f"fusion_passes.{v.op}", v.name,
        where=("end of each block into the next quantized GEMM" if res else "embedding into layer 0's quantized GEMM")
        + ("; the norm output also feeds a second consumer" if out else ""),
        quant=v.kind, norm_out=out,
    )
    for v in variants.VARIANTS if v.kind is not None
    for out in (True, False)
    for res in (True, False)
)
