"""``fusion-passes bench kernels``: the fused call vs the strongest unfused chain, under CUDA graphs.

For every variant, hidden size and token count it times, in one process and one run:

* ``fused``: the public op ``torch.ops.fusion_passes.<op>(..., backend="triton")``, timed
  first and again last in its row (the two show the run's spread);
* every unfused baseline: each available collective (none at world size 1; NCCL, torch
  symm-mem one-shot and two-shot at N) + the epilogue (:mod:`fusion_passes.epilogue`: add +
  RMSNorm, + quant) compiled by Inductor with the hidden size static, per token count
  (``dynamic=False``) and with only the token dimension dynamic (as vLLM compiles);
  ``--with-dynamic-true`` adds the ``dynamic=True`` form as a labelled extra column.

Rows, the best baseline and the speedups are described in :mod:`fusion_passes.cli.bench_rows`.
Each call is captured ``K`` times in one CUDA graph; a call's time is the median replay / K.
Where the selector's table (thresholds.py) declines the triton backend, the row says so
and the kernel is measured anyway (re-deriving the table needs it everywhere).

``--plan`` prints the sweep's size and rough duration without a GPU; ``--derive-table
FILE...`` prints the selector table derived from result files
(:mod:`fusion_passes.cli.bench_table`), also without a GPU:
``fusion-passes bench kernels --derive-table results/x.json``.
At TP N: ``torchrun --nproc_per_node=N -m fusion_passes.cli bench kernels``.
Multicast stays off (``NCCL_NVLS_ENABLE=0``, ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import sys
import time
import types

from fusion_passes.cli import bench_epilogue  # noqa: E402
from fusion_passes.cli import bench_rows as br  # noqa: E402
from fusion_passes.cli.arguments import (  # noqa: E402
    MAX_REPLAYS, MAX_STEP_TOKENS, int_range, world_size_from_env)

NVFP4_GLOBAL_SCALE = 448.0 * 6 / 5  # a norm output of absmax ~5 spans the e4m3 block scales
FP8_STATIC_SCALE = 0.02
TOKDYN_COMPILE_TOKENS = 128  # the token-dynamic epilogue compiles once, at this size (not 0 or 1)
EPS = 1e-6


def add_arguments(parser) -> None:
    parser.add_argument("--hidden", type=int_range(1), nargs="+", default=list(br.DEFAULT_HIDDEN),
                        help="hidden sizes for add_rmsnorm (default 4096 7168 8192)")
    parser.add_argument("--quant-hidden", type=int_range(1), nargs="+",
                        default=list(br.DEFAULT_QUANT_HIDDEN),
                        help="hidden sizes for the quant variants (default 7168)")
    parser.add_argument("--tokens", type=int_range(1, MAX_STEP_TOKENS), nargs="+", default=list(br.DEFAULT_TOKENS),
                        help="token counts (default 1 2 4 .. 16384)")
    parser.add_argument("--variants", nargs="+", default=list(br.DEFAULT_VARIANTS), choices=br.VARIANTS,
                        help=f"default: {' '.join(br.DEFAULT_VARIANTS)}")
    parser.add_argument("--replays", type=int_range(1, MAX_REPLAYS), default=5,
                        help="timed graph replays per point (median)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"),
                        help="the activation dtype (default bfloat16); the selector reads the table's entries "
                             "of this dtype")
    parser.add_argument("--with-dynamic-true", action="store_true",
                        help="also time the epilogue compiled with dynamic=True (an extra column, never the best)")
    parser.add_argument("--with-max-autotune", action="store_true",
                        help="also time the epilogue compiled per token count with max_autotune + "
                             "coordinate_descent_tuning (a counted baseline; slow to compile)")
    parser.add_argument("--out", help="write the JSON here (rank 0)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--plan", action="store_true", help="print the sweep's size and rough duration, then exit")
    parser.add_argument("--derive-table", nargs="+", metavar="FILE",
                        help="print the selector's max_tokens_faster table derived from these result files, then exit")
    parser.add_argument("--margin", type=float, default=0.0,
                        help="with --derive-table: a win needs speedup_worst > 1 + MARGIN (default 0)")


def validate(args) -> None:
    """Reject what cannot run before any work, naming the problem."""
    from fusion_passes.cli import UsageError

    if args.margin < 0:
        raise UsageError(f"--margin must be >= 0, got {args.margin}")
    if args.derive_table:
        return
    for variant in args.variants:
        for hidden in br.hiddens(variant, args.hidden, args.quant_hidden):
            reason = br.check_hidden(variant, hidden)
            if reason is not None:
                raise UsageError(reason)
    if len(set(args.tokens)) != len(args.tokens):
        raise UsageError(f"--tokens has repeats: {args.tokens}")
    if args.out:
        folder = pathlib.Path(args.out).resolve().parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise UsageError(f"--out {args.out}: folder {folder} does not exist or is not writable")


def run(args) -> int:
    validate(args)
    if args.derive_table:
        from fusion_passes.cli import bench_table
        from fusion_passes.cli import UsageError

        try:
            results = bench_table.load(args.derive_table)
            table = bench_table.derive(results, args.margin)
        except ValueError as e:
            raise UsageError(str(e)) from None
        print(bench_table.render(table, results, args.margin))
        return 0
    world = world_size_from_env()
    plan = br.plan(args.variants, args.hidden, args.quant_hidden, args.tokens, world, args.with_dynamic_true,
                   args.with_max_autotune)
    if args.plan:
        print(br.format_plan(plan))
        return 0
    import torch

    if not torch.cuda.is_available() or torch.version.hip is not None:
        print("fusion-passes bench kernels: needs an NVIDIA CUDA GPU (the triton backend's kernels)", file=sys.stderr)
        return 2
    return _sweep(args, plan)


# --------------------------------------------------------------------------- the sweep (GPU)


def _sweep(args, plan: dict) -> int:
    import torch.distributed as dist

    from fusion_passes.cli import bench_cuda

    start = time.perf_counter()
    rank, world = bench_cuda.init_nccl()
    ctx = sweep_context(args, rank, world, dist.group.WORLD.group_name, device="cuda")
    _raise_recompile_limits(len(args.tokens))
    bandwidths = ctx.bandwidths
    bandwidths["copy_bandwidth_GBps"] = bench_cuda.copy_bandwidth() / 1e9
    if world > 1:
        bandwidths["peer_read_bandwidth_GBps"] = bench_cuda.peer_read_bandwidth(ctx.pg_name, rank, world) / 1e9
    ctx.phases["setup"] = time.perf_counter() - start
    if rank == 0 and not args.json:
        print(br.format_plan(plan), flush=True)
    rows, selectors = [], {}
    for variant in args.variants:
        for hidden in br.hiddens(variant, args.hidden, args.quant_hidden):
            rows += _variant_hidden(ctx, variant, hidden, selectors)
    ctx.phases["total"] = time.perf_counter() - start
    result = br.result(command=br.command_line("kernels", world), world=world, machine=bench_cuda.machine(),
                       versions=bench_cuda.versions(), rows=rows, phases=ctx.phases, plan_=plan,
                       bandwidths=bandwidths, with_dynamic_true=args.with_dynamic_true, selectors=selectors,
                       with_max_autotune=args.with_max_autotune, dtype=args.dtype)
    if rank == 0:
        _report(args, result)
    dist.barrier()
    dist.destroy_process_group()
    return 0


def sweep_context(args, rank: int, world: int, pg_name: str, device: str = "cuda", compile_backend: str = "inductor",
                  fused_backend: str = "triton"):
    """What the sweep's functions share. On a GPU: CUDA-graph timing and the triton
    backend; other devices (a CPU test of the sweep) time one eager call instead."""
    import torch

    from fusion_passes.cli import bench_cuda

    cuda = device == "cuda"
    return types.SimpleNamespace(
        rank=rank, world=world, pg_name=pg_name, group="c10d:" + pg_name, args=args, device=device,
        compile_backend=compile_backend, fused_backend=fused_backend,
        sync=torch.cuda.synchronize if cuda else (lambda: None),
        empty_cache=torch.cuda.empty_cache if cuda else (lambda: None),
        time_graph=bench_cuda.time_graph if cuda else _eager_us,
        bandwidths={"copy_bandwidth_GBps": 1.0, "peer_read_bandwidth_GBps": None},
        phases={"setup": 0.0, "compile_static": 0.0, "compile_tokdyn": 0.0, "compile_dynamic_true": 0.0,
                "compile_max_autotune": 0.0, "fused_warmup": 0.0, "timing": 0.0})


def _eager_us(fn, args, calls, replays) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - t0) * 1e6


def _report(args, result: dict) -> None:
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result, indent=1))
    if args.json:
        print(json.dumps(result, indent=1))
        return
    bw = result["copy_bandwidth_GBps"]
    peer = result["peer_read_bandwidth_GBps"]
    print(f"copy bandwidth {bw:.0f} GB/s" + ("" if peer is None else f"; peer read {peer:.0f} GB/s")
          + f"; world size {result['world_size']}; {result['machine'].get('gpu')}")
    print("phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in result["phases_s"].items()))
    for variant, verdict in result["selector"].items():
        print(f"selector, {variant}: {verdict}")


def _raise_recompile_limits(token_counts: int) -> None:
    """The static epilogue compiles once per token count on one function: more than
    Dynamo's default recompile limit (8) in a full sweep."""
    from fusion_passes import _compat
    config = _compat.dynamo_config()
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 4 * token_counts + 16))


