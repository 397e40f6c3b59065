"""What the GPU benchmarks share: CUDA-graph timing, bandwidth probes, machine and versions.

:func:`time_graph` captures ``calls`` calls of a function in one CUDA graph (:func:`capture`)
and replays it; the time of one call is a replay's time / ``calls``. ``bench kernels`` and ``bench model``
both time this way, so their numbers compare. Everything here but :func:`machine` and
:func:`versions` needs a CUDA GPU.
"""

from __future__ import annotations

import functools
import os
import platform
import statistics
import sys


def time_graph(fn, args=(), calls: int = 1, replays: int = 5) -> float:
    """Median time (us) of one call of ``fn(*args)``, from a CUDA graph holding *calls* calls
    (:func:`capture`), over *replays* timed replays."""
    replay = capture(fn, args, calls)
    return statistics.median(replay() for _ in range(replays))


def capture(fn, args=(), calls: int = 1):
    """``fn(*args)`` captured *calls* times in one CUDA graph; returns ``replay()``, which
    replays the graph once and returns the time (us) of one call.

    Two eager warm-up calls on a side stream come first (Triton and Inductor compile then,
    collectives register their buffers), then the capture and one untimed replay. The
    returned function holds the graph, *fn* and *args*, so it can be replayed later, after
    other graphs (``bench model --rounds``). The kernels stay loaded while whoever built
    *fn* keeps them: Inductor's modules stay in its code cache, Triton's jitted kernels in
    their function's cache.
    """
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn(*args)
    graph.replay()
    torch.cuda.synchronize()

    def replay() -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1000.0 / calls

    replay.keep = (graph, fn, args)
    return replay


def launch_floor_us(calls: int = 20, replays: int = 11) -> float:
    """Time (us) of the least a kernel can do under this harness: one Triton program storing
    one value, *calls* of them in one graph (:func:`time_graph`). No fused call measured the
    same way can take less, so a speedup target over an unfused kernel of ``u`` us is out of
    reach where ``u / target`` is below it."""
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def _one_store(ptr):
        tl.store(ptr, 0.0)

    out = torch.empty(1, device="cuda")
    return time_graph(lambda t: _one_store[(1,)](t), (out,), calls, replays)


MOVE_OUT = {"add_rmsnorm": None, "add_rmsnorm_fp8_static": "float8_e4m3fn",
            "add_rmsnorm_fp8_per_token": "float8_e4m3fn", "add_rmsnorm_fp8_per_group": "float8_e4m3fn"}
"""The variants :func:`move_floor_us` times, and the dtype of their second output (None: the
activation dtype, the norm output); the FP4 variants' packed codes are not modelled."""


@functools.cache
def move_kernel():
    """The Triton kernel :func:`move_floor_us` times: program ``i`` reads row ``i`` of ``x``
    and of ``r`` and writes ``x`` to ``a`` and ``r``, converted to ``b``'s dtype, to ``b``.
    Nothing is computed: the bytes of a world-size-1 add + RMSNorm (+ FP8) call, moved."""
    import triton
    import triton.language as tl

    @triton.jit
    def _move_rows(x_ptr, r_ptr, a_ptr, b_ptr, H: tl.constexpr, BLOCK: tl.constexpr):
        off = tl.cast(tl.program_id(0), tl.int64) * H
        cols = tl.arange(0, BLOCK)
        mask = cols < H
        x = tl.load(x_ptr + off + cols, mask=mask)  # both loads before either store, as the fused kernel
        r = tl.load(r_ptr + off + cols, mask=mask)  # orders them (a store first may hold the second load back)
        tl.store(a_ptr + off + cols, x, mask=mask)
        tl.store(b_ptr + off + cols, r.to(tl.float32).to(b_ptr.dtype.element_ty), mask=mask)

    return _move_rows


