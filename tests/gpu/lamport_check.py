"""The wait-free one-shot and two-shot kernel's protocol at world sizes 2, 4 and 8 on ONE GPU.

``python tests/gpu/lamport_check.py [WS ...]`` starts WS processes on GPU 0. Each allocates
its three-slot buffer, arms it and shares it through ``torch.multiprocessing`` (CUDA IPC);
each builds a workspace over all of them (:func:`fusion_passes.backends.lamport.from_peer_buffers`)
and runs the kernel for many calls: eagerly with changing token counts, then captured in a
CUDA graph and replayed with new inputs copied into the captured buffers. The processes
time-share the GPU, so a call is slow (a kernel spins until its peers' kernels get a time
slice); only the protocol is under test here, not speed.

Every rank can recompute every rank's input (seeded by rank and call), so each checks its
outputs against :mod:`fusion_passes.epilogue` on the fp32 sum in rank order rounded to the
activation dtype (what the kernel computes): ``residual_out`` bit-exact, the norm output
within one ulp of the dtype (the fp32 sum of squares runs in another order than
``torch.mean``), per-token FP8 bit-exact against the epilogue applied to the kernel's own
norm output. Inputs contain exact ``-0.0`` values (the sentinel's bits) on purpose.
Prints one line per world size and ``N passed, M failed`` last.
"""

from __future__ import annotations

import os
import sys
import traceback

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

H = 4096
MAX_TOKENS = 64
EAGER_TOKENS = (1, 3, 16, 64, 7, 64, 1, 33)
GRAPH_TOKENS = 8
GRAPH_REPLAYS = 6
DTYPE = torch.bfloat16


def inputs(rank: int, call: int, tokens: int, device):
    g = torch.Generator(device="cpu").manual_seed(1000 * call + rank)
    x = torch.randn(tokens, H, generator=g).to(DTYPE)
    x[:, :: 97] = -0.0  # the sentinel's bits as real data: must be sent as +0.0
    gr = torch.Generator(device="cpu").manual_seed(777 + call)
    res = torch.randn(tokens, H, generator=gr).to(DTYPE)
    return x.to(device), res.to(device)


def launch(ws, x, res, w, eps, quant, outs, grid, two_shot=False):
    from fusion_passes.backends import lamport, lamport_kernels as L
    import triton.language as tl

    res_out, norm, q, scales = outs
    view, bits = lamport.sentinel(x.dtype)
    block = 1 << (H - 1).bit_length()
    L.lamport_kernel[(grid,)](
        x, res, w, res_out, norm, q, scales, scales, ws.peers, ws.state, x.shape[0], eps, 1, 0, ws.slot_elems,
        H=H, BLOCK=block, RANK=ws.rank, WS=ws.world_size, HAS_RES=True, RES_FP32=False, HAS_W=True, GEMMA=False,
        W_FP32=True, WRITE_NORM=True, QUANT=quant, HAS_UB=False, GROUP=128, UE8M0=False, FP8_MAX=448.0,
        MIN_SCALE=1.0 / (448.0 * 512.0), AMAX_EPS=0.0, SWIZZLE=False, SCALE_COLS=1,
        BITS=tl.int16 if view == torch.int16 else tl.int32, SENT=bits, TWO_SHOT=two_shot, num_warps=8)


def check(rank, world, call, tokens, outs, w, eps, quant, device):
    from fusion_passes import epilogue

    xs = [inputs(r, call, tokens, device)[0] for r in range(world)]
    res = inputs(rank, call, tokens, device)[1]
    acc = xs[0].float()
    for x in xs[1:]:
        acc = acc + x.float()
    reduced = acc.to(DTYPE)
    want_norm, want_res = epilogue.add_rms_norm(reduced, res, w, eps)
    res_out, norm, q, scales = outs
    if not torch.equal(res_out[:tokens], want_res):
        raise AssertionError(f"rank {rank} call {call}: residual_out differs "
                             f"({int((res_out[:tokens] != want_res).sum())} elements)")
    err = (norm[:tokens].float() - want_norm.float()).abs()
    if (err > 2.0**-7 * want_norm.float().abs() + 1e-6).any():
        raise AssertionError(f"rank {rank} call {call}: norm off by more than one ulp (max {err.max().item()})")
    if quant:
        wq, ws_ = epilogue.fp8_per_token(norm[:tokens])
        if not (torch.equal(q[:tokens].view(torch.uint8), wq.view(torch.uint8)) and torch.equal(scales[:tokens], ws_)):
            raise AssertionError(f"rank {rank} call {call}: FP8 differs from the epilogue on the kernel's norm")


