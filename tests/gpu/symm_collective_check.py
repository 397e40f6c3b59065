"""The measured ``unfused`` pick's symmetric-memory collectives (fusion_passes.backends.symm.all_reduce),
as processes on ONE GPU (the IPC harness of tests/gpu/lamport_check.py).

``python tests/gpu/symm_collective_check.py [WS ...]``: WS processes on GPU 0 over a gloo group
register one symmetric workspace (``symm.get``) and sum rank-seeded inputs with torch's
one-shot and two-shot (``torch.ops.symm_mem``) through it; each result must equal the sum
in rank order, computed in fp32 and rounded once, on every rank, for several token counts.
Whether torch's symmetric memory accepts several processes on one GPU over gloo is what
this finds out first; timings here mean nothing and are not printed.
"""

from __future__ import annotations

import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.dirname(__file__))

import lamport_check as lc  # noqa: E402

H = 4096
TOKENS = (1, 7, 64, 300)


def worker(rank, world, queue, results, barrier):
    try:
        import torch.distributed as dist

        from fusion_passes.backends import symm

        torch.cuda.set_device(0)
        dist.init_process_group("gloo", rank=rank, world_size=world)
        group = "c10d:" + dist.group.WORLD.group_name
        symm.get(group, max(TOKENS) * H * 2, torch.device("cuda", 0))
        checked = 0
        for collective in ("symm_one_shot", "symm_two_shot"):
            for tokens in TOKENS:
                xs = [torch.randn(tokens, H, generator=torch.Generator().manual_seed(r * 1000 + tokens)).bfloat16()
                      for r in range(world)]
                want = sum(x.float() for x in xs).bfloat16()
                got = symm.all_reduce(xs[rank].cuda(), group, collective).cpu()
                torch.cuda.synchronize()
                if not torch.equal(got, want):
                    err = (got.float() - want.float()).abs().max().item()
                    raise AssertionError(f"{collective} at {tokens} tokens: max |got - want| {err}")
                checked += 1
                dist.barrier()
        dist.destroy_process_group()
        results.put((rank, None, checked))
    except Exception:  # noqa: BLE001 - reported by the parent
        results.put((rank, traceback.format_exc(), 0))


def run(world: int) -> str | None:
    errors = [f"rank {rank}: {err}" for rank, err, _n in lc.spawn(world, 29700 + world, worker) if err]
    return "\n".join(errors) if errors else None


def main(argv) -> int:
    return lc.run_worlds([int(a) for a in argv] or [2, 4], run, lambda world: (
        f"{2 * len(TOKENS)} sums (symm one-shot and two-shot) on one GPU: every rank equal to the fp32 rank-order sum"))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
