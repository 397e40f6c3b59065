"""World size 1 A/B (a benchmark, not a test; ``PYTHONPATH=. python tools/ab_ws1_inductor.py`` on one GPU): our fused add+RMSNorm(+per-token FP8) kernel launch shapes vs Inductor's epilogue.

Times under CUDA graphs (K calls per graph, median replay / K):
* inductor static (dynamic=False, a compile per token count), mark_dynamic(x, 0), dynamic=True;
* the current kernel (triton_kernels.fused_allreduce_add_rmsnorm_kernel, WS=1) at several num_warps;
* an experimental kernel with ROWS rows per program (2-D block) at several num_warps.
Writes $OUT/ab_ws1.json and prints a table. Also dumps Inductor's kernel source for two shapes.
"""

import json
import os
import sys
import time

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.getcwd())
from fusion_passes import epilogue  # noqa: E402
from fusion_passes.backends import triton_kernels as K  # noqa: E402
from fusion_passes.cli.bench_cuda import time_graph  # noqa: E402

OUT = os.environ.get("OUT", "/tmp")
T0 = time.time()
EPS = 1e-6
BF16 = torch.bfloat16


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


@triton.jit
def rows_kernel(in_ptr, res_ptr, w_ptr, res_out_ptr, norm_ptr, q_ptr, scale_ptr, T, eps,
                H: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, QUANT: tl.constexpr,
                FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    cmask = cols < H
    mask = (rows < T)[:, None] & cmask[None, :]
    off = rows[:, None].to(tl.int64) * H + cols[None, :]
    act = in_ptr.dtype.element_ty
    x = tl.load(in_ptr + off, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(res_ptr + off, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    s = (x + r).to(act).to(tl.float32)
    tl.store(res_out_ptr + off, s.to(act), mask=mask)
    rstd = tl.math.rsqrt(tl.sum(s * s, axis=1) / H + eps)
    y = (s * rstd[:, None] * w[None, :]).to(act).to(tl.float32)
    if QUANT == 0:
        tl.store(norm_ptr + off, y.to(act), mask=mask)
    else:
        amax = tl.max(tl.abs(y), axis=1)
        scale = tl.maximum(amax / FP8_MAX, MIN_SCALE)
        q = tl.clamp(y * tl.math.div_rn(1.0, scale)[:, None], -FP8_MAX, FP8_MAX)
        tl.store(q_ptr + off, q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(scale_ptr + rows, scale, mask=rows < T)


def np2(n):
    return 1 << max(0, (n - 1).bit_length())


def epi_fn(quant, tag="x"):
    """A fresh code object per call site tag: Dynamo caches per code object, so the
    static / mark_dynamic / dynamic=True compiles must not share one."""
    src = (f"def epi_{tag}(x, res, w):\n"
           f"    y, r = epilogue.add_rms_norm(x, res, w, EPS)\n"
           f"    return {'(epilogue.fp8_per_token(y), r)' if quant else '(y, r)'}\n")
    env = {"epilogue": epilogue, "EPS": EPS}
    exec(compile(src, f"<epi_{tag}_{int(quant)}>", "exec"), env)
    return env[f"epi_{tag}"]


def make_ours(quant, H, T, nw, dev):
    x0 = torch.empty(T, H, dtype=BF16, device=dev)
    res_out = torch.empty_like(x0)
    norm = torch.empty_like(x0)
    q = torch.empty(T, H, dtype=torch.float8_e4m3fn, device=dev)
    sc = torch.empty(T, 1, dtype=torch.float32, device=dev)

    def cur(x, res, w):
        K.fused_allreduce_add_rmsnorm_kernel[(T,)](
            x, res, w, res_out, norm, q, sc if quant else x, x, 0, 0, T, EPS, 1 if quant else 0, 0,
            H=H, BLOCK=np2(H), RANK=0, WS=1, HAS_RES=True, RES_FP32=False, HAS_W=True, GEMMA=False, W_FP32=True,
            WRITE_NORM=not quant, QUANT=2 if quant else 0, HAS_UB=False, GROUP=128, UE8M0=False,
            FP8_MAX=448.0, AMAX_EPS=0.0, MIN_SCALE=1.0 / (448.0 * 512.0), num_warps=nw)

    def rows(R):
        def f(x, res, w):
            rows_kernel[(triton.cdiv(T, R),)](x, res, w, res_out, norm, q, sc, T, EPS, H=H, BLOCK=np2(H), ROWS=R,
                                              QUANT=2 if quant else 0, FP8_MAX=448.0,
                                              MIN_SCALE=1.0 / (448.0 * 512.0), num_warps=nw)
        return f
    return cur, rows, (res_out, norm, q, sc)


def _sanity(dev):
    """The experimental kernel computes the epilogue: log its largest differences."""
    for quant in (False, True):
        T, H = 37, 7168
        x = torch.randn(T, H, device=dev).to(BF16)
        res = torch.randn(T, H, device=dev).to(BF16)
        w = (torch.rand(H, device=dev) + 0.5).to(BF16)
        for R, nw in ((1, 16), (2, 8), (4, 16)):
            cur, rows, (ro, no, qo, so) = make_ours(quant, H, T, nw, dev)
            rows(R)(x, res, w)
            torch.cuda.synchronize()
            y, r = epilogue.add_rms_norm(x, res, w, EPS)
            d_r = (ro.float() - r.float()).abs().max().item()
            if quant:
                qq, ss = epilogue.fp8_per_token(y)
                d = (qo.float() * so - qq.float() * ss).abs().max().item()
            else:
                d = (no.float() - y.float()).abs().max().item()
            log(f"sanity quant={quant} R={R} nw={nw}: max|res diff| {d_r:.3g}, max|out diff| {d:.3g}")


def _dump_inductor(dev):
    """Inductor's generated code for two shapes, into $OUT."""
    from torch._inductor.utils import run_and_get_code
    for quant, T in ((False, 32), (False, 1024), (True, 32)):
        torch._dynamo.reset()
        H = 7168
        x = torch.randn(T, H, device=dev).to(BF16)
        res = torch.randn(T, H, device=dev).to(BF16)
        w = (torch.rand(H, device=dev) + 0.5).to(BF16)
        _, code = run_and_get_code(torch.compile(epi_fn(quant, f'dump{T}'), dynamic=False), x, res, w)
        with open(os.path.join(OUT, f"inductor_{'fp8' if quant else 'none'}_{T}.py"), "w") as f:
            f.write("\n\n".join(code))
    torch._dynamo.reset()


def _row(quant, H, T, w, compiled, dev):
    """One (quant, hidden, tokens) point: Inductor's three compiles and our launch shapes."""
    static, md, dyn = compiled
    x = torch.randn(T, H, device=dev).to(BF16)
    res = torch.randn(T, H, device=dev).to(BF16)
    xm, rm = x.clone(), res.clone()
    if T > 1:
        torch._dynamo.mark_dynamic(xm, 0)
        torch._dynamo.mark_dynamic(rm, 0)
    calls = max(1, min(20, int(4e8 // (T * H * 8))))
    row = {"quant": "fp8_per_token" if quant else "none", "hidden": H, "tokens": T}
    for name, f, a in (("inductor_static", static, (x, res, w)), ("inductor_mark_dynamic", md, (xm, rm, w)),
                       ("inductor_dynamic_true", dyn, (x, res, w))):
        try:
            row[name] = time_graph(f, a, calls)
        except Exception as e:  # noqa: BLE001
            row[name] = float("inf")
            log(f"{name} failed at T={T}: {type(e).__name__}: {str(e)[:200]}")
    for nw in (4, 8, 16):
        cur, rows, _ = make_ours(quant, H, T, nw, dev)
        row[f"cur_w{nw}"] = time_graph(cur, (x, res, w), calls)
    for R in (1, 2, 4):
        for nw in (2, 4, 8, 16):
            if np2(H) * R // (32 * nw) > 128 or np2(H) * R // (32 * nw) < 4:
                continue
            _, rows, _ = make_ours(quant, H, T, nw, dev)
            row[f"rows{R}_w{nw}"] = time_graph(rows(R), (x, res, w), calls)
    ours = {k: v for k, v in row.items() if k.startswith(("cur_", "rows"))}
    best = min(ours, key=ours.get)
    row["best_ours"], row["best_ours_us"] = best, ours[best]
    base = min(row["inductor_static"], row["inductor_mark_dynamic"])
    row["speedup_best"] = base / ours[best]
    row["speedup_cur16"] = base / row["cur_w16"]
    log(f"{row['quant']:14s} H={H} T={T:5d} static {row['inductor_static']:7.2f} md "
        f"{row['inductor_mark_dynamic']:7.2f} dynT {row['inductor_dynamic_true']:7.2f} | cur16 "
        f"{row['cur_w16']:7.2f} best {best} {ours[best]:7.2f}  x{row['speedup_best']:.2f} (cur x{row['speedup_cur16']:.2f})")
    return row


def main():
    dev = torch.device("cuda", 0)
    torch._dynamo.config.cache_size_limit = 256
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 256
    tokens = [int(t) for t in os.environ.get("AB_TOKENS", "1 2 4 8 16 32 64 128 256 512 1024 2048 4096 8192 16384").split()]
    hiddens = [int(h) for h in os.environ.get("AB_HIDDEN", "7168 4096").split()]
    quants = [q == "fp8" for q in os.environ.get("AB_QUANT", "none fp8").split()]
    rows_out = []
    _sanity(dev)
    _dump_inductor(dev)
    budget = float(os.environ.get("AB_BUDGET_S", "480"))
    for quant in quants:
        compiled = (torch.compile(epi_fn(quant, "static"), dynamic=False), torch.compile(epi_fn(quant, "md")),
                    torch.compile(epi_fn(quant, "dyn"), dynamic=True))
        for H in hiddens:
            w = (torch.rand(H, device=dev) + 0.5).to(BF16)
            for T in tokens:
                if time.time() - T0 > budget:
                    log("budget reached, stopping")
                    break
                rows_out.append(_row(quant, H, T, w, compiled, dev))
                with open(os.path.join(OUT, "ab_ws1.json"), "w") as f:
                    json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                               "triton": triton.__version__, "rows": rows_out}, f, indent=1)
    log("done")


if __name__ == "__main__":
    main()