def _variant_hidden(ctx, variant: str, hidden: int, selectors: dict) -> list[dict]:
    """Every token count of one (variant, hidden): compile the epilogue forms, time the rows."""
    import torch

    args = ctx.args
    verdicts = {t: _selector(variant, hidden, t, ctx.world, args.dtype) for t in args.tokens}  # the table now
    declined = sorted(t for t, (pick, _) in verdicts.items() if pick != "triton")
    if declined:
        pick, why = verdicts[declined[0]]
        selectors[f"{variant} H={hidden}"] = f"{pick} picked at tokens {declined}" + (f" (triton: {why})" if why else "")
    else:
        selectors[f"{variant} H={hidden}"] = "triton at every point"
    w = (torch.rand(hidden, device=ctx.device) + 0.5).to(getattr(torch, args.dtype))  # the activation dtype
    scale = torch.tensor([NVFP4_GLOBAL_SCALE if variant.endswith("nvfp4") else FP8_STATIC_SCALE], device=ctx.device)
    forms = _compile_forms(ctx, variant, hidden, w, scale)
    fused = _fused_fn(variant, ctx.group, ctx.fused_backend)
    rows = []
    with _triton_admitted(ctx.world, variant):
        for tokens in args.tokens:
            row = _row(ctx, variant, hidden, tokens, w, scale, forms, fused, verdicts[tokens])
            rows.append(row)
            if ctx.rank == 0 and not args.json:
                print(br.format_row(row), flush=True)
    return rows


