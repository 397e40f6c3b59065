"""The worker of tests/test_agree.py: one gloo rank running every agreement case in turn.

Each rank has its own measured-table file (as each host or user would) and a faked GPU
name and versions. The cases run in one process start-up; each returns what this rank
decided, and the test compares the ranks' answers.
"""

from __future__ import annotations

import logging
import os
import traceback

GPU = "NVIDIA H100 80GB HBM3"
VERSIONS = {"torch": "2.11.0", "triton": "3.6.0", "driver": "12080"}


def _table(world, picks):
    return {"key": {"gpu": GPU, "world_size": world, "single_node": True, **VERSIONS}, "command": "test",
            "entries": [{"variant": "add_rmsnorm", "hidden": 4096, "dtype": "bfloat16", "tokens": t, "pick": p, "path": "lamport",
                         "num_warps": 8, "fused_us": 2.0, "unfused_us": 3.0} for t, p in picks]}


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.seen: list[str] = []

    def emit(self, record):
        self.seen.append(record.getMessage())


def _with_table(rank, world, tmp, picks_per_rank):
    """Agree on the tables given per rank (None: no file); this rank's answers."""
    from fusion_passes.backends import agree, measured
    from fusion_passes.backends import triton as tb

    import torch
    import torch.distributed as dist

    file = os.path.join(tmp, f"rank{rank}-{len(os.listdir(tmp))}.json")
    os.environ[measured.ENV] = file
    measured.reset()
    agree.reset()
    picks = picks_per_rank[rank]
    if picks is not None:
        measured.write(_table(world, picks))
    group = "c10d:" + dist.group.WORLD.group_name
    before = agree.table_id(group, world)  # compile time, before any eager call: shipped
    digest = agree.for_group(group, world)
    entry = tb.measured_entry("add_rmsnorm", group, world, 100, 4096, torch.bfloat16)
    return {"before": before, "agreed": digest is not None, "digest": digest,
            "entry": None if entry is None else (entry.tokens, entry.pick, entry.path),
            "compile_time": agree.table_id(group, world)}


def cases(rank, world, tmp):
    from fusion_passes.backends import agree
    from fusion_passes.cli import tune

    import torch.distributed as dist

    same = [(64, "fused"), (128, "unfused"), (256, "fused")]
    other = [(64, "fused"), (128, "fused"), (256, "fused")]
    out = {
        "same": _with_table(rank, world, tmp, [same] * world),
        "mismatch": _with_table(rank, world, tmp, [same] + [other] * (world - 1)),
        "one_without": _with_table(rank, world, tmp, [same] * (world - 1) + [None]),
        "none": _with_table(rank, world, tmp, [None] * world),
    }
    group = "c10d:" + dist.group.WORLD.group_name
    # fake timers: every rank sees other times; the slowest rank's time per option counts
    times = {"fused:barrier:8": 10.0 + 5 * rank, "fused:lamport:8": 12.0, "nccl+static": 14.0 - rank}
    out["decide"] = agree.decide(group, times)
    entry, _ = tune.decide_bucket(group, "add_rmsnorm", 4096, 64, {**times, "fused:twoshot:8": None}, "bfloat16")
    out["bucket"] = entry
    return out


def worker(rank, world, tmp, port, results):
    try:
        import torch.distributed as dist

        from fusion_passes.backends import measured

        measured._gpu = lambda: GPU
        measured._versions = lambda: dict(VERSIONS)
        handler = _Warnings()
        logging.getLogger("fusion_passes").addHandler(handler)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        out = cases(rank, world, tmp)
        out["warnings"] = handler.seen
        dist.destroy_process_group()
        results.put((rank, out, None))
    except Exception:  # noqa: BLE001 - reported by the test
        results.put((rank, None, traceback.format_exc()))
