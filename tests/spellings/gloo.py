"""The corpus on two real gloo ranks, in ONE pair of processes (process start-up is what
costs test time): every case is traced, fused and run inside the same process group."""

from __future__ import annotations

import os
import time


def cases_by_name(names):
    from . import design, held_out, negative

    table = {c.name: c for c in (*design.CASES, *held_out.CASES, *negative.CASES)}
    return [table[n] for n in names]


def prepare(cases) -> None:
    """Register what the cases need (in-place stand-ins; vLLM's IR ops) in this process."""
    from . import standins

    if any("standins" in c.needs for c in cases):
        standins.register()
    if any("vllm" in c.needs for c in cases):
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
        import vllm.ir  # noqa: F401  (registers torch.ops.vllm_ir.*)


def run_case(case, rank: int, world: int = 2) -> dict:
    """Trace, fuse, run fused and unfused on this rank; what went wrong (if anything)."""
    from . import harness

    inputs = harness.replicated_inputs(case)
    gm = harness.trace(case, [harness.partial_input(case, 0), *inputs])
    before, report = harness.fuse(gm)
    problems = harness.verdict(case, report)
    if case.expect is not None:
        problems += harness.arg_problems(case, gm)
    args = [harness.partial_input(case, rank), *inputs]
    want, got = before(*[a.clone() for a in args]), gm(*[a.clone() for a in args])
    partials = [harness.partial_input(case, r) for r in range(world)]
    problems += harness.compare(case, want, got, partials, inputs)
    site = report.sites[0] if report.sites else None
    return {"problems": problems, "fused": bool(site and site.fused), "variant": site and site.variant,
            "reason": site and site.reason}


def worker(rank: int, names: list[str]) -> dict:
    """Every named case on this rank (run through ``fusion_passes.tools.hf_tp.spawn``)."""
    start = time.perf_counter()
    cases = cases_by_name(names)
    prepare(cases)
    out = {}
    for case in cases:
        try:
            out[case.name] = run_case(case, rank)
        except Exception as e:  # noqa: BLE001 - one broken case must not hide the others
            out[case.name] = {"problems": [f"{type(e).__name__}: {e}"], "fused": False, "variant": None,
                              "reason": None}
    out["__seconds__"] = time.perf_counter() - start
    return out
