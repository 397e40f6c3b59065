"""Run the triton backend's world-size-1 kernel on CPU, in Triton's interpreter.

``python tests/triton_interpret_cases.py OUT.json``: for each case, the backend's own launch
(``TritonBackend._launch``, so its argument marshalling and the looped and tile kernels' gating
are the ones that run on a GPU) at the default config, at 2 rows per program, in pieces of 1024
(the looped kernel, ``triton_kernels.epilogue_row_looped``) and 4 rows at once (the tile
kernel, ``triton_kernels.epilogue_tile``: 6 rows, so the second block is partly masked), against the reference backend
(``epilogue.py``); OUT gets one line of findings per case and config, which
tests/test_triton_interpret.py asserts.

Its own process: ``TRITON_INTERPRET=1`` (kernels run through numpy) must be set before Triton
is imported, with no GPU (``CUDA_VISIBLE_DEVICES`` empty). The interpreter's sums are not the
GPU's, and its fp32 -> bf16 conversion truncates where a GPU rounds to nearest (Triton 3.8;
every element of 4096 random values checked): this checks what the kernel computes, within a
few steps of bf16, not its bits on a GPU; those are tests/gpu/triton_check.py's.
"""

from __future__ import annotations

import json
import os
import sys

CASES = [  # (name, variant, flags for oracles.fused_args, params)
    ("add_rmsnorm", "add_rmsnorm", {}, ()),
    ("sum_stored", "add_rmsnorm", {"sum_stored": True}, ()),
    ("gemma", "add_rmsnorm", {"gemma": True}, ()),
    ("weight_in_fp32", "add_rmsnorm", {"w_fp32": True}, ()),
    ("no_residual", "add_rmsnorm", {"residual": False}, ()),
    ("fp8_static", "add_rmsnorm_fp8_static", {}, ("scale",)),
    ("fp8_per_token", "add_rmsnorm_fp8_per_token", {}, (None,)),  # not looped: the one-pass kernel
    ("residual_in_fp32", "add_rmsnorm", {"residual_in_fp32": True}, ()),  # not looped either
]
CONFIGS = {"default": {}, "rows2": {"rows": 2}, "pieces1024": {"chunk": 1024}, "tile4": {"tile": 4}}
T, H = 6, 3072  # 3 pieces of 1024; an odd row count for 2 rows per program


def main(out: str) -> int:
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch

    import oracles
    from fusion_passes import variants
    from fusion_passes.backends import triton as tb
    from fusion_passes.backends.reference import ReferenceBackend
    from fusion_passes.cli.model_trace import fake_world

    group = "c10d:" + fake_world(1).group_name
    backend, found = tb.TritonBackend(), {}
    for i, (name, variant, flags, params) in enumerate(CASES):
        g = torch.Generator().manual_seed(i)
        x = (torch.randn(T, H, generator=g) * 3).bfloat16()
        res = torch.randn(T, H, generator=g).bfloat16() if flags.get("residual", True) else None
        w_fp32 = flags.get("w_fp32", False)
        w = (torch.rand(H, generator=g) + 0.5).bfloat16()
        params = tuple(torch.tensor([0.02]) if p == "scale" else p for p in params)
        rest = {k: v for k, v in flags.items() if k not in ("residual", "w_fp32", "gemma")}
        args = oracles.fused_args(variants.get(variant), x, res, w, 1e-6, group, flags.get("gemma", False), w_fp32,
                                  *params, with_norm_out=variant != "add_rmsnorm", **rest)
        want = ReferenceBackend().run(variant, args)
        quant = getattr(backend._k, tb.KERNEL_QUANT[variant])
        default = None
        for cname, force in CONFIGS.items():
            tb.FORCE.update(force)
            try:
                got = backend._launch(args, quant, write_norm=True, variant=variant)
            finally:
                tb.FORCE.clear()
            if default is None:
                default = got
            found[f"{name} {cname}"] = _compare(got, want, default)
    found["move floor"] = _move()
    with open(out, "w") as f:
        json.dump(found, f, indent=1)
    return 0


def _compare(got, want, default) -> dict:
    """What the test asserts, each output's largest distance in steps of 2^-8 of the value
    (one bf16 step is 1-2 of them): the residual and the norm against the reference and
    against the default config (the one-pass kernel, in the interpreter's own arithmetic),
    and whether every output is byte-equal to the default config's."""
    import torch

    def steps(a, b):
        a, b = a.float(), b.float()
        return float(((a - b).abs() / (b.abs() * 2.0**-8).clamp_min(2.0**-12)).max())

    same = all(torch.equal(_bytes(a), _bytes(b)) for a, b in ((got.residual_out, default.residual_out),
                                                              (got.norm_out, default.norm_out), (got.q, default.q))
               if a is not None)
    return {"residual_steps": steps(got.residual_out, want.residual_out),
            "norm_steps": steps(got.norm_out, want.norm_out),
            "norm_steps_vs_default": steps(got.norm_out, default.norm_out),
            "same_as_default": same}


def _move() -> dict:
    """tune's move floor kernel (``bench_cuda.move_rows``): the residual's row copied byte for
    byte, the second row copied (bf16) or converted to FP8. The FP8 values are not compared:
    the interpreter (Triton 3.8) drops the carry where rounding overflows the mantissa (1.9453
    becomes 1.0, not 2.0, on 6% of these values); the GPU's conversion is the hardware's."""
    import torch

    from fusion_passes.cli import bench_cuda

    g = torch.Generator().manual_seed(99)
    x, r = torch.randn(T, H, generator=g).bfloat16(), torch.randn(T, H, generator=g).bfloat16()
    a, b = bench_cuda.move_rows(x, r)
    a8, b8 = bench_cuda.move_rows(x, r, torch.float8_e4m3fn, num_warps=8)
    return {"copies": torch.equal(_bytes(a), _bytes(x)) and torch.equal(_bytes(b), _bytes(r))
            and torch.equal(_bytes(a8), _bytes(x)), "fp8": f"{b8.dtype} {tuple(b8.shape)}"}


def _bytes(t):
    import torch

    return t.contiguous().view(-1).view(torch.uint8)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
