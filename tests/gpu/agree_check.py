"""The collective protocol of the measured table at world sizes 2 and 4, as processes on ONE GPU.

``python tests/gpu/agree_check.py [WS ...]`` starts WS processes on GPU 0 over a gloo group
(CUDA IPC for the wait-free paths' buffers, as tests/gpu/lamport_check.py). Each rank writes
its own measured-table file keyed by the real GPU and versions, then:

* same table on every rank: the group agrees at the first eager call; every rank picks the
  same per-bucket path and each call through the REAL triton backend (``TritonBackend.run``)
  is checked: the wait-free one-shot and two-shot buckets against the epilogue on the fp32
  sum in rank order, the ``unfused`` bucket (the group's own all-reduce, then our epilogue
  kernel at world size 1) against the epilogue on that all-reduce's result;
* different tables (rank 0's differs): every rank falls back to the shipped table, with one
  warning, and no rank uses a measured entry.

The ranks' decisions are gathered and compared. Timings here mean nothing (the processes
time-share one GPU) and are not printed. Prints one line per world size, then ``N passed, M failed``.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.dirname(__file__))

import lamport_check as lc  # noqa: E402

# bucket -> (pick, path); token counts called and the bucket serving each
BUCKETS = ((4, "fused", "lamport"), (16, "fused", "twoshot"), (64, "unfused", "lamport"))
CALLS = ((3, "lamport"), (4, "lamport"), (9, "twoshot"), (16, "twoshot"), (40, "unfused"), (64, "unfused"))


def table(world, group, bump=0.0):
    from fusion_passes import groups
    from fusion_passes.backends import measured

    # processes sharing one GPU count as several nodes (more ranks than GPUs): keyed as such
    return {"key": measured.machine_key(world, groups.is_single_node(group)), "command": "tests/gpu/agree_check.py",
            "entries": [{"variant": v, "hidden": lc.H, "dtype": str(lc.DTYPE).removeprefix("torch."), "tokens": t, "pick": p, "path": path, "num_warps": 8,
                         "fused_us": 2.0 + bump, "unfused_us": 3.0}
                        for v in ("add_rmsnorm", "add_rmsnorm_fp8_per_token") for t, p, path in BUCKETS]}


def run_calls(rank, world, group, w, device, call):
    import torch.distributed as dist

    from fusion_passes import arguments, epilogue, variants
    from fusion_passes.backends import triton as tb

    backend = tb.TritonBackend()
    eps = 1e-6
    seen = []
    for tokens, want_path in CALLS:
        for variant in ("add_rmsnorm", "add_rmsnorm_fp8_per_token"):
            x, res = lc.inputs(rank, call, tokens, device)
            entry = tb.measured_entry(variant, group, world, tokens, lc.H, lc.DTYPE)
            path = "unfused" if entry.pick == "unfused" else entry.path
            assert path == want_path, (tokens, path, want_path)
            seen.append((tokens, variant, path))
            spec = variants.get(variant)
            bound = arguments.bind(spec, (x, res, w, eps, group), {"return_norm": True} if spec.kind else {})
            got = backend.run(variant, arguments.fused_args(spec, bound, arguments.resolve(spec, bound)))
            torch.cuda.synchronize()
            if path == "unfused":  # the group's own collective, then our epilogue kernel
                reduced = x.clone()
                dist.all_reduce(reduced, group=dist.group.WORLD)
                want_norm, want_res = epilogue.add_rms_norm(reduced, res, w, eps)
                assert torch.equal(got.residual_out, want_res), f"rank {rank} unfused path: residual_out differs"
                err = (got.norm_out.float() - want_norm.float()).abs()
                assert not (err > 2.0**-7 * want_norm.float().abs() + 1e-6).any(), "unfused path: norm off > 1 ulp"
            else:
                outs = (got.residual_out, got.norm_out, got.q, got.scales)
                lc.check(rank, world, call, tokens, outs, w, eps, 2 if spec.kind else 0, device)
            call += 1
    return seen, call


def worker(rank, world, queue, results, barrier, tmp):
    try:
        import torch.distributed as dist

        from fusion_passes.backends import agree, lamport, measured

        torch.cuda.set_device(0)
        device = torch.device("cuda", 0)
        warned = []
        handler = logging.Handler(logging.WARNING)
        handler.emit = lambda r: warned.append(r.getMessage())
        logging.getLogger("fusion_passes").addHandler(handler)
        buf = lamport.arm(torch.empty(lamport.buffer_elems(world, lc.MAX_TOKENS, lc.H), dtype=lc.DTYPE, device=device))
        torch.cuda.synchronize()
        for _ in range(world - 1):
            queue[rank].put(buf)
        barrier.wait()
        bufs = [buf if r == rank else queue[r].get() for r in range(world)]
        ws = lamport.from_peer_buffers(bufs, rank, lc.MAX_TOKENS, lc.H)
        w = (torch.rand(lc.H, generator=torch.Generator().manual_seed(5)) + 0.5).to(lc.DTYPE).to(device)
        dist.init_process_group("gloo", rank=rank, world_size=world)
        group = "c10d:" + dist.group.WORLD.group_name
        lamport.install(group, ws, device)
        out = {}
        for case, bump in (("same", 0.0), ("mismatch", 1.0 if rank == 0 else 0.0)):
            os.environ[measured.ENV] = os.path.join(tmp, f"{case}-{rank}.json")
            measured.write(table(world, group, bump))
            agree.reset()
            digest = agree.for_group(group, world)
            if case == "same":
                seen, _ = run_calls(rank, world, group, w, device, 0)
                out[case] = (digest is not None, digest, seen)
            else:
                out[case] = (digest, tb_entry(group, world))
        out["warnings"] = [m for m in warned if "different measured tables" in m]
        every = [None] * world
        dist.all_gather_object(every, out)
        dist.destroy_process_group()
        results.put((rank, every, None))
    except Exception:  # noqa: BLE001 - reported by the parent
        results.put((rank, None, traceback.format_exc()))


def tb_entry(group, world):
    from fusion_passes.backends import triton as tb

    return tb.measured_entry("add_rmsnorm", group, world, 4, lc.H, lc.DTYPE)


def verdict(world, every) -> str | None:
    """Why the ranks' answers fail the protocol (None: they pass)."""
    same = [e["same"] for e in every]
    if not all(s[0] for s in same) or len({s[1] for s in same}) != 1 or len({str(s[2]) for s in same}) != 1:
        return f"same tables: ranks did not agree on one table and one path per call: {same}"
    mismatch = [e["mismatch"] for e in every]
    if any(m != (None, None) for m in mismatch):
        return f"different tables: some rank used a measured entry: {mismatch}"
    if any(len(e["warnings"]) != 1 for e in every):
        return f"different tables: not one warning per rank: {[e['warnings'] for e in every]}"
    return None


def run(world: int) -> str | None:
    got = lc.spawn(world, 29700 + world, worker, tempfile.mkdtemp(prefix="agree_check"))
    errors = [f"rank {rank}: {err}" for rank, _every, err in got if err]
    if errors:
        return "\n".join(errors)
    return verdict(world, next((every for _rank, every, _err in reversed(got) if every), None))


def main(argv) -> int:
    return lc.run_worlds([int(a) for a in argv] or [2, 4], run, lambda world: (
        f"one table agreed, {len(CALLS) * 2} calls through TritonBackend.run on the measured paths (lamport, "
        "twoshot, unfused = gloo all-reduce + our epilogue) bit-exact on every rank; different tables: every "
        "rank on the shipped table, one warning each"))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
