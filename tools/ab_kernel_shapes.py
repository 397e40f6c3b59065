"""World size 1 A/B (a benchmark, not a test): kernel shapes for add + RMSNorm (bf16, the
weight in fp32 as the fused op's default) against Inductor and the product, in one run.

    PYTHONPATH=. python tools/ab_kernel_shapes.py 512x4096,1024x7168 [ROUNDS]   (one GPU)

Per shape, under CUDA graphs (bench_cuda.capture, up to 20 calls a graph), interleaved over
ROUNDS rounds (median of 7 replays each, then the median over rounds):
* Inductor's compile of fusion_passes.epilogue.add_rms_norm, static and max-autotune +
  coordinate descent;
* the public fused op (backend triton), at the launch this machine's table gives;
* experimental kernels, each checked against the static compile (residual bytes equal, norm
  elements differing under 1%): one pass with XB rows at once as one [XB, BLOCK] block, int32
  or int64 offsets, evict_first or not; the looped form (pieces of 1024 / 2048) that reads the
  stored sum back or recomputes it from the inputs (as Inductor's looped reduction does);
  each at 4, 8 and 16 warps;
* the move floor: the rows read and written, nothing computed.
Prints the best eight per shape and writes $OUT/exp_tile.json. It informed the tile kernel
(triton_kernels.epilogue_tile) and tune.TILES; results/README.md, session 11.
"""
import json, os, statistics, sys
import torch, triton, triton.language as tl
import torch._inductor.config as icfg
from fusion_passes import epilogue
from fusion_passes.cli import bench_cuda
from fusion_passes.cli import bench_kernels as bk
from fusion_passes.cli.bench_epilogue import fresh
from fusion_passes.backends import triton as tb
import torch.distributed as dist

EPS = 1e-6

