"""The pattern catalogue: every fused family, what it matches and what it becomes.

Pure declarations; the engine (:mod:`fusion_passes.match`) interprets them. Families are
tried in catalogue order, LARGEST FIRST: a quant family must come before the plain
all-reduce + norm, or the plain one would consume the all-reduce. ``fusion-passes
patterns`` prints this table.
"""

from fusion_passes.patterns.family import Family
from fusion_passes.patterns.allreduce_rmsnorm import FAMILIES as _AR_RMSNORM
from fusion_passes.patterns.allreduce_rmsnorm_quant import FAMILIES as _AR_RMSNORM_QUANT

# quant families first (largest first): the plain families would consume their all-reduce
CATALOGUE: tuple[Family, ...] = (*_AR_RMSNORM_QUANT, *_AR_RMSNORM)

__all__ = ["CATALOGUE", "Family"]
