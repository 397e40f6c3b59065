"""The reference backend: the dialect's own all-reduce + :mod:`fusion_passes.epilogue`.

Runs anywhere the unfused graph runs (gloo on CPU, NCCL on GPU) with the unfused
graph's numerics, because it calls the very same collective and then the same math in
the same order. It is the CPU default and the oracle every kernel backend is tested
against. It saves no memory traffic: it exists for correctness, not speed.
"""

from __future__ import annotations

import torch

from fusion_passes import epilogue, groups
from fusion_passes.backends import Call


class ReferenceBackend:
    name = "reference"
    variants = frozenset({"add_rmsnorm"})

    def unsupported(self, call: Call) -> str | None:
        return None

    def run(self, variant: str, *args, **kwargs):
        return getattr(self, variant)(*args, **kwargs)

    @staticmethod
    def add_rmsnorm(
        input: torch.Tensor,
        residual: torch.Tensor | None,
        weight: torch.Tensor | None,
        eps: float,
        group: str,
        gemma: bool,
        weight_in_fp32: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        reduced = groups.all_reduce(input, group)
        return epilogue.add_rms_norm(
            reduced, residual, weight, eps, gemma=gemma, weight_in_fp32=weight_in_fp32
        )