def _selector(variant: str, hidden: int, tokens: int, world: int, dtype: str = "bfloat16") -> tuple[str, str | None]:
    """What ``backend="auto"`` picks for this call today, and why not triton (None if triton):
    from this machine's measured table where it has one (at world size 1; above, only a
    table the group agreed on counts, as for a compiled site), else the shipped one."""
    import torch

    from fusion_passes import backends
    from fusion_passes.backends import agree

    call = backends.Call(variant=variant, device="cuda", dtype=getattr(torch, dtype), hidden=hidden, world_size=world,
                         tokens=tokens, group_size=br.PER_GROUP_SIZE if variant.endswith("per_group") else None,
                         table=agree.table_id(None, world))
    return backends.select(call, "auto"), backends.why_not("triton", call)


@contextlib.contextmanager
def _triton_admitted(world: int, variant: str):
    """Open the measured-crossover gate for (world, variant) while timing, so the kernel
    runs where today's table declines it; the hard limits (hidden, dtype, alignment) stay."""
    from fusion_passes import backends
    from fusion_passes.backends import thresholds

    table = thresholds.TRITON["max_tokens_faster"]
    saved = dict(table)
    table[(world, variant)] = None
    backends.select.cache_clear()
    try:
        yield
    finally:
        table.clear()
        table.update(saved)
        backends.select.cache_clear()


def _compile_forms(ctx, variant, hidden, w, scale) -> dict:
    """Compile the token-dynamic form now (once, at TOKDYN_COMPILE_TOKENS); the static
    form compiles per token count in :func:`_row`."""
    from fusion_passes import _compat
    import torch

    forms = bench_epilogue.compile_forms(bench_epilogue.epilogue_fn(variant, EPS),
                                         with_dynamic_true=ctx.args.with_dynamic_true, backend=ctx.compile_backend,
                                         with_max_autotune=getattr(ctx.args, "with_max_autotune", False))
    x = torch.randn(TOKDYN_COMPILE_TOKENS, hidden, device=ctx.device).to(w.dtype)  # the weight's dtype
    res = torch.randn_like(x)
    _compat.mark_dynamic(x, 0)
    _compat.mark_dynamic(res, 0)
    t0 = time.perf_counter()
    forms["tokdyn"](x, res, w, scale)
    ctx.sync()
    ctx.phases["compile_tokdyn"] += time.perf_counter() - t0
    return forms


