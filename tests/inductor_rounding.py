"""What Inductor's compile keeps unrounded across an all-reduce -> add -> RMSNorm -> FP8
chain (docs/design.md, "What Inductor keeps unrounded"): a reproducible experiment on CPU.

    PYTHONPATH=. python tests/inductor_rounding.py

It compiles, under Inductor's default precision and torch's fake process group (the
all-reduce is one rank's identity), (1) a 2-layer chain of sites of the hand-written TP
Llama (tests/tp_llama.py) and prints, per generated C++ kernel, which buffers it reads and
writes: the residual sums are never written, each norm kernel recomputes the whole
residual stream from the all-reduce outputs in fp32; (2) one site with vLLM's native
per-token FP8 quant and a final-norm site (its sum read by the norm alone), and compares
the compiled values bit for bit with candidate formulas (fusion_passes.epilogue): which
value the norm reads (the rounded or the unrounded sum) and which the quant reads.
"""

from __future__ import annotations

import os
import re
import sys

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
import torch._inductor.config as inductor_config  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch._inductor.utils import run_and_get_code  # noqa: E402

from fusion_passes import epilogue  # noqa: E402
from graphs import all_reduce, hf_rms_norm  # noqa: E402
import tp_llama  # noqa: E402


def compile_code(fn, *args):
    torch._dynamo.reset()
    with inductor_config.patch(emulate_precision_casts=False, fx_graph_cache=False):
        return run_and_get_code(torch.compile(fn, fullgraph=True, dynamic=False), *args)


def kernels(code: str):
    """(kernel, buffers read, buffers written) of each C++ kernel call in *code*."""
    for m in re.finditer(r"^\s*(cpp_fused\w+)\((.*)\)$", code, re.M):
        yield m.group(1), m.group(2)


def residual_stream():
    w = tp_llama.to(tp_llama.make(2, 64), torch.bfloat16)
    ids = torch.arange(8)
    _, (code,) = compile_code(lambda i: tp_llama.forward(w, i), ids)
    print("(1) 2-layer chain: the kernels and their arguments (inputs first, then outputs)")
    for name, args in kernels(code):
        print(f"  {name}({args})")


def differing(a, b) -> str:
    a, b = (t.view(torch.uint8) if t.element_size() == 1 else t for t in (a, b))
    return f"{int((a != b).sum())}/{a.numel()} differ"


def one_site():
    from vllm.model_executor.layers.quantization.input_quant_fp8 import QuantFP8
    from vllm.model_executor.layers.quantization.utils.quant_utils import GroupShape
    from vllm.config import VllmConfig, set_current_vllm_config

    with set_current_vllm_config(VllmConfig()):
        quant = QuantFP8(False, GroupShape.PER_TOKEN, compile_native=False)
    g = torch.Generator().manual_seed(0)
    x, r = (torch.randn(8, 512, generator=g).bfloat16() for _ in range(2))
    w = (torch.rand(512, generator=g) + 0.5).bfloat16()

    def fn(x, r, w):
        h = all_reduce(x) + r
        final = hf_rms_norm(all_reduce(x) + r, w, 1e-6)  # its sum is read by the norm alone
        return (h, *quant.forward_native(hf_rms_norm(h, w, 1e-6)), final)

    (h, q, s, final), _ = compile_code(fn, x, r, w)
    rounded = x + r
    unrounded = x.float() + r.float()
    y32 = epilogue.rms_norm(rounded, w, 1e-6, out_dtype=torch.float32)
    q_r, s_r = epilogue.fp8_per_token(y32.bfloat16())
    print("(2) one site, compiled vs candidates")
    print(f"  residual vs x + r in bf16: {differing(h, rounded)}")
    print(f"  scales vs amax of the rounded norm output: {differing(s, s_r)}")
    print(f"  FP8 codes vs the rounded norm output: {differing(q, q_r)}")
    print(f"  FP8 codes vs the unrounded norm output: {differing(q, epilogue.FP8_CODES['add_rmsnorm_fp8_per_token'](y32, s_r, {'fp8_dtype': torch.float8_e4m3fn}))}")
    for label, summed in (("rounded", rounded), ("unrounded", unrounded)):
        print(f"  final norm vs the norm of the {label} sum: "
              f"{differing(final, epilogue.rms_norm(summed, w, 1e-6, out_dtype=torch.bfloat16))}")


if __name__ == "__main__":
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=1)
    residual_stream()
    one_site()
