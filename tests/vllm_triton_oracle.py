"""Run vLLM's MXFP4 Triton kernel on CPU, in Triton's interpreter, on saved inputs.

``python tests/vllm_triton_oracle.py IN.pt OUT.pt``: IN holds a list of bf16/fp16 tensors
[T, H]; OUT gets ``[(packed uint8 [T, H//2], E8M0 scale bytes [T, H//32]), ...]`` from
``vllm.model_executor.layers.quantization.utils.mxfp4_utils.downcast_to_mxfp`` (the kernel
``_downcast_to_mxfp`` / ``_compute_quant_and_scale`` that vLLM runs on GPUs without AITER).

Its own process because the environment must be set before Triton and vLLM import:
``TRITON_INTERPRET=1`` (kernels run on the CPU through numpy) and an empty
``CUDA_VISIBLE_DEVICES`` (vllm/triton_utils/importing.py then keeps Triton enabled on a
host with no GPU driver). One interpreter gap is filled: Triton 3.8's interpreter does not
patch the tensor method ``x.floor()`` (it calls ``math.floor`` without a semantic), which
the kernel uses; it is pointed at ``triton.language.math.floor``, which the interpreter does
patch. Nothing else is changed.
"""

from __future__ import annotations

import os
import sys


def main(src: str, dst: str) -> int:
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    import torch
    import triton.language.core as tl_core
    import triton.language.math as tl_math

    tl_core.tensor.floor = lambda self: tl_math.floor(self)
    from vllm.model_executor.layers.quantization.utils.mxfp4_utils import downcast_to_mxfp

    outs = []
    for x in torch.load(src):
        q, scales, _ = downcast_to_mxfp(x.contiguous(), -1)
        outs.append((q.contiguous(), scales.contiguous()))
    torch.save(outs, dst)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
