"""The CPU recipe: what vLLM 0.33's CUDA wheel needs to trace (and run) models on a CPU.

Part of the command line, not library API: ``fusion-passes capture``, ``dump`` of a vLLM
model and ``bench compile`` build real vLLM models on a CPU with it (the test suite and
the end-to-end harness ``tools/testing/vllm_e2e.py`` use it too). The passes never import
it. Every patch changes process-wide vLLM state, is applied once per process and only
when a capture asks for it: do not import this module in a process that serves a model.

The patches:

* environment: ``VLLM_TARGET_DEVICE=cpu``, no hub access, no engine subprocess, vLLM's
  compile cache off (a cached compile never reaches the post-grad passes);
* ``dist.new_group`` forced to the fake backend in a fake world (one process stands in
  for every rank; collectives trace, never run);
* the platform's ``use_custom_op_collectives`` -> True: CUDA's ``torch.ops.vllm.all_reduce``;
* vLLM's CPU communicator all-reduces out of place, as the custom op's contract says;
* no shared-memory broadcaster (it waits for readers a fake world never starts);
* MoE runners on the opaque ``torch.ops.vllm.moe_forward(_shared)`` ops (CUDA's path);
* FP8: no MoE weight conversion (no FP8 MoE backend exists on CPU), Triton's block-FP8
  linear kernel for block FP8 (the CPU kernels need AMX), and vLLM's FixFunctionalization
  pass skipped where it names ops the CPU wheel lacks.
"""

from __future__ import annotations

import functools
import os

import torch

ENV = {"VLLM_TARGET_DEVICE": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CONFIGURE_LOGGING": "0"}
"""Defaults set before vLLM is imported (a value already in the environment wins)."""
FORCED_ENV = {"VLLM_DISABLE_COMPILE_CACHE": "1", "VLLM_USE_AOT_COMPILE": "1"}
"""Forced, not defaults: a compile served from vLLM's cache (~/.cache/vllm, shared by every
run on the machine) never reaches the post-grad passes, so there would be no graph. AOT
compile ON (vLLM's default path with torch >= 2.10; it turns off by default when the
cache is disabled, and the other path compiled nothing here), never loaded nor saved."""


@functools.lru_cache(maxsize=1)
def prepare_process() -> None:
    """Apply the recipe's process-wide patches (idempotent; call before vLLM is imported)."""
    for k, v in ENV.items():
        os.environ.setdefault(k, v)
    os.environ.update(FORCED_ENV)
    _fake_new_group()
    from vllm.platforms import current_platform

    type(current_platform).use_custom_op_collectives = classmethod(lambda cls: True)  # as CUDA
    _out_of_place_cpu_all_reduce()
    from vllm.distributed.device_communicators import shm_broadcast

    shm_broadcast.MessageQueue.create_from_process_group = staticmethod(lambda *a, **k: None)
    _opaque_moe()


def _fake_new_group() -> None:
    import torch.distributed as dist

    if getattr(dist.new_group, "_fusion_passes_fake", False):
        return
    original = dist.new_group

    def new_group(*args, **kwargs):
        if dist.get_backend() == "fake":  # every group of a fake world is fake
            kwargs["backend"] = "fake"
        return original(*args, **kwargs)

    new_group._fusion_passes_fake = True
    dist.new_group = new_group


def _out_of_place_cpu_all_reduce() -> None:
    from vllm.distributed.device_communicators.cpu_communicator import CpuCommunicator

    def all_reduce_out_of_place(self, input_):
        # The custom op's contract (and CUDA's communicators): a NEW tensor. vLLM's CPU
        # communicator reduces in place and returns its input, which Inductor (told the op
        # is functional) may then overwrite by reusing the input's buffer. Matters only when
        # the graph runs (vllm_e2e); tracing never calls it.
        out = input_.clone()
        self.dist_module.all_reduce(out, group=self.device_group)
        return out

    CpuCommunicator.all_reduce = all_reduce_out_of_place


def _opaque_moe() -> None:
    from vllm.model_executor.layers.fused_moe.runner import moe_runner

    def select_forward(self):  # CUDA's choice: the opaque custom ops
        return torch.ops.vllm.moe_forward if self._shared_experts is None else torch.ops.vllm.moe_forward_shared

    moe_runner.MoERunner._select_forward = select_forward
    if not hasattr(torch.ops._C, "prepack_moe_weight"):
        # the CUDA wheel on CPU has no CPU MoE kernels: skip their weight prepacking (the
        # experts stay behind the opaque moe_forward op, which tracing never runs)
        from vllm.model_executor.layers.fused_moe.experts import cpu_moe

        cpu_moe.CPUUnquantizedExperts.process_weights_after_loading = lambda self, layer: None


@functools.lru_cache(maxsize=1)
def prepare_fp8() -> None:
    """What every FP8 checkpoint needs here: vLLM's ``_C`` quant ops (weight loading runs
    them; :mod:`.vllm_cpu_ops`), and no FP8 MoE weight conversion. There is no FP8 MoE
    backend on CPU ("Unsupported FP8 MoE backend: NONE"); the experts sit behind the opaque
    ``moe_forward(_shared)`` op, which tracing never runs, so the conversion is skipped.
    None of it touches the graph around the norms."""
    from vllm.model_executor.layers.quantization.fp8 import Fp8MoEMethod

    from fusion_passes.cli.vllm_cpu_ops import register_c_quant_ops

    if not register_c_quant_ops():
        raise RuntimeError("vLLM's _C quant ops are missing (its CUDA extension does not load here) and could "
                           "not be registered from the vLLM 0.33 wheel's schemas (fusion_passes/cli/vllm_cpu_ops.py)")
    Fp8MoEMethod.process_weights_after_loading = lambda self, layer: None


@functools.lru_cache(maxsize=1)
def prepare_block_fp8() -> None:
    """The block-FP8 linear kernel: vLLM's CPU kernels need AMX tiles
    ("CPUFp8W8A8BlockScaledMMKernel requires AMX tile support"); take vLLM's own
    ``TritonFp8BlockScaledMMKernel`` (ROCm's and XPU's choice; its GEMM is the opaque
    ``vllm.w8a8_triton_block_scaled_mm_func``), whose input quant is
    ``QuantFP8(dynamic, GroupShape(1, 128), use_ue8m0=False)``, row-major scales."""
    from vllm.model_executor.kernels.linear import _POSSIBLE_FP8_BLOCK_KERNELS
    from vllm.model_executor.kernels.linear.scaled_mm.triton import TritonFp8BlockScaledMMKernel
    from vllm.platforms import PlatformEnum

    class TritonBlockFp8(TritonFp8BlockScaledMMKernel):
        @classmethod
        def is_supported(cls, compute_capability=None):
            return True, None

    _POSSIBLE_FP8_BLOCK_KERNELS[PlatformEnum.CPU] = [TritonBlockFp8]


def patch_cpu_wheel_for_compile() -> None:
    """vLLM's FixFunctionalizationPass names ``torch.ops._C.rotary_embedding``, absent from the
    CUDA wheel running on CPU; it has nothing to fix in these graphs, so skip it there."""
    from vllm.compilation.passes.utility import fix_functionalization as ff

    if hasattr(torch.ops._C, "rotary_embedding") or getattr(ff.FixFunctionalizationPass, "_fp_patched", False):
        return
    ff.FixFunctionalizationPass.__call__ = lambda self, graph: None
    ff.FixFunctionalizationPass._fp_patched = True
