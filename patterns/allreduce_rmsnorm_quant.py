"""all-reduce -> [+ residual] -> RMSNorm -> quant: the norm output quantized for the next GEMM.

One row per quant kind; each expands to four families: with / without the residual add,
and the "Out" form where a second consumer (a bf16 GEMM, a hidden-state tap) also reads
the norm output, so the fused op returns it too. Largest first: the engine tries these
before the plain families of :mod:`fusion_passes.patterns.allreduce_rmsnorm`.
"""

from __future__ import annotations

import dataclasses

from fusion_passes.patterns.family import Family


@dataclasses.dataclass(frozen=True)
class QuantFamily(Family):
    """A quant family; ``norm_out``: the norm output also feeds a consumer besides the quant."""

    norm_out: bool = False

    def size(self) -> int:
        return super().size() + int(self.norm_out)


#  kind            fused op (fusion_passes.*)              quant as the graph spells it
QUANTS = (
    ("fp8_static", "allreduce_add_rmsnorm_fp8_static", "fp8(clamp(y * 1/scale)), scale a parameter"),
    ("fp8_per_token", "allreduce_add_rmsnorm_fp8_per_token", "amax(|y|, -1)/448 [min ub] -> fp8(y / s)"),
    ("fp8_per_group", "allreduce_add_rmsnorm_fp8_per_group", "1 x g groups: amax/448 [UE8M0] -> fp8; row/col-major scales"),
    ("fp8_per_tensor", "allreduce_add_rmsnorm_fp8_per_tensor", "max(|y|) over ALL tokens/448 -> fp8(y / s), one scale"),
    ("nvfp4", "allreduce_add_rmsnorm_nvfp4", "scaled_fp4_quant: e2m1 x16 + e4m3 scales (swizzled | linear)"),
    ("mxfp4", "allreduce_add_rmsnorm_mxfp4", "e2m1 x32 + e8m0 scales"),
)

FAMILIES = tuple(
    QuantFamily(
        f"allreduce_{'add_' if res else ''}rmsnorm_{kind}{'_out' if out else ''}",
        f"all_reduce -> {'add(residual) -> ' if res else ''}rms_norm -> {kind}{' (+ norm out)' if out else ''}: {how}",
        res, None, f"fusion_passes.{op}", f"add_rmsnorm_{kind}",
        where=("end of each block into the next quantized GEMM" if res else "embedding into layer 0's quantized GEMM")
        + ("; the norm output also feeds a second consumer" if out else ""),
        quant=kind, norm_out=out,
    )
    for kind, op, how in QUANTS
    for out in (True, False)
    for res in (True, False)
)
