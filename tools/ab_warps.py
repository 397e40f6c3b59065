"""Warps per row A/B (a benchmark, not a test; ``PYTHONPATH=. python tools/ab_warps.py`` on one GPU) of the (restructured, loop-free at ws1) kernel, every variant, via TritonBackend.run.

Forces num_warps by patching num_warps_for
and the FP4 many-token rule. Prints one line per (variant, hidden, tokens) with the time of
each warps value; writes $OUT/ab_warps.json.
"""
import json
import os
import time

import torch
import torch.distributed as dist

from fusion_passes import arguments, variants
from fusion_passes.backends import thresholds
from fusion_passes.backends import triton as tb_mod
from fusion_passes.backends.triton import TritonBackend
from fusion_passes.cli.bench_cuda import time_graph

NVFP4_GLOBAL_SCALE = 448.0 * 6 / 5  # as fusion_passes/cli/bench_kernels.py: a norm output of absmax ~5 spans the e4m3 scales

T0 = time.time()
OUT = os.environ.get("OUT", "/tmp")


def main():
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29571")
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    group = "c10d:" + dist.group.WORLD.group_name
    L = thresholds.TRITON
    L["fp4_many_tokens"] = 10**9
    rows = []
    names = os.environ.get("AB_VARIANTS", " ".join(n for n in tb_mod.VARIANTS)).split()
    tokens_list = [int(t) for t in os.environ.get("AB_TOKENS", "1 8 32 128 256 1024 4096 16384").split()]
    warps = [int(w) for w in os.environ.get("AB_WARPS", "4 8 16").split()]
    for variant in names:
        for hidden in ((4096, 7168, 8192) if variant == "add_rmsnorm" else (7168,)):
            w = (torch.rand(hidden, device="cuda") + 0.5).to(torch.bfloat16)
            sc = torch.tensor([NVFP4_GLOBAL_SCALE if variant.endswith("nvfp4") else 0.02], device="cuda")
            quant = {"add_rmsnorm_fp8_static": {"scale": sc}, "add_rmsnorm_fp8_per_group": {"group_size": 128},
                     "add_rmsnorm_nvfp4": {"global_scale": sc}}.get(variant, {})
            spec = variants.get(variant)
            for tokens in tokens_list:
                x = torch.randn(tokens, hidden, device="cuda").to(torch.bfloat16)
                res = torch.randn(tokens, hidden, device="cuda").to(torch.bfloat16)
                calls = max(1, min(20, int(4e8 // (tokens * hidden * 8))))
                row = {"variant": variant, "hidden": hidden, "tokens": tokens}
                for nw in warps:
                    tb_mod.num_warps_for = lambda h, q=False, _nw=nw: _nw
                    tb = TritonBackend()

                    bound = arguments.bind(spec, (x, res, w, 1e-6, group), quant)
                    fa = arguments.fused_args(spec, bound, arguments.resolve(spec, bound))

                    def fn(_tb=tb, _fa=fa):
                        return _tb.run(variant, _fa)

                    try:
                        row[f"w{nw}"] = time_graph(fn, (), calls, 7)
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
