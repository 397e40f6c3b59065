"""The reference backend: the dialect's own all-reduce + :mod:`fusion_passes.epilogue`.

Runs anywhere the unfused graph runs (gloo on CPU, NCCL on GPU) with the unfused
graph's numerics, because it calls the very same collective and then the same math in
the same order. It is the CPU default and the oracle every kernel backend is tested
against. It saves no memory traffic: it exists for correctness, not speed.
"""

from __future__ import annotations

import dataclasses

import torch

from fusion_passes import epilogue, groups, variants
from fusion_passes.backends.contract import Call
from fusion_passes.variants import FusedArgs, FusedOutputs


# every option argument (fusion_passes.variants.Arg.option) of every variant
_ALL_OPTIONS = frozenset(a.name for v in variants.VARIANTS for a in v.quant if a.option)


class ReferenceBackend:
    """Every variant, anywhere: the real collective, then the unfused math in its order."""

    name = "reference"
    variants = frozenset(variants.NAMES)  # the reference runs every fused op
    quant_options = _ALL_OPTIONS

    def unsupported(self, call: Call) -> str | None:
        return None

    def run(self, variant: str, args: FusedArgs) -> FusedOutputs:
        reduced = groups.all_reduce(args.input, args.group)
        flags = dataclasses.asdict(args.flags)
        norm, summed = epilogue.add_rms_norm(reduced, args.residual, args.weight, args.eps, **flags)
        if variants.get(variant).kind is None:
            return FusedOutputs(summed, norm)
        y32 = epilogue.norm_unrounded(reduced, args.residual, args.weight, args.eps, **flags) \
            if args.flags.quant_unrounded or args.flags.amax_unrounded else None
        q, scales = epilogue.quantize(variant, norm, args.quant, y32,
                                      amax_unrounded=epilogue.amax_reads_unrounded(reduced.device),
                                      codes_rounded=bool(args.flags.amax_unrounded))
        return FusedOutputs(summed, norm if args.return_norm else None, q, scales)