def backend_phase(rank, world, ws, w, eps, outs, call, device):
    """The same workspace behind the REAL triton backend (its wait-free paths forced), over
    a gloo process group of the worker processes: TritonBackend.run on a FusedArgs."""
    import torch.distributed as dist

    from fusion_passes import arguments, variants
    from fusion_passes.backends import lamport
    from fusion_passes.backends.triton import PATH_ENV, TritonBackend

    dist.init_process_group("gloo", rank=rank, world_size=world)
    group = "c10d:" + dist.group.WORLD.group_name
    lamport.install(group, ws, device)
    backend = TritonBackend()
    for path in ("lamport", "twoshot"):
        os.environ[PATH_ENV] = path
        for tokens, variant in ((5, "add_rmsnorm"), (64, "add_rmsnorm_fp8_per_token"), (1, "add_rmsnorm")):
            x, res = inputs(rank, call, tokens, device)
            spec = variants.get(variant)
            bound = arguments.bind(spec, (x, res, w, eps, group), {"return_norm": True} if spec.kind else {})
            got = backend.run(variant, arguments.fused_args(spec, bound, arguments.resolve(spec, bound)))
            torch.cuda.synchronize()
            outs[0][:tokens].copy_(got.residual_out)
            outs[1][:tokens].copy_(got.norm_out)
            quant = 2 if spec.kind else 0
            if quant:
                outs[2][:tokens].copy_(got.q)
                outs[3][:tokens].copy_(got.scales)
            check(rank, world, call, tokens, outs, w, eps, quant, device)
            call += 1
    dist.destroy_process_group()
    return call


def worker(rank, world, queue, results, barrier):
    try:
        torch.cuda.set_device(0)
        device = torch.device("cuda", 0)
        from fusion_passes.backends import lamport

        buf = lamport.arm(torch.empty(lamport.buffer_elems(world, MAX_TOKENS, H), dtype=DTYPE, device=device))
        torch.cuda.synchronize()
        for _ in range(world - 1):
            queue[rank].put(buf)  # one copy per peer
        barrier.wait()
        bufs = [buf if r == rank else queue[r].get() for r in range(world)]
        ws = lamport.from_peer_buffers(bufs, rank, MAX_TOKENS, H)
        w = (torch.rand(H, generator=torch.Generator().manual_seed(5)) + 0.5).to(DTYPE).to(device)
        eps = 1e-6
        outs = (torch.empty(MAX_TOKENS, H, dtype=DTYPE, device=device),
                torch.empty(MAX_TOKENS, H, dtype=DTYPE, device=device),
                torch.empty(MAX_TOKENS, H, dtype=torch.float8_e4m3fn, device=device),
                torch.empty(MAX_TOKENS, 1, dtype=torch.float32, device=device))
        call = 0
        for tokens in EAGER_TOKENS:  # eager, changing sizes and paths: the re-arm sizes follow
            for quant, two_shot in ((0, False), (2, True), (0, True), (2, False)):
                x, res = inputs(rank, call, tokens, device)
                sl = tuple(o[:tokens] for o in outs)
                launch(ws, x, res, w, eps, quant, sl, min(tokens, 4), two_shot)
                torch.cuda.synchronize()
                check(rank, world, call, tokens, outs, w, eps, quant, device)
                call += 1
        x, res = (t.clone() for t in inputs(rank, call, GRAPH_TOKENS, device))
        sl = tuple(o[:GRAPH_TOKENS] for o in outs)
        graph = torch.cuda.CUDAGraph()
        barrier.wait()
        with torch.cuda.graph(graph):  # capture launches nothing: no peer waits on it
            launch(ws, x, res, w, eps, 2, sl, 4, False)
            launch(ws, x, res, w, eps, 2, sl, 4, True)
        barrier.wait()
        for _ in range(GRAPH_REPLAYS):
            nx, nres = inputs(rank, call, GRAPH_TOKENS, device)
            x.copy_(nx)
            res.copy_(nres)
            graph.replay()
            torch.cuda.synchronize()
            check(rank, world, call, GRAPH_TOKENS, outs, w, eps, 2, device)
            call += 1
        call = backend_phase(rank, world, ws, w, eps, outs, call, device)
        results.put((rank, None, call))
    except Exception:  # noqa: BLE001 - reported by the parent
        results.put((rank, traceback.format_exc(), 0))


def spawn(world: int, port: int, worker, *args) -> list[tuple]:
    """*world* ranks of ``worker(rank, world, queues, results, barrier, *args)`` as spawned
    processes (the IPC harness on one GPU); the tuple each put on ``results``, in arrival
    order."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    ctx = mp.get_context("spawn")
    queues = [ctx.Queue() for _ in range(world)]
    results, barrier = ctx.Queue(), ctx.Barrier(world)
    procs = [ctx.Process(target=worker, args=(r, world, queues, results, barrier, *args)) for r in range(world)]
    for p in procs:
        p.start()
    got = [results.get(timeout=600) for _ in range(world)]
    for p in procs:
        p.join(timeout=60)
    return got


def run(world: int) -> str | None:
    errors = [f"rank {rank}: {err}" for rank, err, _calls in spawn(world, 29600 + world, worker) if err]
    return "\n".join(errors) if errors else None


def run_worlds(worlds, run, ok) -> int:
    """Run ``run(world)`` (an error text or None) for each world size, one line each
    (``ok(world)`` on success), and the closing ``N passed, N failed`` line; the exit code."""
    passed = failed = 0
    for world in worlds:
        err = run(world)
        if err:
            failed += 1
            print(f"world size {world}: FAILED\n{err}", flush=True)
        else:
            passed += 1
            print(f"world size {world}: {ok(world)}", flush=True)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


def main(argv) -> int:
    return run_worlds([int(a) for a in argv] or [2, 4, 8], run, lambda world: (
        f"{len(EAGER_TOKENS) * 4} eager calls (one-shot and two-shot) + {GRAPH_REPLAYS} replays of a graph of "
        "both + 6 calls through TritonBackend.run, on one GPU: every rank bit-exact (norm within 1 ulp)"))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
