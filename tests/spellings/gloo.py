"""The corpus on two real gloo ranks, in ONE pair of processes (process start-up is what
costs test time). The parent traces and fuses every case once (under torch's fake process
group, whose world group has the gloo group's name, so the graphs are the ones the ranks
would trace); each rank runs the unfused and the fused graph of every case on its own
partial sums with real collectives and compares them."""

from __future__ import annotations

import os
import pickle
import time


DYNAMIC = "@dynamic"
"""Suffix of an item whose graphs were traced with a symbolic token dimension."""
DYNAMIC_EXTRA_TOKENS = 5
"""A token-dynamic graph runs at ``case.tokens + 5`` tokens (13 by default: not the traced
count, not a power of two): the fused op must hold at a size the trace never saw."""


def cases_by_name(names):
    from . import design, held_out, negative

    table = {c.name: c for c in (*design.CASES, *held_out.CASES, *negative.CASES)}
    return [table[n.removesuffix(DYNAMIC)] for n in names]


def prepare(cases) -> None:
    """Register what the cases need (in-place stand-ins; vLLM's IR ops) in this process."""
    from . import standins

    if any("standins" in c.needs for c in cases):
        standins.register()
    if any("vllm" in c.needs for c in cases):
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
        import vllm.ir  # noqa: F401  (registers torch.ops.vllm_ir.*)


def run_case(case, graphs: bytes, rank: int, world: int = 2, dynamic: bool = False) -> list[str]:
    """Run the unfused and the fused graph on this rank; what differs (empty: nothing)."""
    import dataclasses

    from . import harness

    if dynamic:
        case = dataclasses.replace(case, tokens=case.tokens + DYNAMIC_EXTRA_TOKENS)
    before, fused = pickle.loads(graphs)
    inputs = harness.replicated_inputs(case)
    args = [harness.partial_input(case, rank), *inputs]
    want = harness.call(before, [a.clone() for a in args])
    got = harness.call(fused, [a.clone() for a in args])
    partials = [harness.partial_input(case, r) for r in range(world)]
    return harness.compare(case, want, got, partials, inputs)


def worker(rank: int, group_name: str, items: list[tuple[str, bytes]]) -> dict:
    """Every case on this rank (run through ``fusion_passes.cli.hf_tp.spawn``)."""
    import torch.distributed as dist

    start = time.perf_counter()
    if dist.group.WORLD.group_name != group_name:
        raise RuntimeError(f"the graphs name group {group_name!r}, this world is {dist.group.WORLD.group_name!r}")
    cases = cases_by_name([name for name, _ in items])
    prepare(cases)
    out = {}
    for case, (name, graphs) in zip(cases, items):
        try:
            out[name] = run_case(case, graphs, rank, dynamic=name.endswith(DYNAMIC))
        except Exception as e:  # noqa: BLE001 - one broken case must not hide the others
            out[name] = [f"{type(e).__name__}: {e}"]
    out["__seconds__"] = time.perf_counter() - start
    return out
