"""The vLLM end-to-end harness (developer code, NOT installed; the suite imports it as
``tools.testing``).

* :mod:`.vllm_e2e`: vLLM layers on real gloo ranks, fused against unfused (the harness of
  ``tests/test_vllm_gloo.py``).

What it shares with ``fusion-passes capture`` (the recipe that makes vLLM's CUDA wheel
trace on a CPU) is part of the command line: :mod:`fusion_passes.cli.vllm_cpu` and
:mod:`fusion_passes.cli.vllm_cpu_ops`.
"""
