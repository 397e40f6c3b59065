"""The ``triton`` backend's gate: why it cannot (or, measured slower, should not) run a call.

A pure function of a :class:`~fusion_passes.backends.contract.Call`: the platform and the
kernel's limits first, then the crossover table that decides, the measured one
(:mod:`fusion_passes.backends.measured`, when the call names it and it has the call's
variant and hidden size; a shipped per-GPU table counts as one) or the shipped one
(``thresholds.TRITON["max_tokens_faster"]``).
A graph site compiled for a token range (``Call.token_range``) is declined when no token
count in the range was measured faster.
"""

from __future__ import annotations

import importlib.util

import torch

from fusion_passes import variants
from fusion_passes.backends import measured, thresholds
from fusion_passes.backends.contract import Call, Slower, platform_reason

LIMITS = thresholds.TRITON
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# FP4 variants: elements per scale block (the registry's), and the activations they take.
FP4_BLOCK = {name: variants.BY_NAME[name].block for name in ("add_rmsnorm_nvfp4", "add_rmsnorm_mxfp4")}
FP4_DTYPES = variants.FP4_INPUT_DTYPES
# The quants whose codes the kernel computes from the unrounded norm value (``Q_RAW``, the
# ``quant_unrounded`` flag): the FP8 ones it runs (epilogue.FP8_CODES, less per-tensor).
# The FP4 quants have no such form and are declined with the flag.
FP8_UNROUNDED = frozenset({"add_rmsnorm_fp8_static", "add_rmsnorm_fp8_per_token", "add_rmsnorm_fp8_per_group"})


def unsupported(call: Call) -> str | None:
    """Why the triton backend cannot (or should not, being slower) run *call*."""
    platform = platform_reason(call, DTYPES, LIMITS["world_sizes"],
                               "the process group spans several nodes: symmetric-memory peer loads need one host",
                               world_note=" (barrier needs a power of two)",
                               device="cuda", device_need="needs an NVIDIA CUDA GPU (PTX signal instructions)")
    if platform is not None:
        return platform
    if call.hidden > LIMITS["max_hidden"]:
        return f"hidden {call.hidden} > {LIMITS['max_hidden']} (one row must fit in registers)"
    if call.flags.quant_unrounded and call.variant in FP4_BLOCK:
        return f"{call.variant} has no unrounded-input form (quant_unrounded; epilogue.FP8_CODES)"
    if call.flags.amax_unrounded and call.variant not in FP8_UNROUNDED:
        return f"{call.variant} has no amax from the unrounded norm value (amax_unrounded; epilogue.FP8_CODES)"
    if call.flags.carry_fp32 and not (call.flags.weight_in_fp32 or call.flags.gemma):
        return "carry_fp32 with the weight after the cast back: the kernel rounds in the residual's dtype"
    itemsize = torch.empty((), dtype=call.dtype).element_size()
    if (call.hidden * itemsize) % LIMITS["row_alignment_bytes"]:
        return f"hidden*itemsize = {call.hidden * itemsize} bytes is not a multiple of {LIMITS['row_alignment_bytes']}"
    if call.variant in FP4_BLOCK:
        if call.dtype not in FP4_DTYPES:
            return f"{call.variant} quantizes fp16/bf16 activations only, got {call.dtype}"
        if call.hidden % FP4_BLOCK[call.variant]:
            return f"{call.variant} needs hidden % {FP4_BLOCK[call.variant]} == 0, got {call.hidden}"
    if call.variant == "add_rmsnorm_fp8_per_group" and (why := quant_group_reason(call)):
        return why
    if call.tokens is not None and call.world_size > 1:
        if call.tokens * call.hidden * itemsize > LIMITS["max_workspace_bytes"]:
            return f"{call.tokens}x{call.hidden} exceeds the {LIMITS['max_workspace_bytes']}-byte symmetric workspace"
    table = measured.by_digest(call.table) if call.table else None
    if table is not None and table.has(call.variant, call.hidden, dtype=call.dtype):
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        return _measured_verdict(table, call)
    shipped = LIMITS["max_tokens_faster"]
    key = (call.world_size, call.variant)
    if key not in shipped:
        return (
            f"no measured crossover for {call.variant} at world size {call.world_size} "
            "(`fusion-passes bench kernels` has not shown it faster than unfused there; shipped table)"
        )
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    return _slower_than_unfused(shipped[key], call)


