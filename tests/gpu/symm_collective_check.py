"""The measured ``unfused`` pick's symmetric-memory collectives (fusion_passes.backends.symm.all_reduce).

``python tests/gpu/symm_collective_check.py [WS ...]``: WS processes, rank r on GPU
``r % device_count``, over a gloo group, register one symmetric workspace (``symm.get``) and
sum rank-seeded inputs with torch's one-shot and two-shot (``torch.ops.symm_mem``) through it;
each result must equal the sum in rank order, computed in fp32 and rounded once, on every
rank, for several token counts. It needs WS GPUs: with several processes on ONE GPU torch
refuses at the rendezvous ("detected allocations from overlapping devices from different
ranks", 1x H100, 2026-12-07: results/symm_collective_check_h100_one_gpu.log), so unlike
tests/gpu/lamport_check.py it cannot run on the one-GPU machines lent so far.
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

        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        dist.init_process_group("gloo", rank=rank, world_size=world)
        group = "c10d:" + dist.group.WORLD.group_name
        symm.get(group, max(TOKENS) * H * 2, device)
        checked = 0
        for collective in ("symm_one_shot", "symm_two_shot"):
            for tokens in TOKENS:
                xs = [torch.randn(tokens, H, generator=torch.Generator().manual_seed(r * 1000 + tokens)).bfloat16()
                      for r in range(world)]
                want = sum(x.float() for x in xs).bfloat16()
                got = symm.all_reduce(xs[rank].to(device), group, collective).cpu()
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
        f"{2 * len(TOKENS)} sums (symm one-shot and two-shot): every rank equal to the fp32 rank-order sum"))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
