"""Warps per row A/B of the (restructured, loop-free at ws1) kernel, every variant, via TritonBackend.run.

Runs the code under gpu_ab/snap (PYTHONPATH). Forces num_warps by patching num_warps_for
and the FP4 many-token rule. Prints one line per (variant, hidden, tokens) with the time of
each warps value; writes $OUT/ab_warps.json.
"""
import json
import os
import sys
import time

import torch
import torch.distributed as dist

from fusion_passes.backends import thresholds
from fusion_passes.backends import triton as tb_mod
from fusion_passes.backends.triton import TritonBackend
from fusion_passes.tools import bench_kernels as bk

T0 = time.time()
OUT = os.environ.get("OUT", "/tmp")


def main():
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29571")
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    group = "c10d:" + dist.group.WORLD.group_name
    L = thresholds.TRITON
    L["fp4_many_tokens"] = 10**9
    rows = []
    variants = os.environ.get("AB_VARIANTS", " ".join(bk.VARIANTS)).split()
    tokens_list = [int(t) for t in os.environ.get("AB_TOKENS", "1 8 32 128 256 1024 4096 16384").split()]
    warps = [int(w) for w in os.environ.get("AB_WARPS", "4 8 16").split()]
    for variant in variants:
        for hidden in ((4096, 7168, 8192) if variant == "add_rmsnorm" else (7168,)):
            w = (torch.rand(hidden, device="cuda") + 0.5).to(torch.bfloat16)
            sc = torch.tensor([bk.NVFP4_GLOBAL_SCALE if variant.endswith("nvfp4") else 0.02], device="cuda")
            extra = {"add_rmsnorm": (), "add_rmsnorm_fp8_static": (sc,), "add_rmsnorm_fp8_per_token": (None,),
                     "add_rmsnorm_fp8_per_group": (128, False, False), "add_rmsnorm_nvfp4": (sc, True),
                     "add_rmsnorm_mxfp4": ()}[variant]
            for tokens in tokens_list:
                x = torch.randn(tokens, hidden, device="cuda").to(torch.bfloat16)
                res = torch.randn(tokens, hidden, device="cuda").to(torch.bfloat16)
                calls = max(1, min(20, int(4e8 // (tokens * hidden * 8))))
                row = {"variant": variant, "hidden": hidden, "tokens": tokens}
                for nw in warps:
                    tb_mod.num_warps_for = lambda h, _nw=nw: _nw
                    tb = TritonBackend()

                    def fn(x, res, w, _tb=tb):
                        return _tb.run(variant, x, res, w, 1e-6, group, False, True, *extra)

                    try:
                        row[f"w{nw}"] = bk._time_graph(torch, fn, (x, res, w), calls, 7)
                    except Exception as e:  # noqa: BLE001
                        row[f"w{nw}"] = None
                        print("ERR", variant, nw, str(e)[:200], flush=True)
                rows.append(row)
                print(f"[{time.time() - T0:5.0f}s] {variant:26s} H={hidden} T={tokens:5d} "
                      + " ".join(f"w{nw}:{row[f'w{nw}']:.2f}" if row[f"w{nw}"] else f"w{nw}:ERR" for nw in warps),
                      flush=True)
    with open(os.path.join(OUT, "ab_warps.json"), "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
