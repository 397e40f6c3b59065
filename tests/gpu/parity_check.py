"""The triton backend under the compile-parity flags (docs/design.md, "What Inductor keeps
unrounded"), against the reference backend, on a real GPU at world size 1:

* ``carry_fp32``: an fp32 residual in, the unrounded fp32 sum out (bit-exact: one fp32
  add of the same two values), the norm within one ulp of the output dtype;
* ``quant_unrounded``: the backend declines it (its kernel quantizes the rounded norm).

    python tests/gpu/parity_check.py
"""

from __future__ import annotations

import dataclasses
import os
import sys

import torch
import torch.distributed as dist

from fusion_passes import ops, variants
from fusion_passes.backends.reference import ReferenceBackend
from fusion_passes.backends.triton import TritonBackend

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import oracles  # noqa: E402

ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def args_for(variant, x, res, w, group, params, **flags):
    a = oracles.fused_args(variants.get(variant), x, res, w, 1e-6, group, False, True, *params)
    return dataclasses.replace(a, flags=dataclasses.replace(a.flags, **flags))


def check(group, dtype, tokens, hidden) -> list[str]:
    g = torch.Generator(device="cuda").manual_seed(tokens)
    x = torch.randn(tokens, hidden, device="cuda", generator=g).to(dtype)
    res32 = torch.randn(tokens, hidden, device="cuda", generator=g)
    w = (torch.rand(hidden, device="cuda", generator=g) + 0.5).to(dtype)
    tri, ref = TritonBackend(), ReferenceBackend()
    out = []
    a = args_for("add_rmsnorm", x, res32, w, group, (), carry_fp32=True)
    t, r = tri.run("add_rmsnorm", a), ref.run("add_rmsnorm", a)
    assert t.residual_out.dtype == torch.float32 and torch.equal(t.residual_out, r.residual_out), "carry sum"
    torch.testing.assert_close(t.norm_out.float(), r.norm_out.float(), rtol=ULP[dtype], atol=1e-6)
    out.append(f"carry_fp32 {dtype} {tokens}x{hidden}")
    assert tri.unsupported(dataclasses.replace(ops.call_for("add_rmsnorm_fp8_per_token", x, group),
                                               flags=variants.Flags(quant_unrounded=True)))
    out.append("quant_unrounded declined")
    return out


def main() -> int:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29534"))
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    group = "c10d:" + dist.group.WORLD.group_name
    failures = 0
    for dtype in (torch.bfloat16, torch.float16):
        for tokens, hidden in ((1, 4096), (7, 2048), (64, 4096)):
            try:
                lines = check(group, dtype, tokens, hidden)
                print("\n".join("ok   " + line for line in lines), flush=True)
            except Exception as e:  # noqa: BLE001 - report every failure, keep going
                failures += 1
                print(f"FAIL {dtype} {tokens}x{hidden}: {e}", flush=True)
    dist.destroy_process_group()
    print(f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
