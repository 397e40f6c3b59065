"""``bench kernels`` without a GPU: its baselines, rows, JSON, plan and argument checks.

A row is one (variant, hidden, tokens) point. It holds the fused call's time twice (timed
first and last in the row, so the spread shows), every unfused baseline by name, and which
baseline was fastest. A baseline is ``<collective>+<epilogue form>``:

* collectives: ``none`` (world size 1); at world size > 1 ``nccl``
  (``_c10d_functional.all_reduce``), ``symm_one_shot`` (``symm_mem.one_shot_all_reduce``
  on a symmetric copy of the input) and ``symm_two_shot`` (``symm_mem.two_shot_all_reduce_``
  in place on that copy);
* epilogue forms, compiled by Inductor with the hidden size static: ``static`` (one
  compile per token count, ``dynamic=False``) and ``tokdyn`` (only the token dimension
  dynamic, ``torch._dynamo.mark_dynamic(x, 0)``, as vLLM compiles); the extra
  ``dynamic_true`` form (``dynamic=True``: the hidden size symbolic too) is a labelled
  column that never counts as the best.

``speedup`` = best unfused / fused (first timing); ``speedup_worst`` uses the slower of the
two fused timings; a row ``wins`` when ``speedup_worst > 1`` (what the selector's table is
derived from, :mod:`fusion_passes.cli.bench_table`).
"""

from __future__ import annotations

import argparse
import math
import sys

from fusion_passes import epilogue

VARIANTS = ("add_rmsnorm", "add_rmsnorm_fp8_static", "add_rmsnorm_fp8_per_token", "add_rmsnorm_fp8_per_group",
            "add_rmsnorm_nvfp4", "add_rmsnorm_mxfp4")
# The default sweep: every variant, in well under one GPU call (see plan()).
DEFAULT_VARIANTS = VARIANTS
DEFAULT_TOKENS = tuple(2**i for i in range(15))  # 1 .. 16384
DEFAULT_HIDDEN = (4096, 7168, 8192)
DEFAULT_QUANT_HIDDEN = (7168,)
PER_GROUP_SIZE = 128  # the per-group FP8 variant's group (DeepSeek-V3's 1x128 activations)
# hidden must be a multiple of the quant block (epilogue.py) and of 8 bf16 = 16-byte rows
HIDDEN_MULTIPLE = {"add_rmsnorm_fp8_per_group": PER_GROUP_SIZE, "add_rmsnorm_nvfp4": epilogue.NVFP4_BLOCK,
                   "add_rmsnorm_mxfp4": epilogue.MXFP4_BLOCK}
ROW_ALIGNMENT = 8

FORMS = ("static", "tokdyn")
EXTRA_FORM = "dynamic_true"
# --with-max-autotune: the epilogue compiled per token count with max_autotune and
# coordinate_descent_tuning, the strongest form a user can pick (a counted baseline)
MAX_AUTOTUNE_FORM = "max_autotune"
SECONDS_PER_MAX_AUTOTUNE_COMPILE = 20.0  # a guess for the plan (Inductor times its configs per shape), not measured

# Costs for the plan printed before a sweep, from the phases of two runs on 1x H200
# (results/bench_kernels_h200_ws1.json, _ws1_quant.json: 53 s for 75 static compiles of
# add_rmsnorm / FP8 epilogues and 77 s for 45 of per-group FP8 / FP4 ones, i.e. 0.7-1.7 s
# each; fused-kernel JIT 3.5 s for 5 and 4.1 s for 3 (variant, hidden) pairs; 1.1 s for 300
# CUDA graphs); set-up adds the process start, imports, NCCL and the 1 GiB copy probe.
SECONDS_PER_COMPILE = 1.7
SECONDS_PER_JIT = 0.7
SECONDS_PER_GRAPH = 0.005
SECONDS_SETUP = 20.0


def collectives(world: int) -> tuple[str, ...]:
    """The collectives an unfused chain may start with at *world* ranks."""
    if world == 1:
        return ("none",)
    from fusion_passes.backends import symm

    return symm.COLLECTIVES


