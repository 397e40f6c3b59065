"""World size 1 A/B (a benchmark, not a test): the fused add + RMSNorm against Inductor,
alone (as ``tune --context alone`` times it), right after the GEMM that writes its input (as in a
model) and right after a copy that writes it (as ``tune`` times it by default, ``--context after-write``).

    PYTHONPATH=. python tools/ab_in_context.py 1x4096,128x7168,1024x7168 [ROUNDS]   (one GPU)

Per shape ``T x H`` (bf16 activations and weight), under CUDA graphs (bench_cuda.capture), over
ROUNDS interleaved rounds (median of 7 replays each, then the median over rounds), three contexts:
* alone: the epilogue back to back, 20 calls a graph, on the same input each call;
* after a GEMM: ``o = a @ W`` (cuBLAS, ``[T, H] x [H, H]``), then the epilogue on ``o``, 10 pairs
  a graph; "epilogue" = pair - the GEMM alone (timed the same way);
* after a copy: ``o`` written by the copy kernel that ``fusion-passes tune --context after-write``
  puts before each option (``tune.write_input``), then the epilogue, less the copy alone: whether
  the copy, cheap at every size, ranks the forms as the GEMM does.
Forms: Inductor static and max-autotune + coordinate descent; the public fused op (backend
triton) at the launch this machine's table gives ("table"), and forced to each of 4, 8 and 16
warps with and without ``evict_first``, 2 rows per program, 2 rows at once. (Its first form,
session 12, also launched the table's config with programmatic dependent launch, a forced-only
option of commit 028670b: results/README.md, "Session 12".) Every launch is checked
against Inductor's static compile: the residual output equal, bit for bit, and the norm within two
bf16 steps (the forms sum the variance in different orders, and the norm rounds twice).
Prints a table per shape and writes $OUT/ab_in_context.json. Run twice on 1x H100 in
session 13 (results/README.md, "Session 13").
"""
import json, os, statistics, sys
import torch
import torch.distributed as dist
from fusion_passes import epilogue
from fusion_passes.backends import triton as tb
from fusion_passes.cli import bench_cuda
from fusion_passes.cli import bench_kernels as bk
from fusion_passes.cli import tune
from fusion_passes.cli.bench_epilogue import fresh

EPS = 1e-6
FORCED = {"table": {}, "rows2 w8": {"rows": 2, "num_warps": 8},
          "tile2 w16 ev": {"tile": 2, "num_warps": 16, "evict": True},
          **{f"w{nw}{' ev' if ev else ''}": {"num_warps": nw, "evict": ev} for nw in (4, 8, 16) for ev in (False, True)}}


def forced(fn, force):
    """*fn* with ``tb.FORCE`` set to *force* while it runs (the launch is read at capture)."""
    def call(*a):
        tb.FORCE.update(force)
        try:
            return fn(*a)
        finally:
            tb.FORCE.clear()
    return call


def main():
    bench_cuda.init_nccl()
    group = "c10d:" + dist.group.WORLD.group_name
    shapes = [tuple(map(int, s.split("x"))) for s in sys.argv[1].split(",")]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    out = {"machine": bench_cuda.machine(), "versions": bench_cuda.versions(), "shapes": {}}
    torch._dynamo.config.cache_size_limit = 256
    fused = bk._fused_fn("add_rmsnorm", group)
    for T, H in shapes:
        torch.manual_seed(T)
        a = torch.randn(T, H, device="cuda").bfloat16()
        W = (torch.randn(H, H, device="cuda") / H ** 0.5).bfloat16()
        o = torch.empty(T, H, device="cuda", dtype=torch.bfloat16)
        r = torch.randn(T, H, device="cuda").bfloat16()
        w = (torch.rand(H, device="cuda") + 0.5).bfloat16()
        fn = lambda x, r, w: epilogue.add_rms_norm(x, r, w, EPS)
        static = torch.compile(fresh(fn, f"s{T}_{H}"), dynamic=False)
        maxat = torch.compile(fresh(fn, f"m{T}_{H}"), dynamic=False,
                              options={"max_autotune": True, "coordinate_descent_tuning": True})
        torch.mm(a, W, out=o)
        src = o.clone()  # what tune --context after-write's copy writes
        epis = {"inductor static": lambda x: static(x, r, w), "inductor maxat": lambda x: maxat(x, r, w)}
        want_norm, want_res = static(o, r, w)
        checks = {}
        for name, force in FORCED.items():
            f = forced(lambda x: fused(x, r, w, None), force)
            norm, res = f(o)
            torch.cuda.synchronize()
            step = 2 * 2 ** -7 * want_norm.float().abs() + 1e-6
            checks[name] = torch.equal(res, want_res) and bool(((norm.float() - want_norm.float()).abs() <= step).all())
            epis[name] = f
        reps = {}
        for name, e in epis.items():
            reps[("alone", name)] = bench_cuda.capture(lambda e=e: e(o), (), 20)
            reps[("gemm", name)] = bench_cuda.capture(lambda e=e: e(torch.mm(a, W, out=o)), (), 10)
            reps[("copy", name)] = bench_cuda.capture(lambda e=e: e(tune.write_input(o, src)), (), 10)
        reps[("gemm", "gemm alone")] = bench_cuda.capture(lambda: torch.mm(a, W, out=o), (), 10)
        reps[("copy", "copy alone")] = bench_cuda.capture(lambda: tune.write_input(o, src), (), 10)
        times = {k: [] for k in reps}
        for _ in range(rounds):
            for k, rep in reps.items():
                times[k].append(statistics.median(rep() for _ in range(7)))
        med = {k: statistics.median(v) for k, v in times.items()}
        g = med[("gemm", "gemm alone")]
        best_alone = min(med[("alone", "inductor static")], med[("alone", "inductor maxat")])
        best_pair = min(med[("gemm", "inductor static")], med[("gemm", "inductor maxat")]) - g
        c = med[("copy", "copy alone")]
        best_copy = min(med[("copy", "inductor static")], med[("copy", "inductor maxat")]) - c
        print(f"== {T}x{H}: GEMM alone {g:.2f} us, copy alone {c:.2f} us; launches within the check: "
              f"{'all' if all(checks.values()) else [k for k, v in checks.items() if not v]}", flush=True)
        for name in epis:
            al, pr, cp = med[("alone", name)], med[("gemm", name)] - g, med[("copy", name)] - c
            print(f"   {name:16s} alone {al:7.2f} us {best_alone / al:6.3f}x | after the GEMM {pr:7.2f} us "
                  f"{best_pair / pr:6.3f}x | after the copy {cp:7.2f} us {best_copy / cp:6.3f}x", flush=True)
        out["shapes"][f"{T}x{H}"] = {"checks": checks, "median_us": {" / ".join(k): v for k, v in med.items()},
                                     "rounds": {" / ".join(k): v for k, v in times.items()}}
        del reps
    json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), "ab_in_context.json"), "w"), indent=1)
    dist.destroy_process_group()


main()