def quant_group_reason(call: Call) -> str | None:
    """Why the kernel cannot quantize *call* with its quant group size (``Call.group_size``,
    elements per FP8 scale; None: not a per-group call), or None."""
    group_size = call.group_size
    if group_size is not None and (group_size not in LIMITS["per_group_sizes"] or call.hidden % group_size):
        return (f"per-group FP8 quant group size {group_size} not in {LIMITS['per_group_sizes']} "
                f"or does not divide hidden {call.hidden}")
    return None


def table_source(call: Call) -> str:
    """Which table decides *call*: ``measured table FILE``, ``shipped table for GPU (FILE)``
    (a shipped per-GPU table, :mod:`fusion_passes.backends.measured`) or ``shipped table``."""
    table = measured.by_digest(call.table) if call.table else None
    if table is not None and table.has(call.variant, call.hidden, dtype=call.dtype):
        return table.label(call.variant, call.hidden, dtype=call.dtype)
    return "shipped table"


def _range_text(token_range) -> str:
    lo, hi = token_range
    return f"{lo}-{'' if hi is None else hi}"


def _measured_verdict(table, call: Call) -> str | None:
    """The measured table's verdict: per call, the bucket serving its token count; for a
    graph site, admitted when some bucket in its token range picked the fused call (each
    call then picks per size at run time)."""
    where = table.label(call.variant, call.hidden, dtype=call.dtype)
    if call.tokens is not None:
        if call.tokens < 1:
            return None
        e = table.lookup(call.variant, call.hidden, call.tokens, dtype=call.dtype)
        if e.pick == "fused":
            return None
        times = f"{e.unfused_us:.1f} vs {e.fused_us:.1f} us, " if e.unfused_us and e.fused_us else ""
        return Slower(f"{call.tokens} tokens: the unfused chain was faster in the {e.tokens}-token bucket "
                      f"({measured.dtype_name(call.dtype)}, {times}{where}; measured crossover)")
    lo, hi = call.token_range or (1, None)
    if any(e.pick == "fused" for e in table.in_range(call.variant, call.hidden, lo, hi, dtype=call.dtype)):
        return None
    return Slower(f"slower than unfused at every measured token count in {_range_text((lo, hi))} "
                  f"(hidden {call.hidden}, {measured.dtype_name(call.dtype)}; {where}; measured crossover)")


def _slower_than_unfused(entry, call: Call) -> str | None:
    """Why *entry* of ``max_tokens_faster`` (see thresholds.py for its three forms) declines
    *call*, or None. A graph site (``tokens=None``) and an empty call are admitted wherever
    some token range at that hidden size was measured faster."""
    if entry is None:
        return None
    if isinstance(entry, int):
        if call.tokens is not None and call.tokens > entry:
            return Slower(f"{call.tokens} tokens > {entry}: slower than unfused there (measured crossover; "
                          "shipped table)")
        if call.tokens is None and call.token_range is not None and call.token_range[0] > entry:
            return Slower(f"compile range {_range_text(call.token_range)} starts above {entry} tokens: slower "
                          "than unfused there (measured crossover; shipped table)")
        return None
    ranges = entry.get(call.hidden, entry.get(None))
    if ranges is None:
        return f"hidden {call.hidden} not measured for {call.variant} at world size {call.world_size}"
    if not ranges:
        return Slower(f"slower than unfused at every measured token count (hidden {call.hidden}; measured "
                      "crossover; shipped table)")
    if call.tokens is None and call.token_range is not None:
        lo, hi = call.token_range
        if not any((hi is None or r_lo <= hi) and (r_hi is None or r_hi >= lo) for r_lo, r_hi in ranges):
            return Slower(f"compile range {_range_text(call.token_range)} lies outside every range where the "
                          f"fused call won (hidden {call.hidden}; measured crossover; shipped table)")
    if call.tokens is None or call.tokens < 1:
        return None
    if any(lo <= call.tokens and (hi is None or call.tokens <= hi) for lo, hi in ranges):
        return None
    shown = ", ".join(f"{lo}-{'' if hi is None else hi}" for lo, hi in ranges)
    return Slower(f"{call.tokens} tokens outside {shown}: slower than unfused there (measured crossover; shipped table)")
