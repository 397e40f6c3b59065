"""``tune``'s precompile on CPU, its own process: ``python tests/triton_precompile_case.py OUT.json CACHE``.

Triton's JIT is pointed at an sm_90 target through a stand-in driver (no GPU: Triton compiles
for a target without one; nothing is launched, as :func:`fusion_passes.backends.triton.compile_only`
launches nothing), and ``tune.precompile`` runs for add + RMSNorm at hidden 4096 over three token
buckets, through the triton backend's own launch (``TritonBackend._launch``: its argument
marshalling and Triton's own specialization of them). Then every (bucket, option) call is made
again, one at a time, as the timed launches would be. OUT gets what tests/test_tune.py asserts:
the calls made, the binaries compiled, the compiles of the second pass (none, if the precompile
made the binaries the launches look up), and the threads the first pass compiled in. Its own
process: the stand-in driver and Triton's cache directory (CACHE, empty) must not leak into
other tests.

``--gpu`` (one NVIDIA GPU; on 1x H100 in session 13: no compile again): the same on the GPU's own driver and SM count, the second
pass launching each config for real (``python tests/triton_precompile_case.py OUT CACHE --gpu``:
OUT's ``compiles_again`` must be 0).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading


def main(out: str, cache: str, gpu: bool = False) -> int:
    os.environ["TRITON_CACHE_DIR"] = cache
    if not gpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import argparse
    import types

    import torch
    import triton.compiler
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    import oracles
    from fusion_passes import variants
    from fusion_passes.backends import triton as tb
    from fusion_passes.backends import triton_kernels as k
    from fusion_passes.cli import tune
    from fusion_passes.cli.model_trace import fake_world

    class Sm90:  # what the JIT asks of a driver before it compiles
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

    if not gpu:
        driver.set_active(Sm90())
    compiles = []
    real = triton.compiler.compile  # what the JIT binds when it first compiles

    def counted(*a, **kw):
        compiles.append(threading.get_ident())
        return real(*a, **kw)
    triton.compiler.compile = counted

    parser = argparse.ArgumentParser()
    tune.add_arguments(parser)
    args = parser.parse_args(["--tokens", "1", "4", "512", "--precompile-threads", "2"])
    device = "cuda" if gpu else "cpu"
    ctx = types.SimpleNamespace(world=1, device=device, fused_backend="triton", args=args, phases={})
    if not gpu:
        tune.programs_to_fill = lambda device: 132  # an H100's SMs
    fill = tune.programs_to_fill(torch.device(device))
    group = "c10d:" + fake_world(1).group_name
    backend, spec = tb.TritonBackend(), variants.get("add_rmsnorm")

    def fused(x, r, w, s):
        return backend._launch(oracles.fused_args(spec, x, r, w, 1e-6, group, False, False), k.QUANT_NONE,
                               write_norm=True, variant="add_rmsnorm")
    hidden = 4096
    w = torch.ones(hidden, dtype=torch.bfloat16, device=device)
    calls = tune.precompile(ctx, "add_rmsnorm", hidden, w, None, fused, tb)
    first = list(compiles)
    binaries = len(k.fused_allreduce_add_rmsnorm_kernel.device_caches[0][0])
    compiles.clear()
    warps = [o["num_warps"] for o in tune.fused_options(1, "add_rmsnorm", hidden)]
    with (contextlib.nullcontext() if gpu else tb.compile_only()):  # on a GPU, real launches
        for tokens in args.tokens:
            x = torch.randn(tokens, hidden, device=device).bfloat16()
            for option in (tune.fused_options(1, "add_rmsnorm", hidden)
                           + tune.shape_options(1, "add_rmsnorm", hidden, tokens, fill, warps)):
                with tune._forcing(tb, option):
                    fused(x, torch.empty_like(x), w, None)
    with open(out, "w") as f:
        json.dump({"calls": calls, "binaries": binaries, "compiles_first": len(first),
                   "threads_first": len(set(first)), "main_thread_compiles": first.count(threading.get_ident()),
                   "compiles_again": len(compiles), "phases": sorted(ctx.phases)}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], "--gpu" in sys.argv[3:]))