def baseline_names(world: int, with_dynamic_true: bool = False,
                   with_max_autotune: bool = False) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(counted, extra)``: baseline names that compete for ``best_unfused`` (with
    ``max_autotune`` when asked), and the labelled extra columns (``dynamic_true``) that do not."""
    forms = FORMS + ((MAX_AUTOTUNE_FORM,) if with_max_autotune else ())
    counted = tuple(f"{c}+{f}" for c in collectives(world) for f in forms)
    extra = tuple(f"{c}+{EXTRA_FORM}" for c in collectives(world)) if with_dynamic_true else ()
    return counted, extra


def best_unfused(baselines: dict[str, float | None], extra: tuple[str, ...] = ()) -> tuple[str, float]:
    """The fastest baseline that ran (not an extra column): ``(name, us)``."""
    ran = {k: v for k, v in baselines.items()
           if k not in extra and v is not None and math.isfinite(v) and v > 0}
    if not ran:
        raise ValueError(f"no unfused baseline ran (of {sorted(baselines)})")
    name = min(ran, key=lambda k: (ran[k], k))
    return name, ran[name]


def make_row(*, variant: str, hidden: int, tokens: int, calls: int, fused_us: float, fused_last_us: float,
             baselines: dict[str, float | None], extra: tuple[str, ...] = (), errors: dict[str, str] | None = None,
             floor_us: float | None = None, selector: str | None = None, declined: str | None = None) -> dict:
    """One row of the JSON (see the module docstring for the derived fields)."""
    best, best_us = best_unfused(baselines, extra)
    worst = max(fused_us, fused_last_us)
    row = {
        "variant": variant, "hidden": hidden, "tokens": tokens, "calls_per_graph": calls,
        "fused_us": fused_us, "fused_last_us": fused_last_us,
        "fused_spread": abs(fused_last_us - fused_us) / fused_us,
        "baselines": dict(baselines), "extra_columns": list(extra),
        "best_unfused": best, "best_unfused_us": best_us,
        "speedup": best_us / fused_us, "speedup_worst": best_us / worst, "wins": best_us > worst,
        "selector": selector, "triton_declined": declined,
    }
    if errors:
        row["baseline_errors"] = dict(errors)
    if floor_us is not None:
        row["floor_us"], row["of_floor"] = floor_us, floor_us / fused_us
    return row


def format_row(row: dict) -> str:
    """One progress line: fused first/last, every baseline, the best and the speedup."""
    cols = "  ".join(f"{k} {v:8.1f}" if v is not None else f"{k}  failed" for k, v in row["baselines"].items())
    floor = f"  floor {row['of_floor']:4.0%}" if "of_floor" in row else ""
    pick = "" if row["selector"] in (None, "triton") else f"  [selector: {row['selector']}]"
    return (f"{row['variant']:26s} H={row['hidden']:5d} T={row['tokens']:5d}  fused {row['fused_us']:8.1f}/"
            f"{row['fused_last_us']:8.1f} us  {cols}  best {row['best_unfused']} x{row['speedup']:5.2f}"
            f"{'' if row['wins'] else ' SLOWER'}{floor}{pick}")


def calls_per_graph(variant: str, tokens: int, hidden: int) -> int:
    """Calls captured in one CUDA graph when timing a point: up to 20, fewer where each call
    moves over 20 MB (:func:`bytes_moved`), so a replay stays near 400 MB."""
    return max(1, min(20, int(4e8 // max(bytes_moved(variant, tokens, hidden), 1))))


def bytes_moved(variant: str, tokens: int, hidden: int, itemsize: int = 2) -> int:
    """Inputs read once + outputs written once, in this rank's memory."""
    n = tokens * hidden
    read = 2 * n * itemsize + hidden * itemsize  # input, residual, weight
    if variant == "add_rmsnorm":
        return read + 2 * n * itemsize  # norm_out, residual_out
    if variant == "add_rmsnorm_nvfp4":  # residual_out, packed codes, swizzled e4m3 scales (padded)
        return read + n * itemsize + n // 2 + -(-tokens // 128) * 128 * -(-(hidden // 16) // 4) * 4
    if variant == "add_rmsnorm_mxfp4":  # residual_out, packed codes, E8M0 scale bytes
        return read + n * itemsize + n // 2 + tokens * (hidden // 32)
    scales = {"add_rmsnorm_fp8_static": 0, "add_rmsnorm_fp8_per_token": tokens * 4,
              "add_rmsnorm_fp8_per_group": tokens * (hidden // PER_GROUP_SIZE) * 4}[variant]
    return read + n * itemsize + n + scales  # residual_out, q, scales


def floor_us(nbytes: int, tokens: int, hidden: int, world: int, copy_bandwidth_GBps: float,
             peer_read_bandwidth_GBps: float | None, itemsize: int = 2) -> float:
    """Local bytes / copy bandwidth, or at N ranks the bytes an all-reduce must receive
    (2 (N-1)/N of the input) / peer-read bandwidth, whichever is larger."""
    floor = nbytes / (copy_bandwidth_GBps * 1e9) * 1e6
    if peer_read_bandwidth_GBps:
        floor = max(floor, 2 * (world - 1) / world * tokens * hidden * itemsize / (peer_read_bandwidth_GBps * 1e9) * 1e6)
    return floor


def hiddens(variant: str, hidden: list[int], quant_hidden: list[int]) -> list[int]:
    """Hidden sizes a variant runs at: ``--hidden`` for add_rmsnorm, ``--quant-hidden`` else."""
    return list(hidden) if variant == "add_rmsnorm" else list(quant_hidden)


def plan(variants, hidden, quant_hidden, tokens, world: int, with_dynamic_true: bool = False,
         with_max_autotune: bool = False) -> dict:
    """Counts of rows, compiles and CUDA graphs of a sweep, and its rough duration."""
    pairs = sum(len(hiddens(v, hidden, quant_hidden)) for v in variants)
    rows = pairs * len(tokens)
    counted, extra = baseline_names(world, with_dynamic_true, with_max_autotune)
    compiles = {"static": rows, "tokdyn": pairs}
    if with_dynamic_true:
        compiles["dynamic_true"] = 2 * pairs  # specialized at 1 token, then one dynamic graph
    if with_max_autotune:
        compiles[MAX_AUTOTUNE_FORM] = rows
    graphs = rows * (2 + len(counted) + len(extra))
    slow = (SECONDS_PER_MAX_AUTOTUNE_COMPILE - SECONDS_PER_COMPILE) * compiles.get(MAX_AUTOTUNE_FORM, 0)
    seconds = (SECONDS_SETUP + slow + SECONDS_PER_COMPILE * sum(compiles.values()) + SECONDS_PER_JIT * 2 * pairs
               + SECONDS_PER_GRAPH * graphs)
    return {"rows": rows, "compiles": compiles, "triton_jit": 2 * pairs, "graphs": graphs,
            "estimate_s": round(seconds)}


def format_plan(p: dict) -> str:
    compiles = ", ".join(f"{n} {k}" for k, n in p["compiles"].items())
    return (f"plan: {p['rows']} rows; Inductor compiles: {compiles}; fused-kernel JIT ~{p['triton_jit']}; "
            f"{p['graphs']} CUDA graphs; roughly {p['estimate_s'] / 60:.1f} min at {SECONDS_PER_COMPILE:g} s "
            "per compile (narrow with --variants / --hidden / --tokens)")


def check_hidden(variant: str, hidden: int) -> str | None:
    """Why *variant* cannot be benchmarked at *hidden* (None if it can): the quant block
    and row alignment here, then the triton gate's own limits (as on an NVIDIA GPU)."""
    multiple = max(ROW_ALIGNMENT, HIDDEN_MULTIPLE.get(variant, 1))
    if hidden % multiple:
        return f"{variant} needs hidden % {multiple} == 0, got {hidden}"
    import torch

    from fusion_passes import backends

    call = backends.Call(variant=variant, device="cuda", dtype=torch.bfloat16, hidden=hidden, world_size=1,
                         tokens=None, group_size=PER_GROUP_SIZE if variant.endswith("per_group") else None)
    reason = backends.why_not("triton", call)
    if reason is not None and "measured crossover" not in reason and "not measured" not in reason:
        return f"{variant} at hidden {hidden}: the triton backend cannot run it ({reason})"
    return None


def command_line(benchmark: str, world: int, argv: list[str] | None = None) -> str:
    """The command that ran, as a user would type it (``torchrun ...`` at world size N)."""
    argv = sys.argv if argv is None else argv
    rest = argv[argv.index(benchmark) + 1:] if benchmark in argv else argv[1:]
    head = (f"torchrun --standalone --nproc_per_node={world} -m fusion_passes.cli" if world > 1
            else "fusion-passes")
    return " ".join([head, "bench", benchmark, *rest])


def result(*, command: str, world: int, machine: dict, versions: dict, rows: list[dict], phases: dict,
           plan_: dict, bandwidths: dict, with_dynamic_true: bool, selectors: dict,
           with_max_autotune: bool = False, dtype: str = "bfloat16") -> dict:
    """The JSON a sweep writes."""
    counted, extra = baseline_names(world, with_dynamic_true, with_max_autotune)
    return {
        "command": command, "world_size": world, "machine": machine, "versions": versions, "dtype": dtype,
        "method": ("every call captured K times in one CUDA graph, median of replays / K; the fused call is "
                   "the public op with backend='triton', timed first and last in its row; baselines = "
                   "collective + the epilogue compiled by Inductor with the hidden size static"),
        "baselines": list(counted), "extra_columns": list(extra),
        **bandwidths, "plan": plan_, "phases_s": {k: round(v, 2) for k, v in phases.items()},
        "selector": selectors, "rows": rows,
    }
