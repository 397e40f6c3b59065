"""``fusion-passes bench model``: a decoder step's time without and with the pass, under CUDA graphs.

Models are real Hugging Face transformers code with random weights (no download;
:mod:`fusion_passes.cli.models`): a dense Llama-3-8B-shaped decoder and a
Qwen3-30B-A3B-shaped MoE decoder, ``--layers`` layers each, bf16 or FP8 (FP8 weights, FP8
activations per token into ``torch._scaled_mm``; ``--fp8-linear`` picks whose linear).

* World size 1 (``fusion-passes bench model``): the decoder with its row-parallel outputs
  reduced explicitly (``_c10d_functional.all_reduce`` + ``wait_tensor``) over a one-rank
  NCCL group, so the pass has its sites; the same model with no collective at all is timed
  too (``nocoll``), so removing a one-rank all-reduce is not mistaken for a kernel win.
* World size N (``torchrun --nproc_per_node=N -m fusion_passes.cli bench model``):
  HF's own tensor-parallel plan (``tp_plan="auto"``).

Steps, forms and numerics: :mod:`fusion_passes.cli.model_step`. Each step is captured
in a CUDA graph by hand (``torch.cuda.graph`` around the compiled step, one step per
graph) and replayed in ``--rounds`` rounds, the forms of a point interleaved round by round
(:func:`fusion_passes.cli.model_step.interleave`); a step's time is the median of its
rounds' medians, and each row gives the speedup's range over the rounds and what their
signs say (``speed``: faster or slower in every round, or within noise;
:func:`fusion_passes.cli.model_step.speed_verdict`). ``--dry-run`` traces the same
models on CPU under the fake process group and reports the sites
(:mod:`fusion_passes.cli.model_trace`); ``--device cpu`` runs the whole benchmark on CPU
(gloo, Inductor's C++ kernels, wall-clock time of eager calls): a check of the tool whose
times say nothing about GPUs. ``--plan`` prints the compile count and a rough duration.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import sys
import tempfile
import time
import types

from fusion_passes.cli.arguments import (
    MAX_CONTEXT, MAX_LAYERS, MAX_REPLAYS, MAX_ROUNDS, MAX_SEQS, MAX_TP, int_range, world_size_from_env,
)
from fusion_passes.cli.bench_rows import command_line

MODELS = ("llama", "qwen3_moe")
PRECISIONS = ("bf16", "fp8")
MOE = ("qwen3_moe",)
DEFAULT_DECODE = (1, 8, 32, 64)
DEFAULT_PREFILL = (512, 4096)
# Rough compile cost of one step on the H200 host, a guess (not measured: no GPU where
# this was written; the tool prints the real per-phase times): the first form of a point
# compiles its Triton kernels ("cold"), the others find most of them cached ("warm");
# Dynamo and Inductor's lowering grow with the layers. Plus model build, the fp32
# reference and the timing per model x precision ("setup").
SECONDS_COLD = (15.0, 2.5)  # (fixed, per layer)
SECONDS_WARM = (5.0, 1.0)
SECONDS_SETUP = 60.0


def add_arguments(parser) -> None:
    parser.add_argument("--model", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--precision", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--layers", type=int_range(1, MAX_LAYERS), default=4, help="decoder layers (default 4)")
    parser.add_argument("--decode", type=int_range(1, MAX_SEQS), nargs="*", default=list(DEFAULT_DECODE),
                        help="decode steps: T sequences x 1 token (default 1 8 32 64; none: --decode)")
    parser.add_argument("--prefill", type=int_range(1, MAX_CONTEXT), nargs="*", default=list(DEFAULT_PREFILL),
                        help="prefill steps: 1 sequence x T tokens (default 512 4096; none: --prefill)")
    parser.add_argument("--context", type=int_range(1, MAX_CONTEXT - 1), default=1024, help="tokens cached per decoding sequence")
    parser.add_argument("--replays", type=int_range(1, MAX_REPLAYS), default=10,
                        help="timed graph replays per step and round (median; default 10)")
    parser.add_argument("--rounds", type=int_range(1, MAX_ROUNDS), default=5,
                        help="rounds per point (default 5): on GPU each round replays every form's captured "
                             "step once, interleaved, so drift during the run falls on all forms; a step's "
                             "time is the median of its rounds, and the row gives the speedup's range over "
                             "the rounds. On CPU the rounds of a form run back to back after its compile")
    parser.add_argument("--fp8-linear", choices=("vllm", "hf"), default="vllm",
                        help="vllm: our FP8 linear with vLLM's native per-token quant (default); hf: "
                             "transformers' CompressedTensorsFP8Linear (quantize_fp8_per_row)")
    parser.add_argument("--numerics", choices=("deterministic", "timed"),
                        help="which compiles the numerics check compares: deterministic (default on GPU): "
                             "unfused and fused compiled again, untimed, under Inductor's deterministic mode, "
                             "whose reduction configs do not depend on timing; timed (default on CPU, where "
                             "Inductor's C++ kernels time nothing): the timed compiles, no extra compile")
    parser.add_argument("--token-dynamic", action="store_true",
                        help="compile each form once per step kind with the token dimension dynamic and "
                             "Dynamo's guards dropped (as vLLM compiles), at the kind's largest point, and run "
                             "every point of that kind through it; prefill points share the largest one's cache")
    parser.add_argument("--tiny", action="store_true", help="toy sizes of the same model families")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU: trace under the fake process group and report the sites (no timing)")
    parser.add_argument("--world-size", type=int_range(1, MAX_TP), default=1,
                        help="with --dry-run: fake ranks (1: explicit all-reduces; N: HF tp_plan)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: run everything on CPU (gloo; a check of the tool, not a benchmark)")
    parser.add_argument("--plan", action="store_true", help="print the compile count and rough duration, then exit")
    parser.add_argument("--out", help="write the JSON here (rank 0)")
    parser.add_argument("--json", action="store_true", help="print the JSON instead of the progress lines")


def validate(args) -> None:
    from fusion_passes.cli import UsageError

    if not args.decode and not args.prefill:
        raise UsageError("nothing to run: --decode and --prefill are both empty")
    if args.token_dynamic and args.dry_run:
        raise UsageError("--token-dynamic compiles and times the steps; --dry-run only traces them")
    if args.rounds * args.replays > MAX_REPLAYS:
        raise UsageError(f"--rounds {args.rounds} x --replays {args.replays} is more than {MAX_REPLAYS} timed "
                         "replays per form and point")
    if args.world_size > 1 and not args.dry_run:
        raise UsageError("--world-size is for --dry-run; on GPUs the world size is torchrun's")
    if args.out:
        folder = pathlib.Path(args.out).resolve().parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise UsageError(f"--out {args.out}: folder {folder} does not exist or is not writable")


def plan(args, world: int) -> dict:
    """Compiles per (model, precision) and the rough duration of a run."""
    n_points = len(args.decode) + len(args.prefill)
    forms = 3 if world == 1 else 2
    checks = 2 if default_numerics(args) == "deterministic" else 0  # model_step.CHECK_FORMS (a module with torch)
    combos = len(args.model) * len(args.precision)
    n_graphs = (bool(args.decode) + bool(args.prefill)) if args.token_dynamic else n_points
    compiles = combos * n_graphs * (forms + checks)
    cold = SECONDS_COLD[0] + SECONDS_COLD[1] * args.layers
    warm = SECONDS_WARM[0] + SECONDS_WARM[1] * args.layers
    per_point = cold + (forms + checks - 1) * warm
    return {"points": n_points, "forms": forms, "check_forms": checks, "combinations": combos, "compiles": compiles,
            "estimate_s": round(combos * (SECONDS_SETUP + n_graphs * per_point))}


def run(args) -> int:
    validate(args)
    from fusion_passes.cli import model_step

    pts = model_step.points(args.decode, args.prefill, args.context,
                            shared_prefill_cache=args.token_dynamic)
    if args.dry_run:
        return _dry_run(args, pts)
    world = world_size_from_env()
    p = plan(args, world)
    if args.plan:
        print(_format_plan(p))
        return 0
    import torch

    if args.device == "cuda" and (not torch.cuda.is_available() or torch.version.hip is not None):
        print("fusion-passes bench model: needs an NVIDIA CUDA GPU (or --device cpu / --dry-run)", file=sys.stderr)
        return 2
    return _benchmark(args, pts, p)


def _format_plan(p: dict) -> str:
    checks = f" (+{p['check_forms']} untimed, for the numerics)" if p.get("check_forms") else ""
    return (f"plan: {p['combinations']} model x precision, {p['points']} points, {p['forms']} forms{checks} each: "
            f"{p['compiles']} compiles; roughly {p['estimate_s'] / 60:.1f} min (narrow with --model / "
            "--precision / --decode / --prefill)")


def _dry_run(args, pts) -> int:
    from fusion_passes.cli import model_trace

    # one decode and one prefill point: the sites do not depend on the token count
    kinds = {}
    for p in pts:
        kinds.setdefault(p.kind, p)
    out = (lambda s: None) if args.json else (lambda s: print(s, flush=True))
    try:
        rows = model_trace.dry_run(args.model, args.precision, list(kinds.values()), layers=args.layers,
                                   world=args.world_size, tiny=args.tiny, fp8_linear=args.fp8_linear, out=out)
    except RuntimeError as e:
        print(f"fusion-passes bench model --dry-run: FAILED: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"dry_run": True, "rows": rows}, indent=1))
    return 0


# --------------------------------------------------------------------------- the benchmark


def _setup(args):
    """Process group and the device-specific pieces of the run context."""
    import torch
    import torch.distributed as dist

    from fusion_passes.cli import bench_cuda

    if args.device == "cuda":
        rank, world = bench_cuda.init_nccl("29543")
        ctx = types.SimpleNamespace(device=torch.device("cuda", torch.cuda.current_device()), device_kind="cuda",
                                    sync=torch.cuda.synchronize, empty_cache=torch.cuda.empty_cache,
                                    capture=bench_cuda.capture, deferred=True)
    else:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29543")
        dist.init_process_group("gloo", rank=rank, world_size=world)
        ctx = types.SimpleNamespace(device=torch.device("cpu"), device_kind="cpu", sync=lambda: None,
                                    empty_cache=lambda: None, capture=_wall_timer, deferred=False)
    ctx.rounds, ctx.replays = args.rounds, args.replays
    ctx.numerics = numerics_mode(args)
    ctx.rank, ctx.world, ctx.group_name, ctx.handles = rank, world, dist.group.WORLD.group_name, []
    return ctx


def default_numerics(args) -> str:
    """``--numerics`` as given, else ``deterministic`` on GPU and ``timed`` on CPU."""
    given = getattr(args, "numerics", None)
    return given or ("deterministic" if getattr(args, "device", "cuda") == "cuda" else "timed")


def numerics_mode(args) -> str:
    """``--numerics``, its default by device, or ``timed`` (with a note on stderr) where
    deterministic compiles were asked for but this torch's Inductor has no such mode."""
    from fusion_passes import _compat

    mode = default_numerics(args)
    if mode == "deterministic" and not _compat.inductor_deterministic_options():
        print("fusion-passes bench model: this torch's Inductor has no deterministic mode; the numerics check "
              "compares the timed compiles", file=sys.stderr)
        return "timed"
    return mode