@triton.jit
def k_one(x_ptr, r_ptr, w_ptr, ro_ptr, y_ptr, T, eps, H: tl.constexpr, BLOCK: tl.constexpr, XB: tl.constexpr,
          I64: tl.constexpr, EVICT: tl.constexpr, MOVE: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * XB + tl.arange(0, XB)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    mask = (cols < H) & (rows < T)
    if I64:
        off = rows.to(tl.int64) * H + cols
    else:
        off = rows * H + cols
    if EVICT:
        x = tl.load(x_ptr + off, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
        r = tl.load(r_ptr + off, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
        w = tl.load(w_ptr + cols, mask=cols < H, other=0.0, eviction_policy="evict_last").to(tl.float32)
    else:
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(r_ptr + off, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=cols < H, other=0.0).to(tl.float32)
    if MOVE:  # the bytes only: read both rows, write both outputs
        tl.store(ro_ptr + off, x.to(tl.bfloat16), mask=mask)
        tl.store(y_ptr + off, r.to(tl.bfloat16), mask=mask)
    else:
        s = (x + r).to(tl.bfloat16).to(tl.float32)
        tl.store(ro_ptr + off, s.to(tl.bfloat16), mask=mask)
        rstd = tl.math.rsqrt(tl.sum(s * s, axis=1)[:, None] / H + eps)
        y = (s * rstd) * w
        tl.store(y_ptr + off, y.to(tl.bfloat16), mask=mask)

@triton.jit
def _sum(x_ptr, r_ptr, off, mask, POLICY: tl.constexpr):
    """``x + r`` rounded to bf16, in fp32; both loads with the eviction hint POLICY."""
    x = tl.load(x_ptr + off, mask=mask, other=0.0, eviction_policy=POLICY).to(tl.float32)
    r = tl.load(r_ptr + off, mask=mask, other=0.0, eviction_policy=POLICY).to(tl.float32)
    return (x + r).to(tl.bfloat16).to(tl.float32)


@triton.jit
def k_loop(x_ptr, r_ptr, w_ptr, ro_ptr, y_ptr, T, eps, H: tl.constexpr, CHUNK: tl.constexpr, XB: tl.constexpr,
           RECOMPUTE: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * XB + tl.arange(0, XB)[:, None]
    rmask = rows < T
    acc = tl.zeros([XB, CHUNK], dtype=tl.float32)
    for c in tl.range(0, H, CHUNK):
        cols = c + tl.arange(0, CHUNK)[None, :]
        mask = (cols < H) & rmask
        off = rows * H + cols
        if RECOMPUTE:  # the second pass reads the inputs again: keep them in L2
            s = _sum(x_ptr, r_ptr, off, mask, "evict_last")
        else:
            s = _sum(x_ptr, r_ptr, off, mask, "evict_first")
        tl.store(ro_ptr + off, s.to(tl.bfloat16), mask=mask)
        acc += s * s
    rstd = tl.math.rsqrt(tl.sum(acc, axis=1)[:, None] / H + eps)
    for c in tl.range(0, H, CHUNK):
        cols = c + tl.arange(0, CHUNK)[None, :]
        mask = (cols < H) & rmask
        off = rows * H + cols
        if RECOMPUTE:
            s = _sum(x_ptr, r_ptr, off, mask, "evict_first")
        else:
            s = tl.load(ro_ptr + off, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
        w = tl.load(w_ptr + cols, mask=cols < H, other=0.0, eviction_policy="evict_last").to(tl.float32)
        y = (s * rstd) * w
        tl.store(y_ptr + off, y.to(tl.bfloat16), mask=mask)


def options(H):
    B = triton.next_power_of_2(H)
    for nw in (4, 8, 16):
        for xb in (1, 2, 4):
            for i64 in (True, False):
                for ev in (False, True):
                    if xb > 1 and i64:
                        continue
                    yield f"one xb{xb} w{nw}{' i64' if i64 else ''}{' ev' if ev else ''}", \
                        ("one", dict(H=H, BLOCK=B, XB=xb, I64=i64, EVICT=ev, MOVE=False, num_warps=nw))
        for ch in (1024, 2048):
            if ch >= H:
                continue
            for xb in (1, 2):
                for rc in (False, True):
                    yield f"loop c{ch} xb{xb} w{nw}{' recompute' if rc else ' stored'}", \
                        ("loop", dict(H=H, CHUNK=ch, XB=xb, RECOMPUTE=rc, num_warps=nw))
        yield f"move w{nw}", ("one", dict(H=H, BLOCK=B, XB=1, I64=False, EVICT=True, MOVE=True, num_warps=nw))


def main():
    rank, world = bench_cuda.init_nccl()
    group = "c10d:" + dist.group.WORLD.group_name
    shapes = [tuple(map(int, s.split("x"))) for s in sys.argv[1].split(",")]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    out = {"machine": bench_cuda.machine(), "versions": bench_cuda.versions(), "shapes": {}}
    torch._dynamo.config.cache_size_limit = 256
    for T, H in shapes:
        torch.manual_seed(T)
        x = torch.randn(T, H, device="cuda").bfloat16()
        r = torch.randn(T, H, device="cuda").bfloat16()
        w = (torch.rand(H, device="cuda") + 0.5).bfloat16()
        ro = torch.empty_like(x); y = torch.empty_like(x)
        fn = lambda x, r, w: epilogue.add_rms_norm(x, r, w, EPS)
        static = torch.compile(fresh(fn, f"s{T}_{H}"), dynamic=False)
        maxat = torch.compile(fresh(fn, f"m{T}_{H}"), dynamic=False,
                              options={"max_autotune": True, "coordinate_descent_tuning": True})
        ref_y, ref_r = static(x, r, w)
        maxat(x, r, w)
        fused = bk._fused_fn("add_rmsnorm", group)
        cands = {"inductor static": lambda: static(x, r, w), "inductor maxat": lambda: maxat(x, r, w),
                 "product (table)": lambda: fused(x, r, w, None)}
        for name, (kind, kw) in options(H):
            kw = dict(kw)
            nw = kw.pop("num_warps")
            if kind == "one":
                grid = (triton.cdiv(T, kw["XB"]),)
                f = lambda grid=grid, kw=kw, nw=nw: k_one[grid](x, r, w, ro, y, T, EPS, **kw, num_warps=nw)
            else:
                grid = (triton.cdiv(T, kw["XB"]),)
                f = lambda grid=grid, kw=kw, nw=nw: k_loop[grid](x, r, w, ro, y, T, EPS, **kw, num_warps=nw)
            try:
                f(); torch.cuda.synchronize()
                if "move" not in name:
                    dy = ((y.float() - ref_y.float()).abs() > 0).float().mean().item()
                    assert torch.equal(ro, ref_r), name
                    assert dy < 0.01, (name, dy)
                cands[name] = f
            except Exception as e:
                print("skip", name, type(e).__name__, str(e)[:200], flush=True)
        calls = max(1, min(20, int(4e8 // (4 * T * H * 2))))
        reps = {k: bench_cuda.capture(lambda f=f: f(), (), calls) for k, f in cands.items()}
        times = {k: [] for k in reps}
        for _ in range(rounds):
            for k, rep in reps.items():
                times[k].append(statistics.median(rep() for _ in range(7)))
        med = {k: statistics.median(v) for k, v in times.items()}
        base = min(med["inductor static"], med["inductor maxat"])
        best = sorted((v, k) for k, v in med.items() if not k.startswith("inductor") and not k.startswith("move"))
        mv = min(v for k, v in med.items() if k.startswith("move"))
        print(f"== {T}x{H}: inductor static {med['inductor static']:.2f} maxat {med['inductor maxat']:.2f} "
              f"product {med['product (table)']:.2f} ({base / med['product (table)']:.3f}x) move floor {mv:.2f}", flush=True)
        for v, k in best[:8]:
            print(f"   {k:34s} {v:7.2f} us  {base / v:.3f}x", flush=True)
        out["shapes"][f"{T}x{H}"] = {"median_us": med, "rounds": times}
        del reps
    json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), "exp_tile.json"), "w"), indent=1)
    dist.destroy_process_group()

main()
