"""What the GPU benchmarks share: CUDA-graph timing, bandwidth probes, machine and versions.

:func:`time_graph` captures ``calls`` calls of a function in one CUDA graph (:func:`capture`)
and replays it; the time of one call is a replay's time / ``calls``. ``bench kernels`` and ``bench model``
both time this way, so their numbers compare. Everything here but :func:`machine` and
:func:`versions` needs a CUDA GPU.
"""

from __future__ import annotations

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