def _wall_timer(fn):
    """CPU: *fn* called once, then ``replay()``, the wall-clock time (us) of one call."""
    fn()

    def replay() -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6

    return replay


def _load(ctx, args, name: str):
    """The model of this run: one rank builds it and hooks explicit all-reduces; N ranks
    load rank 0's checkpoint with HF's tp_plan."""
    import torch
    import torch.distributed as dist

    from fusion_passes.cli import hf_tp, models

    if ctx.world == 1:
        model = models.build(name, args.layers, tiny=args.tiny, device=str(ctx.device))
        ctx.handles = models.reduce_explicitly(model, ctx.group_name)
        ctx.form = "explicit _c10d_functional.all_reduce + wait_tensor over a one-rank group"
        return model
    box = [tempfile.mkdtemp(prefix="fusion-passes-bench-model-") if ctx.rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    if ctx.rank == 0:
        models.build(name, args.layers, tiny=args.tiny, device=str(ctx.device)).save_pretrained(box[0])
    dist.barrier()
    model = hf_tp.load_tp(box[0], torch.bfloat16)
    dist.barrier()
    if ctx.rank == 0:
        shutil.rmtree(box[0], ignore_errors=True)
    for m in model.modules():  # Qwen3-MoE's plan hooks q/k norms for backward: inference only
        m._backward_hooks.clear()
    ctx.form, ctx.handles = f"HF tp_plan='auto' over {ctx.world} ranks", []
    return model


def _combination(ctx, args, name: str, precision: str, pts) -> list[dict]:
    """Every point of one (model, precision)."""
    from fusion_passes.cli import model_step, models

    t0 = time.perf_counter()
    ctx.model = _load(ctx, args, name)
    if precision == "fp8":
        models.to_fp8(ctx.model, args.fp8_linear)
    ctx.forms = model_step.FORMS_WS1 if ctx.world == 1 else model_step.FORMS_TP
    ctx.phases["build"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    refs = model_step.references(ctx.model, pts, ctx.device, ctx.world)
    ctx.phases["reference"] += time.perf_counter() - t0
    prefix = f"{name} {precision}" + (f" ({args.fp8_linear} FP8 linear)" if precision == "fp8" else "")
    if ctx.rank == 0 and not args.json:
        print(f"{prefix}: {ctx.form}", flush=True)
    rows = []
    for row in _point_rows(ctx, args, pts, refs):
        row = {"model": name, "precision": precision, "form": ctx.form, **row}
        if precision == "fp8":
            row["fp8_linear"] = args.fp8_linear
        if "compiled_at" not in row or not rows or rows[-1]["kind"] != row["kind"]:  # once per graph
            ctx.phases["compile"] += sum(row["compile_s"].values())
        rows.append(row)
        if ctx.rank == 0 and not args.json:
            print(model_step.format_point(prefix, row), flush=True)
    del ctx.model
    ctx.handles = []
    return rows


def _point_rows(ctx, args, pts, refs):
    """Each point's row: one compile per point and form, or (``--token-dynamic``) one per
    step kind and form (:func:`fusion_passes.cli.model_step.run_dynamic`)."""
    from fusion_passes.cli import model_step

    if not args.token_dynamic:
        for p, ref in zip(pts, refs):
            yield model_step.run_point(ctx, p, ref)
        return
    for kind in ("decode", "prefill"):
        idx = [i for i, p in enumerate(pts) if p.kind == kind]
        if idx:
            yield from model_step.run_dynamic(ctx, [pts[i] for i in idx], [refs[i] for i in idx])


def _benchmark(args, pts, p: dict) -> int:
    import torch.distributed as dist

    from fusion_passes.cli import bench_cuda, model_step

    start = time.perf_counter()
    ctx = _setup(args)
    ctx.phases = {"build": 0.0, "reference": 0.0, "compile": 0.0}
    if ctx.rank == 0 and not args.json:
        print(_format_plan(p), flush=True)
    rows = []
    for name in args.model:
        for precision in args.precision:
            rows += _combination(ctx, args, name, precision, pts)
    ctx.phases["total"] = time.perf_counter() - start
    # MoE: a router tie flips a token's experts between any two roundings, so its check is
    # reported but does not fail the run
    failed = [r for r in rows if not model_step.numerics_ok(r["numerics"]) and r["model"] not in MOE]
    noisy = [r for r in rows if not model_step.numerics_ok(r["numerics"]) and r["model"] in MOE]
    ratios = [r["numerics"]["ratio"] for r in rows if r["model"] not in MOE]
    result = {"command": command_line("model", ctx.world), "world_size": ctx.world, "device": args.device,
              "machine": bench_cuda.machine(), "versions": bench_cuda.versions(), "layers": args.layers,
              "tiny": args.tiny, "context": args.context, "plan": p, "token_dynamic": args.token_dynamic,
              "timing": ("one compiled step per CUDA graph (torch.cuda.graph); per round the median of "
                         "--replays replays, the forms of a point interleaved round by round; a step's time is "
                         "the median of its rounds" if args.device == "cuda" else
                         "CPU: median wall-clock time of eager calls, per round, rounds back to back"),
              "rounds": args.rounds, "replays": args.replays, "numerics": ctx.numerics,
              "phases_s": {k: round(v, 1) for k, v in ctx.phases.items()},
              "numerics_failed": len(failed), "numerics_failed_moe": len(noisy),
              "max_ratio": max(ratios, default=None), "ratio_max_allowed": model_step.RATIO_MAX,
              "speed": {v: sum(r.get("speed") == v for r in rows) for v in ("faster", "within noise", "slower")},
              "rows": rows}
    if ctx.rank == 0:
        if args.out:
            pathlib.Path(args.out).write_text(json.dumps(result, indent=1))
        if args.json:
            print(json.dumps(result, indent=1))
        else:
            print("phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in result["phases_s"].items()))
            if args.rounds > 1:
                print(f"speed (sign of every round's speedup; noise alone gives a verdict with probability "
                      f"{0.5 ** args.rounds:.3f}): " + ", ".join(f"{v} at {n}" for v, n in result["speed"].items()))
            worst = f"; fused/unfused distance at most {result['max_ratio']:.3f} (<= {model_step.RATIO_MAX})" \
                if ratios else ""
            print(f"numerics ({ctx.numerics} compiles: fused no further from fp32 than unfused in RMS, within one "
                  f"bf16 rounding, and at most {model_step.RATIO_MAX}x): "
                  f"{'ok' if not failed else f'FAILED at {len(failed)} points'} (dense){worst}"
                  + (f"; MoE (router ties make it noisy): not within at {len(noisy)} points" if noisy else ""))
    dist.barrier()
    dist.destroy_process_group()
    return 1 if failed else 0
