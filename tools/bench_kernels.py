"""``fusion-passes bench kernels``: the fused kernel vs. the unfused chain, under CUDA graphs.

For every variant, hidden size and token count (powers of two, 1..16384) it times:

* ``fused``: the triton backend's one kernel;
* ``unfused``: NCCL all-reduce (nothing at world size 1) + the epilogue
  (:mod:`fusion_passes.epilogue`, add + RMSNorm (+ quant)) compiled by Inductor;
* ``symm``: (world size > 1) torch's ``symm_mem.one_shot_all_reduce`` (input copied into
  its symmetric buffer) + the same compiled epilogue.

Each is captured ``K`` times in one CUDA graph and the graph replayed; the time per call
is the median replay time / K. ``floor`` is the bytes this rank must move through its
own memory (inputs read once, outputs written once) divided by the device-to-device copy
bandwidth measured in the same run, or, at world size > 1 when larger, the bytes an
all-reduce must receive from peers (2 (ws-1)/ws of the input) divided by the peer-read
bandwidth measured in the same run; ``of_floor`` = floor / fused time.

Run at world size 1 with ``fusion-passes bench kernels`` and at TP N with
``torchrun --nproc_per_node=N -m fusion_passes.tools.cli bench kernels``. Writes JSON
(machine, versions, every row) with ``--out``. Multicast stays off
(``NCCL_NVLS_ENABLE=0``, ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys

VARIANTS = ("add_rmsnorm", "add_rmsnorm_fp8_static", "add_rmsnorm_fp8_per_token", "add_rmsnorm_fp8_per_group",
            "add_rmsnorm_nvfp4", "add_rmsnorm_mxfp4")
# NVFP4's global scale: 448 * 6 / 5, so a norm output of absmax ~5 spans the e4m3 scales
NVFP4_GLOBAL_SCALE = 448.0 * 6 / 5
DEFAULT_TOKENS = tuple(2**i for i in range(15))  # 1 .. 16384
DEFAULT_HIDDEN = (4096, 7168, 8192)


def add_arguments(parser) -> None:
    parser.add_argument("--hidden", type=int, nargs="+", default=list(DEFAULT_HIDDEN))
    parser.add_argument("--tokens", type=int, nargs="+", default=list(DEFAULT_TOKENS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--quant-hidden", type=int, nargs="+", default=[7168],
                        help="hidden sizes for the quant variants (add_rmsnorm uses --hidden)")
    parser.add_argument("--replays", type=int, default=5, help="timed graph replays per point (median)")
    parser.add_argument("--out", help="write the JSON here (rank 0)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")


def _epilogue_fn(variant: str, eps: float):
    """The unfused chain after the all-reduce: add + RMSNorm, then the reference quant."""
    from fusion_passes import epilogue
    from fusion_passes.backends.reference import quantize

    params = {"add_rmsnorm_fp8_static": None, "add_rmsnorm_fp8_per_token": (None,),
              "add_rmsnorm_fp8_per_group": (128, False, False), "add_rmsnorm_nvfp4": "swizzled",
              "add_rmsnorm_mxfp4": ()}

    def fn(x, res, w, scale):
        y, r = epilogue.add_rms_norm(x, res, w, eps)
        if variant == "add_rmsnorm":
            return y, r
        p = params[variant]
        p = (scale,) if p is None else (scale, True) if p == "swizzled" else p
        return quantize(variant, y, *p), r

    return fn


def _fused_fn(variant, group, eps):
    from fusion_passes.backends.triton import TritonBackend

    tb = TritonBackend()
    extra = {
        "add_rmsnorm": (),
        "add_rmsnorm_fp8_static": None,  # scale added per call
        "add_rmsnorm_fp8_per_token": (None,),
        "add_rmsnorm_fp8_per_group": (128, False, False),
        "add_rmsnorm_nvfp4": "swizzled",  # global scale added per call, swizzled scales
        "add_rmsnorm_mxfp4": (),
    }[variant]

    def run(x, res, w, scale):
        args = (scale,) if extra is None else (scale, True) if extra == "swizzled" else extra
        return tb.run(variant, x, res, w, eps, group, False, True, *args)

    return run


def _bytes_moved(variant, tokens, hidden, itemsize):
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
              "add_rmsnorm_fp8_per_group": tokens * (hidden // 128) * 4}[variant]
    return read + n * itemsize + n + scales  # residual_out, q, scales


def _time_graph(torch, fn, args, calls, replays):
    """Median time of one call (us), from a CUDA graph holding *calls* calls."""
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
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / calls)
    del graph
    return statistics.median(times)


def _copy_bandwidth(torch) -> float:
    """Device-to-device copy bandwidth, bytes read + written per second (1 GiB source)."""
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    a.random_()
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1000.0)
    return 2 * n / statistics.median(times)


def _peer_read_bandwidth(torch, dist, symm_mem, pg_name, rank, world) -> float:
    """Bytes per second this rank reads from a peer's symmetric buffer (all ranks at once)."""
    n = 256 << 20
    buf = symm_mem.empty(n, dtype=torch.uint8, device="cuda")
    buf.random_()
    handle = symm_mem.rendezvous(buf, pg_name)
    remote = handle.get_buffer((rank + 1) % world, (n,), torch.uint8)
    local = torch.empty(n, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    dist.barrier()
    times = []
    for i in range(13):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        local.copy_(remote)
        e.record()
        e.synchronize()
        if i >= 3:
            times.append(s.elapsed_time(e) / 1000.0)
    dist.barrier()
    return n / statistics.median(times)


def run(args) -> int:
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
    import torch
    import torch.distributed as dist
    import triton

    from fusion_passes import groups

    if not torch.cuda.is_available() or torch.version.hip is not None:
        print("fusion-passes bench kernels: needs an NVIDIA CUDA GPU (the triton backend's kernels)",
              file=sys.stderr)
        return 2
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29541")
    dist.init_process_group("nccl", rank=rank, world_size=world,
                            device_id=torch.device("cuda", torch.cuda.current_device()))
    pg_name = dist.group.WORLD.group_name
    group = "c10d:" + pg_name
    eps = 1e-6
    dtype = torch.bfloat16
    itemsize = 2
    bw = _copy_bandwidth(torch)
    symm_mem = None
    p2p = None
    if world > 1:
        import torch.distributed._symmetric_memory as symm_mem

        p2p = _peer_read_bandwidth(torch, dist, symm_mem, pg_name, rank, world)

    rows = []
    for variant in args.variants:
        hiddens = args.hidden if variant == "add_rmsnorm" else args.quant_hidden
        epi = torch.compile(_epilogue_fn(variant, eps), dynamic=True)
        fused = _fused_fn(variant, group, eps)
        for hidden in hiddens:
            w = (torch.rand(hidden, device="cuda") + 0.5).to(dtype)
            scale = torch.tensor([NVFP4_GLOBAL_SCALE if variant == "add_rmsnorm_nvfp4" else 0.02], device="cuda")
            for tokens in args.tokens:
                torch.manual_seed(rank * 7919 + tokens)
                x = torch.randn(tokens, hidden, device="cuda").to(dtype)
                torch.manual_seed(tokens)
                res = torch.randn(tokens, hidden, device="cuda").to(dtype)
                nbytes = _bytes_moved(variant, tokens, hidden, itemsize)
                calls = max(1, min(20, int(4e8 // max(nbytes, 1))))

                def unfused(x, res, w, scale):
                    y = groups.all_reduce(x, group) if world > 1 else x
                    return epi(y, res, w, scale)

                point = {"variant": variant, "hidden": hidden, "tokens": tokens}
                point["fused_us"] = _time_graph(torch, fused, (x, res, w, scale), calls, args.replays)
                point["unfused_us"] = _time_graph(torch, unfused, (x, res, w, scale), calls, args.replays)
                if symm_mem is not None:
                    buf = symm_mem.empty((tokens, hidden), dtype=dtype, device="cuda")
                    symm_mem.rendezvous(buf, pg_name)

                    def symm(x, res, w, scale, buf=buf):
                        buf.copy_(x)
                        y = torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", pg_name)
                        return epi(y, res, w, scale)

                    point["symm_us"] = _time_graph(torch, symm, (x, res, w, scale), calls, args.replays)
                point["floor_us"] = nbytes / bw * 1e6
                if p2p is not None:  # an all-reduce must receive 2 (ws-1)/ws of the input over the links
                    point["floor_us"] = max(point["floor_us"],
                                            2 * (world - 1) / world * tokens * hidden * itemsize / p2p * 1e6)
                point["vs_unfused"] = point["unfused_us"] / point["fused_us"]
                point["of_floor"] = point["floor_us"] / point["fused_us"]
                rows.append(point)
                if rank == 0 and not args.json:
                    print(_fmt(point), flush=True)
                del x, res
                torch.cuda.empty_cache()

    result = {
        "command": "fusion-passes bench kernels " + " ".join(sys.argv[3:] if len(sys.argv) > 3 else []),
        "world_size": world,
        "machine": {"gpu": torch.cuda.get_device_name(), "gpus": torch.cuda.device_count(),
                    "host": platform.node(), "cuda": torch.version.cuda},
        "torch": torch.__version__,
        "triton": triton.__version__,
        "dtype": str(dtype),
        "copy_bandwidth_GBps": bw / 1e9,
        "peer_read_bandwidth_GBps": None if p2p is None else p2p / 1e9,
        "method": ("CUDA graph of K calls, median of replays / K; floor = max(local bytes / copy bandwidth, "
                   "2 (ws-1)/ws input bytes / peer-read bandwidth)"),
        "rows": rows,
    }
    if rank == 0:
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
        if args.json:
            print(json.dumps(result, indent=1))
        else:
            peer = "" if p2p is None else f"; peer read {p2p / 1e9:.0f} GB/s"
            print(f"copy bandwidth {bw / 1e9:.0f} GB/s{peer}; world size {world}; {torch.cuda.get_device_name()}")
    dist.barrier()
    dist.destroy_process_group()
    return 0


def _fmt(p) -> str:
    symm = f" symm {p['symm_us']:9.1f}" if "symm_us" in p else ""
    return (f"{p['variant']:28s} H={p['hidden']:5d} T={p['tokens']:5d}  fused {p['fused_us']:9.1f} us"
            f"  unfused {p['unfused_us']:9.1f}{symm}  x{p['vs_unfused']:5.2f}  floor {p['of_floor']:5.0%}")
