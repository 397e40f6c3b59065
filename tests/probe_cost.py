"""What recognition by meaning costs a compile (issue 20, item 2): one Inductor compile of
a chain the pass reads by meaning and does not fuse (a ``maximum`` before the norm), with
or without the pass, in this process; prints seconds and peak RSS as one JSON line.

    python tests/probe_cost.py --tokens 8192 --hidden 4096 --pass   # with the pass
    python tests/probe_cost.py --tokens 8192 --hidden 4096          # without

Run each in its own process (peak RSS is per process). The compile runs under torch's fake
process group (the all-reduce traces, nothing runs); nothing is executed, only compiled.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
import torch.distributed as dist


def chain(x, res, w):
    """An all-reduce, a ``maximum`` with the residual (no fused op computes it), then
    vLLM's native fp32 norm: the pass reads it by meaning and leaves it unfused."""
    c10d = torch.ops._c10d_functional
    t = c10d.wait_tensor(c10d.all_reduce(x, "sum", dist.group.WORLD.group_name))
    s = torch.maximum(t, res).float()
    h = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6)
    return (h * w.float()).to(x.dtype)


def main() -> None:
    from torch.testing._internal.distributed.fake_pg import FakeStore

    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--pass", dest="with_pass", action="store_true")
    args = parser.parse_args()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    import fusion_passes

    x, res = (torch.empty(args.tokens, args.hidden, dtype=torch.bfloat16) for _ in range(2))
    w = torch.empty(args.hidden, dtype=torch.bfloat16)
    start = time.perf_counter()
    fusion = fusion_passes.install() if args.with_pass else None
    from torch._inductor.compile_fx import compile_fx
    from torch.fx.experimental.proxy_tensor import make_fx

    with torch.no_grad():
        gm = make_fx(chain, tracing_mode="fake")(x, res, w)
        compile_fx(gm, [x, res, w])
    seconds = time.perf_counter() - start
    report = fusion.report.to_dict() if fusion is not None else None
    print(json.dumps({"tokens": args.tokens, "hidden": args.hidden, "pass": args.with_pass,
                      "seconds": round(seconds, 2),
                      "pass_seconds": round(fusion.report.seconds, 3) if fusion is not None else None,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
                      "sites": report and [(s["fused"], s["reason"]) for s in report["sites"]]}))


if __name__ == "__main__":
    main()