def move_rows(x, r, out_dtype=None, num_warps: int = 4):
    """One launch of :func:`move_kernel` over ``[T, H]`` rows: ``(a, b)``, ``a`` the bytes of
    ``x`` and ``b`` ``r`` in *out_dtype* (None: ``r``'s)."""
    import torch
    import triton

    a = torch.empty_like(x)
    b = torch.empty(r.shape, dtype=out_dtype or r.dtype, device=r.device)
    if x.shape[0]:
        move_kernel()[(x.shape[0],)](x, r, a, b, x.shape[1], triton.next_power_of_2(x.shape[1]), num_warps=num_warps)
    return a, b


def move_floor_us(variant: str, tokens: int, hidden: int, dtype, calls: int, replays: int) -> float | None:
    """Time (us) of moving the bytes *variant*'s world-size-1 call moves, and nothing else:
    :func:`move_rows` over ``[tokens, hidden]`` rows of *dtype* (the input and the residual
    read, the residual out and the norm output or the FP8 codes written; the weight and the
    scales left out), the best of 4, 8 and 16 warps, timed as every option of ``tune``
    (:func:`time_graph`). A fused call that reads and writes these rows once takes about this
    at least, so a speedup target over an unfused call of ``u`` us is out of reach at this
    bucket where ``u / target`` is below it. None for a variant it does not model (:data:`MOVE_OUT`)."""
    import torch

    if variant not in MOVE_OUT:
        return None
    out = MOVE_OUT[variant] and getattr(torch, MOVE_OUT[variant])
    x = torch.randn(tokens, hidden, device="cuda").to(dtype)
    r = torch.randn(tokens, hidden, device="cuda").to(dtype)
    best = min(time_graph(lambda a, b, nw=nw: move_rows(a, b, out, nw), (x, r), calls, replays) for nw in (4, 8, 16))
    del x, r
    return best


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth, bytes read + written per second (1 GiB source)."""
    import torch

    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    a.random_()
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    seconds = _copy_seconds(b, a, 10)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n / seconds


def peer_read_bandwidth(pg_name: str, rank: int, world: int) -> float:
    """Bytes per second this rank reads from a peer's symmetric buffer (all ranks at once)."""
    import torch
    import torch.distributed as dist
    import torch.distributed._symmetric_memory as symm_mem

    n = 256 << 20
    buf = symm_mem.empty(n, dtype=torch.uint8, device="cuda")
    buf.random_()
    handle = symm_mem.rendezvous(buf, pg_name)
    remote = handle.get_buffer((rank + 1) % world, (n,), torch.uint8)
    local = torch.empty(n, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    dist.barrier()
    seconds = _copy_seconds(local, remote, 13, skip=3)
    dist.barrier()
    return n / seconds


def _copy_seconds(dst, src, runs: int, skip: int = 0) -> float:
    """Median seconds of ``dst.copy_(src)`` over *runs* copies timed with CUDA events, the
    first *skip* timed but dropped."""
    import torch

    times = []
    for i in range(runs):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        dst.copy_(src)
        e.record()
        e.synchronize()
        if i >= skip:
            times.append(s.elapsed_time(e) / 1000.0)
    return statistics.median(times)


def init_nccl(port: str = "29541") -> tuple[int, int]:
    """One NCCL process group over this process's GPU (``torchrun`` sets RANK / WORLD_SIZE;
    without it: a one-rank group). Multicast stays off. Returns ``(rank, world size)``."""
    import torch
    import torch.distributed as dist

    os.environ["NCCL_NVLS_ENABLE"] = "0"
    os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", port)
    dist.init_process_group("nccl", rank=rank, world_size=world,
                            device_id=torch.device("cuda", torch.cuda.current_device()))
    return rank, world


def machine() -> dict:
    """The machine: GPU name and count (when there is one), host, CPU count, CUDA version."""
    import torch

    info = {"host": platform.node(), "cpus": os.cpu_count(), "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(), gpus=torch.cuda.device_count())
    return info


def versions() -> dict:
    """Versions of what ran: python, torch, triton, transformers (when importable) and a
    hash of fusion-passes' own sources (``fusion_pass.source_hash``)."""
    import torch

    from fusion_passes.fusion_pass import source_hash

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "fusion_passes_sources": source_hash()[:16]}
    for name in ("triton", "transformers"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out