def _fused_fn(variant: str, group: str, backend: str = "triton"):
    """The public fused op of *variant* with ``backend=`` *backend* (triton on the GPU)."""
    import torch

    fp = torch.ops.fusion_passes
    b = backend
    calls = {
        "add_rmsnorm": lambda x, r, w, s: fp.allreduce_add_rmsnorm(x, r, w, EPS, group, backend=b),
        "add_rmsnorm_fp8_static": lambda x, r, w, s: fp.allreduce_add_rmsnorm_fp8_static(
            x, r, w, EPS, group, s, backend=b),
        "add_rmsnorm_fp8_per_token": lambda x, r, w, s: fp.allreduce_add_rmsnorm_fp8_per_token(
            x, r, w, EPS, group, None, backend=b),
        "add_rmsnorm_fp8_per_group": lambda x, r, w, s: fp.allreduce_add_rmsnorm_fp8_per_group(
            x, r, w, EPS, group, br.PER_GROUP_SIZE, backend=b),
        "add_rmsnorm_nvfp4": lambda x, r, w, s: fp.allreduce_add_rmsnorm_nvfp4(x, r, w, EPS, group, s, True,
                                                                              backend=b),
        "add_rmsnorm_mxfp4": lambda x, r, w, s: fp.allreduce_add_rmsnorm_mxfp4(x, r, w, EPS, group, backend=b),
    }
    return calls[variant]


def _collectives(ctx, x) -> dict:
    """name -> ``f(t)`` all-reducing *t* (shaped like *x*) the way that baseline does: none at
    world size 1; at N each collective a measured ``unfused`` bucket can name
    (``symm.COLLECTIVES``: NCCL, torch's symmetric-memory one-shot and two-shot), run by
    the function the fused op's unfused pick runs (``symm.all_reduce``), with the group's
    symmetric workspace registered here, before any capture."""
    if ctx.world == 1:
        return {"none": lambda t: t}
    from fusion_passes.backends import symm

    symm.get(ctx.group, x.numel() * x.element_size(), x.device)
    return {name: (lambda t, name=name: symm.all_reduce(t, ctx.group, name)) for name in symm.COLLECTIVES}


def _timed(ctx, phase: str, fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    ctx.sync()
    ctx.phases[phase] += time.perf_counter() - t0
    return out


def _row(ctx, variant, hidden, tokens, w, scale, forms, fused, verdict) -> dict:
    """Time one point: fused, every baseline, fused again."""
    import torch

    torch.manual_seed(ctx.rank * 7919 + tokens)
    x = torch.randn(tokens, hidden, device=ctx.device).to(w.dtype)  # the activation dtype is the weight's
    torch.manual_seed(tokens)
    res = torch.randn(tokens, hidden, device=ctx.device).to(w.dtype)
    nbytes = br.bytes_moved(variant, tokens, hidden)
    calls = br.calls_per_graph(variant, tokens, hidden)
    inputs = (x, res, w, scale)
    _timed(ctx, "compile_static", forms["static"], *inputs)
    if br.EXTRA_FORM in forms:
        _timed(ctx, "compile_dynamic_true", forms[br.EXTRA_FORM], *inputs)
    if br.MAX_AUTOTUNE_FORM in forms:
        _timed(ctx, "compile_max_autotune", forms[br.MAX_AUTOTUNE_FORM], *inputs)
    _timed(ctx, "fused_warmup", fused, *inputs)
    t0 = time.perf_counter()
    replays = ctx.args.replays
    fused_us = ctx.time_graph(fused, inputs, calls, replays)
    baselines, errors = {}, {}
    for coll_name, coll in _collectives(ctx, x).items():
        for form_name, form in forms.items():
            name = f"{coll_name}+{form_name}"
            try:
                baselines[name] = ctx.time_graph(lambda a, r, ww, s: form(coll(a), r, ww, s), inputs, calls,
                                                        replays)
            except Exception as e:  # noqa: BLE001 - a baseline that cannot run is recorded, not fatal
                baselines[name], errors[name] = None, f"{type(e).__name__}: {str(e)[:200]}"
    fused_last_us = ctx.time_graph(fused, inputs, calls, replays)
    ctx.phases["timing"] += time.perf_counter() - t0
    _, extra = br.baseline_names(ctx.world, ctx.args.with_dynamic_true)
    row = br.make_row(variant=variant, hidden=hidden, tokens=tokens, calls=calls, fused_us=fused_us,
                      fused_last_us=fused_last_us, baselines=baselines, extra=extra, errors=errors,
                      floor_us=br.floor_us(nbytes, tokens, hidden, ctx.world, **ctx.bandwidths), selector=verdict[0],
                      declined=verdict[1])
    del x, res
    ctx.empty_cache()
    return row


def main(argv: list[str] | None = None) -> int:
    """``fusion-passes bench kernels ARGV`` without the command line's wrapper: its exit status,
    a bad argument one line and 2."""
    import argparse

    from fusion_passes.cli import UsageError

    parser = argparse.ArgumentParser(prog="fusion-passes bench kernels", description=__doc__.splitlines()[0])
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except UsageError as e:
        print(f"bench kernels: error: {e}", file=sys.stderr)
        return 2
