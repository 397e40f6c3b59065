"""Real vLLM model layers on real ranks: compiled with and without fusion-passes, compared.

Each of ``world_size`` gloo processes builds the same tiny vLLM model twice (dummy
weights from one seed, so both copies hold the same shards), compiles one with vLLM's
Inductor backend as it is and the other with :class:`fusion_passes.vllm.VllmFusionPass`
in its pass manager (the fused op on the reference backend: vLLM's own all-reduce, then
the unfused math), runs both on the same tokens and returns the hidden states. The
recipe is :mod:`fusion_passes.cli.capture`'s (and :mod:`fusion_passes.cli.vllm_cpu`'s), with a real gloo
world in place of the fake one; the forward is the profile-run style of
:func:`fusion_passes.cli.capture.run_model` (no attention metadata). Test harness, not
installed (see the package docstring).

Attention: the CUDA wheel has no CPU attention kernels (``ops.cpu_attn_*``), and without
metadata vLLM's CPU attention returns its output buffer unwritten. Here each token is a
one-token prompt: causal attention over a single key is exactly its value (softmax of one
logit is 1), so :func:`_one_token_prompts` writes ``v`` (repeated over the query heads of
each KV head) into the buffer. Everything else is vLLM's code.

    from tools.testing.vllm_e2e import run
    result = run("llama", world_size=2)   # one dict per rank

Costs two cold Inductor compiles per rank (about a minute each for 2 layers on CPU).
"""

from __future__ import annotations

import os
import tempfile

import torch

TOKENS = 13  # odd, and unlike capture.TOKENS: a second dynamic size


def _one_token_prompts() -> None:
    """Attention of one-token prompts when vLLM runs without metadata (module docstring)."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    original = CPUAttentionBackendImpl.forward
    if getattr(original, "_fusion_passes", False):
        return

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        if attn_metadata is not None:
            return original(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        tokens = query.shape[0]
        v = value.reshape(tokens, self.num_kv_heads, self.head_size)  # [T, kv heads, D] in any layout
        out = v.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)  # each query head's KV head
        output.reshape(tokens, -1).copy_(out.reshape(tokens, -1))
        return output

    forward._fusion_passes = True
    CPUAttentionBackendImpl.forward = forward


def _worker(rank: int, model: str, layers: int, dtype: str, world_size: int) -> dict:
    import torch.distributed as dist

    from fusion_passes.cli import capture
    from fusion_passes.cli import vllm_cpu
    from fusion_passes.cli.tiny_configs import write_config

    vllm_cpu.prepare_process()  # the CPU recipe's environment, before vLLM is imported
    vllm_cpu.patch_cpu_wheel_for_compile()  # a full compile, not a capture: see there
    _one_token_prompts()
    from vllm.config import set_current_vllm_config
    from vllm.distributed import parallel_state as ps

    from fusion_passes.vllm import VllmFusionPass

    reports: list = []

    class Recorded(VllmFusionPass):
        def __call__(self, graph) -> None:
            super().__call__(graph)
            reports.append(self.report)

    outs = {}
    with tempfile.TemporaryDirectory(prefix="fusion-passes-e2e-") as root:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(root, "inductor")  # per rank, cold
        path = write_config(model, layers, dtype, None, root)
        for name, post_pass in (("unfused", None), ("fused", Recorded())):
            torch._dynamo.reset()
            cfg = capture.engine_config(path, world_size, dtype, post_pass)
            with set_current_vllm_config(cfg):
                if not ps.model_parallel_is_initialized():
                    ps.init_distributed_environment(world_size=world_size, rank=rank, local_rank=rank,
                                                    backend="gloo")
                    ps.ensure_model_parallel_initialized(world_size, 1)
            net = capture.build_model(cfg)
            out = capture.run_model(net, cfg, TOKENS)
            outs[name] = (out[0] if isinstance(out, tuple) else out).float()  # bf16 values, exact in fp32
    dist.barrier()
    fused_sites = [s.to_dict() for r in reports for s in r.sites]
    fused, unfused = outs["fused"], outs["unfused"]
    # one unit in the last place of bf16 at each unfused value (8 significant bits)
    ulp = torch.exp2(torch.floor(torch.log2(unfused.abs().clamp_min(2.0**-126))) - 7)
    return {
        "rank": rank,
        "max_abs_diff": float((fused - unfused).abs().max()),
        "max_ulps": float(((fused - unfused).abs() / ulp).max()),
        "fraction_equal": float((fused == unfused).float().mean()),
        "equal": bool(torch.equal(outs["fused"], outs["unfused"])),
        "finite": bool(torch.isfinite(outs["fused"]).all()),
        "shape": tuple(outs["fused"].shape),
        "sites": fused_sites,
        "errors": [e for r in reports for e in r.errors],
        "out_norm": float(outs["unfused"].norm()),
    }


def run(model: str = "llama", world_size: int = 2, layers: int = 2, dtype: str = "bfloat16") -> list[dict]:
    """Per rank: the fused-vs-unfused comparison of *model* on *world_size* gloo processes."""
    from fusion_passes.cli import hf_tp

    return hf_tp.spawn(_worker, world_size, model, layers, dtype, world_size)


__all__ = ["run", "TOKENS"]
