"""Test harness: patches vLLM so that its model code traces and runs on a CPU-only host.

NOT part of the fusion-passes library API, and never imported by the passes. It exists
so that ``fusion-passes capture`` (:mod:`fusion_passes.tools.capture`) and the test
suite can build real vLLM models without GPUs: the vLLM 0.33 CUDA wheel runs here with
``VLLM_TARGET_DEVICE=cpu``, but its CUDA extension does not load and several of its CPU
paths differ from CUDA's. Every patch changes process-wide vLLM state and is applied
once per process, and only when a capture asks for it. Do not import this module in a
process that serves a model.

* :mod:`.vllm_cpu`: the CPU recipe (environment, CUDA's choices of collectives and MoE
  runner, fake process groups, FP8 weight loading without CUDA kernels).
* :mod:`.vllm_cpu_ops`: CPU stand-ins for vLLM's ``torch.ops._C`` quant ops, defined
  from the wheel's own schemas.
* :mod:`.vllm_e2e`: vLLM layers on real gloo ranks, fused against unfused (the
  end-to-end test's harness).
"""
