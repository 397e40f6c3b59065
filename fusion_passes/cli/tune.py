"""``fusion-passes tune``: measure the fused paths against the best unfused chain HERE, and keep the result.

On the present machine and world size (``torchrun --nproc_per_node=N -m
fusion_passes.cli tune`` at N), for every variant and hidden size asked and every
token bucket, it times under CUDA graphs (``bench kernels``' machinery,
:mod:`fusion_passes.cli.bench_kernels`):

* the fused call at each launch config the kernel can vary: warps per row (4, 8, 16) and,
  at N, each multi-rank path (barrier one-shot, wait-free one-shot, two-shot); then, at
  world size 1, rows per program (2, 4: where the bucket still fills every SM with programs
  or adds no wave) at each warp count and pipelining depth (``num_stages`` 1, 3), the
  looped kernel (the row in pieces of 1024 or 2048, two passes, as Inductor's looped
  reductions; add + RMSNorm and static FP8) at each warp count, the tile kernel (2 or 4 rows
  at once as one block, as Inductor's ``XBLOCK``; add + RMSNorm and static FP8) at each warp
  count, and last the fastest config so far, the fastest one-row config and the fastest tile
  with their streamed loads ``evict_first`` (the weight ``evict_last``, as Inductor marks
  them), one coordinate at a time as Inductor's coordinate descent does, to keep the options
  few;
* every unfused chain: each collective (none at 1; NCCL, symm-mem one-shot and two-shot at
  N) + the epilogue compiled by Inductor (static per token count, token-dynamic).

At world size 1 it first compiles every launch config's binaries, several at once
(:func:`precompile`, ``--precompile-threads``).

Each option (fused or unfused) is timed right after a copy kernel that writes its input, less the
copy alone (:class:`_Timer`, ``--context after-write``, the default), as a model runs the epilogue
right after the GEMM that writes its input; ``--context alone`` times it back to back on the same
input.

First it times the launch floor (:func:`fusion_passes.cli.bench_cuda.launch_floor_us`): the
least any option can take here, printed and kept in ``--json``, so a speedup target out of
reach at a small bucket shows as such. At world size 1 it also times, per bucket, the move
floor (:func:`fusion_passes.cli.bench_cuda.move_floor_us`: the bucket's rows read and written
by a kernel that computes nothing), printed on the bucket's line and kept in its ``--json`` row
(``move_floor_us``); it decides nothing.

Every rank times every option; the slowest rank's time counts and rank 0 picks the fastest
(:func:`fusion_passes.backends.agree.decide`), so every rank writes the same table. The pick is
made on a second timing (:func:`confirm`): the first pass's fastest fused config and fastest
unfused chain timed again, in turns, and their medians compared. The
bucket's entry is ``fused`` (with its path and warps) when a fused option was fastest,
else ``unfused``. The table goes to the measured-table file
(:mod:`fusion_passes.backends.measured`; ``--out`` for another file), replacing the pairs
measured again; the selector reads it before the shipped table from the next process on.

``tune --show`` prints the table for this machine (or every table, without a GPU) and
where each entry came from. Nothing else ever writes the file: compiling a model never
calibrates.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import statistics
import sys
import time

from fusion_passes.cli import bench_rows as br
from fusion_passes.cli.arguments import MAX_REPLAYS, MAX_STEP_TOKENS, int_range

WARPS = (4, 8, 16)
ROWS = (2, 4)  # rows per program timed at world size 1 (one row: the first pass)
STAGES = (1, 3)  # num_stages timed with them (3: Triton's default on NVIDIA)
# Pieces of a row timed at world size 1 (the looped kernel, triton_kernels.epilogue_row_looped):
# Inductor's looped add + RMSNorm beat the one-pass kernel at 4096 x 512 and 8192 x 256 on 1x H100
# (results/tune_h100_ws1_add_rmsnorm_maxat_session9.json); powers of two below the hidden size.
CHUNKS = (1024, 2048)
# Rows per program at once (a [tile, H] block, triton_kernels.epilogue_tile) timed at world size 1, up to
# TILE_ELEMS elements a block: on 1x H100 2 rows at once at 16 warps with evict_first ran 7168 x 1024 in
# 17.95 us, one row 18.09, Inductor 18.45 (tools/ab_kernel_shapes.py, results/ab_kernel_shapes_h100_session11.json).
TILES = (2, 4)
TILE_ELEMS = 16384
MP_PATHS = ("barrier", "lamport", "twoshot")
# How an option is timed (--context, _Timer). after-write: right after a copy that writes the input, as
# in a model. Not the GEMM itself: on 1x H100 "after the GEMM" (a pair less the GEMM, 150-180 us each at
# 1024 tokens) moved one launch by 7.8 us between two runs, after the copy by under 0.1 us; the ranking
# after the copy stayed close to the one alone (results/README.md, "Session 13"). The default: with its
# table a token-dynamic llama step (hidden 4096) was never slower than without the pass, 1.002-1.012x in
# two runs (no round below 1.000x); with the alone table 0.998x and 0.999x at 1 token (bench model,
# results/README.md, "Session 13"). That difference did not repeat in session 14 (the alone table
# 1.001-1.004x at 1 token, the after-write tables 0.999-1.000x; "Session 14"): the default stands on
# the copy's repeatability.
CONTEXTS = ("alone", "after-write")
DEFAULT_TOKENS = br.DEFAULT_TOKENS
# Compiles at once before timing (--precompile-threads): Triton's compile runs in a thread (on this
# project's 2-core CI machine, the 36 binaries of add + RMSNorm at hidden 4096 over the 15 buckets, for
# sm_90, took 5.1-5.6 s in one thread, 3.5-3.8 s in two; Triton 3.8, session 13, tests/triton_precompile_case.py
# with every bucket), so up to one per CPU; 16: the lent GPU machines' CPUs.
PRECOMPILE_THREADS = max(1, min(16, os.cpu_count() or 1))


def add_arguments(parser) -> None:
    parser.add_argument("--variants", nargs="+", default=["add_rmsnorm"], choices=br.VARIANTS,
                        help="variants to calibrate (default add_rmsnorm)")
    parser.add_argument("--hidden", type=int_range(1), nargs="+", default=[7168],
                        help="hidden sizes (default 7168)")
    from fusion_passes.backends.measured import DTYPES

    parser.add_argument("--dtypes", nargs="+", default=["bfloat16"], choices=DTYPES,
                        help="activation dtypes to calibrate (default bfloat16); the table keeps one entry per dtype, "
                             "and a call in a dtype not measured is decided by the shipped table")
    parser.add_argument("--tokens", type=int_range(1, MAX_STEP_TOKENS), nargs="+", default=list(DEFAULT_TOKENS),
                        help="token buckets (default 1 2 4 .. 16384)")
    parser.add_argument("--replays", type=int_range(1, MAX_REPLAYS), default=5,
                        help="timed graph replays per option (median)")
    parser.add_argument("--with-max-autotune", action="store_true",
                        help="also count the epilogue compiled with max_autotune + coordinate_descent_tuning per "
                             "token count (slow: Inductor times its configs per shape)")
    parser.add_argument("--context", choices=CONTEXTS, default="after-write",
                        help="how each option is timed: after-write (default), each call right after a copy kernel "
                             "that writes its input, as in a model the epilogue follows the GEMM that writes its input "
                             "(its time: the pair's less the copy's), or alone, back to back on the same input")
    parser.add_argument("--precompile-threads", type=int_range(0, 64), default=PRECOMPILE_THREADS,
                        help="at world size 1, compile every launch config's binary this many at a time before "
                             f"timing (default {PRECOMPILE_THREADS}: this machine's CPUs, at most 16; 0: each when "
                             "timed)")
    parser.add_argument("--move-floor", action=argparse.BooleanOptionalAction, default=True,
                        help="at world size 1, also time each bucket's move floor: its rows read and written by a "
                             "kernel that computes nothing (default on; calibration on first use turns it off)")
    parser.add_argument("--file", help="the measured-table file to write (or, with --show, to read) instead of "
                        "$FUSION_PASSES_TUNED or ~/.cache/fusion_passes/tuned.json")
    parser.add_argument("--json", help="also write every timing to this JSON file (rank 0)")
    parser.add_argument("--show", action="store_true",
                        help="print the measured table and where it came from, then exit")


def validate(args) -> None:
    from fusion_passes.cli import UsageError

    if args.show:
        return
    for variant in args.variants:
        for hidden in args.hidden:
            reason = br.check_hidden(variant, hidden)
            if reason is not None:
                raise UsageError(reason)
    for name in ("tokens", "dtypes"):
        if len(set(getattr(args, name))) != len(getattr(args, name)):
            raise UsageError(f"--{name} has repeats: {getattr(args, name)}")
    from fusion_passes.backends import measured

    if args.file is None and measured.path() is None:
        raise UsageError(f"${measured.ENV}=off: there is no measured-table file to write (give --out)")


def run(args) -> int:
    validate(args)
    if args.show:
        from fusion_passes.cli import tune_show

        print(tune_show.render(args.file))
        return 0
    import torch

    if not torch.cuda.is_available() or torch.version.hip is not None:
        print("fusion-passes tune: needs an NVIDIA CUDA GPU (it times the triton backend's kernels)", file=sys.stderr)
        return 2
    return _tune(args)


def _tune(args) -> int:
    import torch.distributed as dist

    from fusion_passes.backends import measured
    from fusion_passes.cli import bench_cuda
    from fusion_passes.cli import bench_kernels as bk

    start = time.perf_counter()
    rank, world = bench_cuda.init_nccl()
    args.with_dynamic_true = False
    ctx = bk.sweep_context(args, rank, world, dist.group.WORLD.group_name, device="cuda")
    bk._raise_recompile_limits(len(args.tokens))
    floor = bench_cuda.launch_floor_us(replays=max(args.replays, 5))
    if rank == 0:
        print(f"launch floor {floor:.2f} us: one Triton program storing one value, timed as every option below",
              flush=True)
    entries, rows, seconds = [], [], {}
    for variant in args.variants:
        for hidden in args.hidden:
            for dtype in args.dtypes:
                t0 = time.perf_counter()
                got = tune_pair(ctx, variant, hidden, dtype)
                seconds[f"{variant} H={hidden} {dtype}"] = round(time.perf_counter() - t0, 1)
                entries += [e for e, _ in got]
                rows += [r for _, r in got]
    key = measured.machine_key(world, single_node=True)
    table = {"key": key, "command": command_line(world),
             "written": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
             "seconds_per_pair": seconds, "context": args.context, "entries": entries}
    if rank == 0:
        import pathlib

        where = measured.write(table, pathlib.Path(args.file) if args.file else None)
        print(f"wrote {len(entries)} entries for {key['gpu']} at world size {world} to {where} "
              f"({time.perf_counter() - start:.0f} s; per pair: {seconds}; compiling Inductor's forms: "
              f"{', '.join(f'{k[8:]} {v:.1f} s' for k, v in ctx.phases.items() if k.startswith('compile_') and v)})")
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps({
                "command": table["command"], "machine": bench_cuda.machine(), "versions": bench_cuda.versions(),
                "key": key, "context": args.context, "seconds_per_pair": seconds,
                "phases_s": {k: round(v, 1) for k, v in ctx.phases.items() if v}, "launch_floor_us": round(floor, 3),
                "rows": rows}, indent=1))
    dist.barrier()
    dist.destroy_process_group()
    return 0


def fused_options(world: int, variant: str, hidden: int) -> list[dict]:
    """The launch configs (and paths at N) the fused call is timed at."""
    from fusion_passes.backends import triton as tb

    limit = int(tb.LIMITS["max_warps"])
    warps = sorted({w for w in WARPS if w <= limit} | {tb.num_warps_for(hidden, variant != "add_rmsnorm")})
    paths = ("local",) if world == 1 else MP_PATHS
    return [{"path": p, "num_warps": w} for p in paths for w in warps]


def programs_to_fill(device) -> int | None:
    """The programs that keep every SM of *device* busy: its SM count (None off CUDA: the
    reference backend has no launch config)."""
    from fusion_passes.backends import triton as tb

    return tb._sm_count(device.index or 0) if device.type == "cuda" else None


def row_options(world: int, tokens: int, sm_count: int | None, warps) -> list[dict]:
    """The second pass at world size 1: several rows per program at each of *warps* (every
    warp count of the first pass: on 1x H100 the warps that won one row were not the ones that
    won two, results/tune_h100_ws1_add_rmsnorm_maxat_session9.json at 4096 x 512), where
    :func:`rows_fit` admits the rows on *sm_count* SMs, each at each pipelining depth."""
    if world != 1 or sm_count is None:
        return []
    return [{"path": "local", "num_warps": w, "rows": r, "num_stages": st}
            for w in warps for r in ROWS if rows_fit(tokens, r, sm_count) for st in STAGES]


def rows_fit(tokens: int, rows: int, sm_count: int) -> bool:
    """Whether *rows* per program can pay at *tokens*: the ``tokens / rows`` programs still
    cover every SM, or they add no wave (one program per SM at a time, no SM runs more rows
    than at one row per program: 256 tokens as 128 programs of 2 rows on 132 SMs take 2 rows
    per SM, as 256 programs of one row do)."""
    programs = -(-tokens // rows)
    return tokens // rows >= sm_count or -(-programs // sm_count) * rows <= -(-tokens // sm_count)


def chunk_options(world: int, variant: str, hidden: int, sm_count: int | None, warps) -> list[dict]:
    """The third pass at world size 1: the looped kernel, one row per program in pieces of each
    of :data:`CHUNKS` below *hidden*, at each of *warps*, for the variants it computes
    (``triton_kernels.looped_supported``, with the residual added as tune calls the op)."""
    from fusion_passes.backends import triton as tb
    from fusion_passes.backends import triton_kernels as k

    if world != 1 or sm_count is None or not k.looped_supported(getattr(k, tb.KERNEL_QUANT[variant]), 0):
        return []
    return [{"path": "local", "num_warps": w, "rows": 1, "num_stages": None, "chunk": c}
            for c in CHUNKS if c < hidden for w in warps]


def tile_options(world: int, variant: str, hidden: int, tokens: int, sm_count: int | None, warps) -> list[dict]:
    """The fourth pass at world size 1: the tile kernel, each of :data:`TILES` rows at once where
    :func:`rows_fit` admits them and the block holds at most :data:`TILE_ELEMS` elements, at each
    of *warps*, for the variants it computes (``triton_kernels.tile_supported``)."""
    from fusion_passes.backends import triton as tb
    from fusion_passes.backends import triton_kernels as k

    if world != 1 or sm_count is None or not k.tile_supported(getattr(k, tb.KERNEL_QUANT[variant])):
        return []
    block = 1 << max(0, (hidden - 1).bit_length())
    return [{"path": "local", "num_warps": w, "rows": 1, "num_stages": None, "tile": t}
            for t in TILES if t * block <= TILE_ELEMS and rows_fit(tokens, t, sm_count) for w in warps]


def shape_options(world: int, variant: str, hidden: int, tokens: int, sm_count: int | None, warps) -> list[dict]:
    """The passes after the first at one bucket, at each of *warps*: rows per program
    (:func:`row_options`), the looped kernel (:func:`chunk_options`), the tile kernel
    (:func:`tile_options`)."""
    return (row_options(world, tokens, sm_count, warps) + chunk_options(world, variant, hidden, sm_count, warps)
            + tile_options(world, variant, hidden, tokens, sm_count, warps))


def evict_options(times: dict[str, float | None]) -> list[dict]:
    """The last pass at world size 1: the fastest fused config so far, the fastest with one
    row per program and the fastest tile (they differ where more rows won), each with its
    streamed loads ``evict_first``. Each, because the option interacts with the launch: on 1x
    H100 it took 7168 x 1024 tokens from 22.0 to 20.3 us at one row and 2 rows at 4096 x 1024
    from 7.3 to 10.6 us (results/tune_h100_ws1_add_rmsnorm_evict.json), and the tile kernel
    beat one row at 7168 x 1024 only with it (tools/ab_kernel_shapes.py)."""
    timed = {k: v for k, v in times.items() if k.startswith("fused:") and v is not None}
    launch = {k: parse_option(k) for k in timed}
    one_row = {k: v for k, v in timed.items() if launch[k]["rows"] == 1 and not launch[k].get("tile")}
    tiles = {k: v for k, v in timed.items() if launch[k].get("tile")}
    picks = [min(d, key=lambda k: (d[k], k)) for d in (timed, one_row, tiles) if d]
    return [{**parse_option(k), "evict": True} for k in dict.fromkeys(picks)]


def option_name(o: dict) -> str:
    """``fused:PATH:WARPS``, then ``:rROWS:sSTAGES`` where either is not the default (one
    row, Triton's stages), ``:cCHUNK`` for the looped kernel, ``:tTILE`` for the tile kernel,
    then ``:evict`` where the streamed loads are ``evict_first``."""
    name = f"fused:{o['path']}:{o['num_warps']}"
    if o.get("rows", 1) != 1 or o.get("num_stages") is not None:
        name += f":r{o.get('rows', 1)}:s{o.get('num_stages')}"
    if o.get("chunk"):
        name += f":c{o['chunk']}"
    if o.get("tile", 1) > 1:
        name += f":t{o['tile']}"
    return name + (":evict" if o.get("evict") else "")


def parse_option(name: str) -> dict:
    """:func:`option_name` read back: ``{"path", "num_warps", "rows", "num_stages"}``, with
    ``"chunk"`` for the looped kernel, ``"tile"`` for the tile kernel and ``"evict": True`` for
    a config timed with its streamed loads ``evict_first``."""
    _, path, warps, *rest = name.split(":")
    o = {"path": path, "num_warps": int(warps), "rows": 1, "num_stages": None}
    for part in rest:
        if part == "evict":
            o["evict"] = True
        elif part[0] == "r":
            o["rows"] = int(part[1:])
        elif part[0] == "s":
            o["num_stages"] = None if part[1:] == "None" else int(part[1:])
        elif part[0] == "c":
            o["chunk"] = int(part[1:])
        elif part[0] == "t":
            o["tile"] = int(part[1:])
        else:
            raise ValueError(f"not a fused option name: {name!r}")
    return o


def decide_bucket(group: str, variant: str, hidden: int, tokens: int, times: dict[str, float],
                  dtype: str, confirmed: dict[str, float] | None = None) -> tuple[dict, dict]:
    """The bucket's table entry from every rank's option times (collective: the slowest rank
    counts, rank 0 picks), and the row of timings kept in ``--json``. With *confirmed* (the
    confirm step's medians, :func:`confirm`) those decide and give the entry's times; the row
    keeps both passes (``times_us``, ``confirm_us``)."""
    from fusion_passes.backends import agree

    pick, slowest = agree.decide(group, _inf_for_none(confirmed or times))
    unfused = {k: v for k, v in slowest.items() if not k.startswith("fused:")}
    fused = {k: v for k, v in slowest.items() if k.startswith("fused:")}
    best_u = min(unfused, key=lambda k: (unfused[k], k))
    best_f = min(fused, key=lambda k: (fused[k], k))
    entry = {"variant": variant, "hidden": hidden, "dtype": dtype, "tokens": tokens,
             "pick": "fused" if pick.startswith("fused:") else "unfused", **parse_option(best_f),
             "fused_us": _us(fused[best_f]), "unfused_us": _us(unfused[best_u]), "best_unfused": best_u}
    first = agree.slowest(group, _inf_for_none(times)) if confirmed else slowest
    row = {**entry, "times_us": {k: _us(v) for k, v in first.items()},
           "speedup": unfused[best_u] / fused[best_f] if math.isfinite(fused[best_f]) else 0.0}
    if confirmed:
        row["confirm_us"] = {k: _us(v) for k, v in slowest.items()}
    return entry, row


def _us(v: float) -> float | None:
    return round(v, 3) if math.isfinite(v) else None


def command_line(world: int, argv: list[str] | None = None) -> str:
    """The command that ran, as typed (``torchrun ...`` at world size N)."""
    argv = sys.argv if argv is None else argv
    rest = argv[argv.index("tune") + 1:] if "tune" in argv else argv[1:]
    head = (f"torchrun --standalone --nproc_per_node={world} -m fusion_passes.cli" if world > 1
            else "fusion-passes")
    return " ".join([head, "tune", *rest])


def precompile(ctx, variant: str, hidden: int, w, scale, fused, tb) -> int:
    """At world size 1, compile the binaries of every launch config the pair's buckets will
    time, ``--precompile-threads`` at a time, before any is timed: each config's call at each
    bucket's shape under :func:`fusion_passes.backends.triton.compile_only` (Triton's own
    specialization, so the binaries the timed launches look up) inside Triton's
    ``AsyncCompileMode`` over a thread pool, where Triton runs each compile in a thread. The
    ``evict_first`` options, chosen from the timings, compile when timed. Returns the calls
    made (0 where it does not apply); on any failure, one warning and the configs compile when
    timed, as without it. What it takes shows in ``--json``'s ``phases_s`` (``precompile``; on
    1x H100 3.2 s of a cold pair's 54.3 s, results/README.md, "Session 13")."""
    threads = getattr(ctx.args, "precompile_threads", 0)
    if ctx.world != 1 or not threads or ctx.fused_backend != "triton":
        return 0
    import concurrent.futures

    import torch

    try:
        from triton.runtime._async_compile import AsyncCompileMode  # Triton 3.6 / 3.8: private, guarded
    except ImportError as e:
        print(f"fusion-passes tune: no precompile ({e}); each config compiles when timed", file=sys.stderr)
        return 0
    t0 = time.perf_counter()
    device = torch.device(ctx.device)
    fill = programs_to_fill(device)
    warps = [o["num_warps"] for o in fused_options(ctx.world, variant, hidden)]
    calls = 0
    try:
        with concurrent.futures.ThreadPoolExecutor(threads) as pool, AsyncCompileMode(pool, ignore_errors=True), \
                tb.compile_only():
            for tokens in ctx.args.tokens:
                x = torch.empty(tokens, hidden, device=device, dtype=w.dtype)
                inputs = (x, torch.empty_like(x), w, scale)
                for option in fused_options(ctx.world, variant, hidden) + shape_options(
                        ctx.world, variant, hidden, tokens, fill, warps):
                    with _forcing(tb, option):
                        fused(*inputs)
                    calls += 1
    except Exception as e:  # noqa: BLE001 - a speed-up only: the configs then compile when timed
        print(f"fusion-passes tune: precompile failed ({type(e).__name__}: {e}); each config compiles when timed",
              file=sys.stderr)
    _spent(ctx, "precompile", t0)
    return calls


def _spent(ctx, phase: str, t0: float) -> float:
    """Add the seconds since *t0* to ``ctx.phases[phase]`` (``--json``'s ``phases_s``); returns now."""
    now = time.perf_counter()
    ctx.phases[phase] = ctx.phases.get(phase, 0.0) + now - t0
    return now


def _forced(option: dict) -> dict:
    """What :data:`fusion_passes.backends.triton.FORCE` holds while *option* runs: at world size 1
    every launch field (one row, Triton's stages unless named), so that no entry of a table
    already on disk changes the config."""
    if option["path"] != "local":
        return option
    return {"rows": 1, "num_stages": None, "evict": False, "chunk": 0, "tile": 1,
            **{k: v for k, v in option.items() if k != "path"}}


@contextlib.contextmanager
def _forcing(tb, option: dict):
    """*option*'s launch config forced on the backend (:func:`_forced`) for the block, then cleared."""
    tb.FORCE.update(_forced(option))
    try:
        yield
    finally:
        tb.FORCE.clear()


def _inf_for_none(times: dict[str, float | None]) -> dict[str, float]:
    """*times* with an option that could not run (None) counted as never finishing."""
    return {k: math.inf if v is None else v for k, v in times.items()}


def tune_pair(ctx, variant: str, hidden: int, dtype: str) -> list[tuple[dict, dict]]:
    """Every bucket of one (variant, hidden) in the activation *dtype*: ``[(entry, row), ...]``."""
    import torch

    from fusion_passes.backends import triton as tb
    from fusion_passes.cli import bench_kernels as bk
    from fusion_passes.cli import tune_show

    w = (torch.rand(hidden, device=ctx.device) + 0.5).to(getattr(torch, dtype))  # the weight in the activation dtype
    scale = torch.tensor([bk.NVFP4_GLOBAL_SCALE if variant.endswith("nvfp4") else bk.FP8_STATIC_SCALE],
                         device=ctx.device)
    forms = bk._compile_forms(ctx, variant, hidden, w, scale)
    fused = bk._fused_fn(variant, ctx.group, ctx.fused_backend)
    out = []
    with bk._triton_admitted(ctx.world, variant):
        precompile(ctx, variant, hidden, w, scale, fused, tb)
        for tokens in ctx.args.tokens:
            times = _bucket_times(ctx, variant, hidden, tokens, w, scale, forms, fused, tb)
            entry, row = decide_bucket(ctx.group, variant, hidden, tokens, times, dtype, ctx.confirm_us)
            t0 = time.perf_counter()
            floor = move_floor(ctx, variant, hidden, tokens, w.dtype)
            _spent(ctx, "move_floor", t0)
            if floor is not None:
                row["move_floor_us"] = _us(floor)
            if ctx.write_us is not None:
                row["write_us"] = _us(ctx.write_us)
            out.append((entry, row))
            if ctx.rank == 0:
                launch = ", ".join([entry["path"], f"{entry['num_warps']} warps", *tune_show.launch_options(
                    entry["rows"], entry["num_stages"], entry.get("chunk"), entry.get("tile"), entry.get("evict"))])
                print(f"{variant:26s} H={hidden:5d} {dtype:8s} T={tokens:5d}  {entry['pick']:7s} "
                      f"fused {entry['fused_us']:8.2f} us ({launch})  unfused {entry['unfused_us']:8.2f} us "
                      f"({entry['best_unfused']})  x{row['speedup']:.2f}"
                      + (f"  move floor {floor:.2f} us" if floor is not None else "")
                      + (f"  (each after a write of its input: {ctx.write_us:.2f} us, taken off)"
                         if ctx.write_us is not None else ""), flush=True)
    return out


def _bucket_times(ctx, variant, hidden, tokens, w, scale, forms, fused, tb) -> dict[str, float | None]:
    """us per option at one token count: every fused config, every unfused chain."""
    import torch

    from fusion_passes.cli import bench_kernels as bk

    torch.manual_seed(ctx.rank * 7919 + tokens)
    x = torch.randn(tokens, hidden, device=ctx.device).to(w.dtype)  # the activation dtype is the weight's
    torch.manual_seed(tokens)
    res = torch.randn(tokens, hidden, device=ctx.device).to(w.dtype)
    inputs = (x, res, w, scale)
    calls = br.calls_per_graph(variant, tokens, hidden)
    bk._timed(ctx, "compile_static", forms["static"], *inputs)
    if br.MAX_AUTOTUNE_FORM in forms:
        bk._timed(ctx, "compile_max_autotune", forms[br.MAX_AUTOTUNE_FORM], *inputs)
    timer = _Timer(ctx, inputs, calls)
    times: dict[str, float | None] = {}
    for option in fused_options(ctx.world, variant, hidden):
        _time_fused(ctx, tb, option, fused, inputs, timer, times)
    if ctx.world == 1:
        first = {k: v for k, v in times.items() if v is not None}
        warps = sorted({parse_option(k)["num_warps"] for k in first}) or [tb.num_warps_for(hidden)]
        fill = programs_to_fill(x.device)
        for option in shape_options(ctx.world, variant, hidden, tokens, fill, warps):
            _time_fused(ctx, tb, option, fused, inputs, timer, times)
        if fill is not None:  # then evict_first on the fastest so far, one-row and tile configs
            for option in evict_options(times):
                _time_fused(ctx, tb, option, fused, inputs, timer, times)
    t0 = time.perf_counter()
    chains = {}
    for coll_name, coll in bk._collectives(ctx, x).items():
        for form_name, form in forms.items():
            name = f"{coll_name}+{form_name}"
            chains[name] = lambda a, r, ww, s, form=form, coll=coll: form(coll(a), r, ww, s)
            try:
                times[name] = timer(chains[name])
            except Exception:  # noqa: BLE001 - a baseline that cannot run is left out
                times[name] = None
    _spent(ctx, "unfused_timing", t0)
    t0 = time.perf_counter()
    ctx.confirm_us = confirm(ctx, tb, times, fused, chains, timer)
    _spent(ctx, "confirm", t0)
    ctx.write_us = timer.write_us  # the bucket's copy time, for tune_pair's line and --json row
    del x, res
    ctx.empty_cache()
    return times


# Rounds of the confirm step (confirm): the first pass's fastest fused config and fastest unfused chain
# timed again this many times each, in turns, and the medians decide. 3: the fewest draws whose median
# drops one outlier either way; one round costs two timings (about 6 ms each on 1x H100 at hidden 4096,
# session 13's fused_timing phase: 1.2 s for about 200 timings). On 1x H100 (session 14, two runs of
# add + RMSNorm at hidden 4096/7168/8192) the first pass's fastest fused config took 0.9-1.2% longer on
# average when timed again, the fastest unfused chain 0.05-0.09% less, and 8 of 90 picks changed
# (results/README.md, "Session 14"); the step took 1.6-1.8 s of a run.
CONFIRM_ROUNDS = 3


def confirm(ctx, tb, times, fused, chains, timer) -> dict[str, float]:
    """The times that decide the bucket: the first pass's fastest fused config and fastest unfused
    chain timed again, :data:`CONFIRM_ROUNDS` times each, in turns (the order swapped every
    round, so drift falls on both), as ``{name: median us}``; ``{}`` where either side has no
    time.

    The first pass times each of a dozen fused configs once and keeps the fastest, so the time
    it keeps is the luckiest draw among configs that differ by less than the noise, set against
    the fastest of two or three unfused chains: a bias toward the fused pick of about the
    spread of one timing. Timed again, the two stand on equal terms. The pair is chosen from
    the slowest rank's first-pass times (:func:`fusion_passes.backends.agree.slowest`), so
    every rank re-times the same two options."""
    from fusion_passes.backends import agree

    slowest = agree.slowest(ctx.group, _inf_for_none(times))
    best = []
    for fused_side in (True, False):
        finite = [k for k, v in slowest.items() if k.startswith("fused:") is fused_side and math.isfinite(v)]
        if not finite:
            return {}
        best.append(min(finite, key=lambda k: (slowest[k], k)))
    runs: dict[str, list[float]] = {name: [] for name in best}
    for r in range(CONFIRM_ROUNDS):
        for name in best[:: 1 if r % 2 == 0 else -1]:
            if name.startswith("fused:"):
                with _forcing(tb, parse_option(name)):
                    runs[name].append(timer(fused))
            else:
                runs[name].append(timer(chains[name]))
    return {name: statistics.median(v) for name, v in runs.items()}


# Where --context after-write times an option at or below the write alone (noise: both are timed
# apart), the option counts this much (us): it won, and no speedup divides by zero.
AFTER_WRITE_MIN_US = 0.01


def write_input(dst, src):
    """``--context after-write``'s producer: *dst* (the option's input) written from *src*, returned."""
    return dst.copy_(src)


class _Timer:
    """``timer(fn)``: us of one ``fn(*inputs)`` as ``--context`` asks, timed as every option
    (``ctx.time_graph``: CUDA graphs of *calls* calls on the GPU).

    ``alone``: *fn* back to back on the same inputs. ``after-write`` (the default): each call
    right after a copy kernel that writes its input (``x.copy_(src)``), as in a model the
    epilogue runs right after the GEMM (or the collective) that writes its input, which then
    sits in L2; the option's time is the pair's less the copy's alone (:attr:`write_us`, timed
    once per bucket), at least :data:`AFTER_WRITE_MIN_US`. A copy stands in for the GEMM: it
    leaves the input in L2 as the GEMM's stores do, and costs about one pass over the input
    where a GEMM at 16384 x 8192 costs milliseconds, whose run-to-run spread would swamp the
    epilogue's."""

    def __init__(self, ctx, inputs, calls: int):
        self._ctx, self._inputs, self._calls = ctx, inputs, calls
        self.write_us = None
        if getattr(ctx.args, "context", "after-write") == "after-write":
            src = inputs[0].clone()
            self._write = lambda a: write_input(a, src)
            self.write_us = ctx.time_graph(lambda a, *rest: self._write(a), inputs, calls, ctx.args.replays)

    def __call__(self, fn) -> float:
        ctx = self._ctx
        if self.write_us is None:
            return ctx.time_graph(fn, self._inputs, self._calls, ctx.args.replays)
        pair = ctx.time_graph(lambda a, *rest: fn(self._write(a), *rest), self._inputs, self._calls, ctx.args.replays)
        return max(pair - self.write_us, AFTER_WRITE_MIN_US)


def move_floor(ctx, variant: str, hidden: int, tokens: int, dtype) -> float | None:
    """At world size 1, the bucket's move floor (:func:`fusion_passes.cli.bench_cuda.move_floor_us`:
    its rows read and written, nothing computed), timed as the options are; None at N (the
    floor there is the all-reduce's) and for the variants it does not model (FP4)."""
    if ctx.world != 1 or not getattr(ctx.args, "move_floor", True):
        return None
    from fusion_passes.cli import bench_cuda

    calls = br.calls_per_graph(variant, tokens, hidden)
    return bench_cuda.move_floor_us(variant, tokens, hidden, dtype, calls, ctx.args.replays)


def _time_fused(ctx, tb, option, fused, inputs, timer, times) -> None:
    """Time the fused call at one launch config (forced on the backend) into *times*. At world
    size 1 every launch field is forced (one row, Triton's stages unless named), so that no
    entry of a table already on disk changes the config being timed."""
    try:
        with _forcing(tb, option):
            t0 = time.perf_counter()
            fused(*inputs)  # the first call compiles this config's binary: kept apart in --json's phases_s
            ctx.sync()
            t0 = _spent(ctx, "fused_warmup", t0)
            times[option_name(option)] = timer(fused)
            _spent(ctx, "fused_timing", t0)
    except Exception:  # noqa: BLE001 - a config that cannot run (e.g. a path's workspace) is skipped
        times[option_name(option)] = None
