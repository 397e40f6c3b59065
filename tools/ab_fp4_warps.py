"""A/B of the FP4 epilogues' warps per row on one GPU: times ``TritonBackend.run`` under
CUDA graphs (as tools/bench_kernels.py does) with ``TRITON["fp4_many_tokens_warps"]``
patched, and "of floor" as that tool counts it.

``AB_CONFIGS="new:4 new:8 old:8"``: ``old`` runs the kernel module copied to
``tools/_fp4_ab_old_kernels.py`` (e.g. ``git show 37c839b:fusion_passes/backends/triton_kernels.py``)
instead of the current one. ``AB_TOKENS``, ``AB_HIDDEN`` pick the sizes.
Run: ``PYTHONPATH=. python tools/ab_fp4_warps.py`` on one GPU (a benchmark, not a test)."""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from fusion_passes.backends import thresholds  # noqa: E402
from fusion_passes.backends.triton import TritonBackend  # noqa: E402
from fusion_passes.tools import bench_kernels as bk  # noqa: E402

L = thresholds.TRITON


def main():
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29561")
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    group = "c10d:" + dist.group.WORLD.group_name
    bw = bk._copy_bandwidth(torch)
    old = None
    path = os.path.join(os.path.dirname(__file__), "_fp4_ab_old_kernels.py")
    if os.path.exists(path):
        spec = importlib.util.spec_from_file_location("_old_k", path)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
    hidden = int(os.environ.get("AB_HIDDEN", "7168"))
    tokens_list = [int(t) for t in os.environ.get("AB_TOKENS", "1 64 1024 4096 16384").split()]
    configs = [c.split(":") for c in os.environ.get("AB_CONFIGS", "new:4 new:8 new:16").split()]
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    for variant in ("add_rmsnorm_nvfp4", "add_rmsnorm_mxfp4"):
        w = (torch.rand(hidden, device="cuda") + 0.5).to(torch.bfloat16)
        gs = torch.tensor([bk.NVFP4_GLOBAL_SCALE], device="cuda")
        for tokens in tokens_list:
            x = torch.randn(tokens, hidden, device="cuda").to(torch.bfloat16)
            res = torch.randn(tokens, hidden, device="cuda").to(torch.bfloat16)
            nbytes = bk._bytes_moved(variant, tokens, hidden, 2)
            calls = max(1, min(20, int(4e8 // nbytes)))
            line = []
            for which, nw in configs:
                tb = TritonBackend()
                if which == "old":
                    if old is None:
                        continue
                    tb.__dict__["_k"] = old
                L["fp4_many_tokens"] = 1  # every token count takes the configured shape
                L["fp4_many_tokens_warps"] = {(1, variant): int(nw)}
                args = (gs, True) if variant.endswith("nvfp4") else ()

                def fn(x, res, w, _tb=tb, _a=args):
                    return _tb.run(variant, x, res, w, 1e-6, group, False, True, *_a)

                try:
                    us = bk._time_graph(torch, fn, (x, res, w), calls, 7)
                except Exception as e:  # noqa: BLE001
                    line.append(f"{which}:{nw}w ERROR {str(e)[:80]}")
                    continue
                line.append(f"{which}:{nw}w {us:7.1f}us {nbytes / bw * 1e6 / us:4.0%}")
            print(f"{variant[12:]:6s} H={hidden} T={tokens:5d}  " + "  ".join(line), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
