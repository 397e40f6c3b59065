"""Real Hugging Face transformers models with tensor parallelism on CPU processes.

Tiny RANDOM models, built with the transformers config classes and written with
``save_pretrained`` into a local folder (no download, HF_HUB_OFFLINE=1), loaded with
``tp_plan="auto"`` on ranks that talk over gloo (one process per rank on this machine).

:func:`save_tiny` writes a model (:func:`tiny_model`: into a temporary folder removed
afterwards); :func:`spawn` runs a worker function on N processes and returns each rank's
result; :func:`load_tp` loads a saved model sharded over the current process group;
:func:`trace_hf` captures a model's post-grad graphs before and after our pass.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from typing import Any, Callable, Iterator

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _llama():
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=2, vocab_size=256, max_position_embeddings=64, rms_norm_eps=1e-6,
    )


def _deepseek_v3():
    """Layer 0 dense MLP, layer 1 MoE (routed + shared experts, reduced separately)."""
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2,
        n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=None,
        kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16,
        vocab_size=256, max_position_embeddings=64, rms_norm_eps=1e-6,
    )


def _qwen3_moe():
    """Every layer MoE (decoder_sparse_step 1), no shared expert."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=4,
        num_experts_per_tok=2, decoder_sparse_step=1, vocab_size=256,
        max_position_embeddings=64, rms_norm_eps=1e-6,
    )


# name -> config builder. Sizes: the smallest that still shard at TP 2 and 4 (heads,
# kv heads and intermediate divisible by 4) so a model loads and compiles in seconds.
MODELS: dict[str, Callable[[], Any]] = {"llama": _llama, "deepseek_v3": _deepseek_v3, "qwen3_moe": _qwen3_moe}


def save_tiny(name: str, directory: str, seed: int = 0) -> str:
    """Write tiny random model *name* (a key of :data:`MODELS`) to *directory*."""
    from transformers import AutoModelForCausalLM

    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(MODELS[name]())
    model.save_pretrained(directory)
    return directory


def load_tp(directory: str, dtype: torch.dtype):
    """Load *directory* sharded over the default process group with the model's tp_plan."""
    from transformers import AutoModelForCausalLM

    try:
        from transformers.distributed import DistributedConfig

        model = AutoModelForCausalLM.from_pretrained(
            directory, distributed_config=DistributedConfig(tp_plan="auto"), dtype=dtype
        )
    except (ImportError, TypeError):  # older transformers spelling
        model = AutoModelForCausalLM.from_pretrained(directory, tp_plan="auto", dtype=dtype)
    return model.eval()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args, results):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # two ranks share two cores
    # One Inductor cache per rank: two ranks compiling the same kernel into one cache
    # directory race ("file too short" on load). Removed when the rank ends.
    with tempfile.TemporaryDirectory(prefix=f"fusion-passes-inductor-r{rank}-") as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        dist.init_process_group("gloo", rank=rank, world_size=world)
        try:
            results[rank] = fn(rank, *args)
        finally:
            dist.destroy_process_group()


def spawn(fn: Callable, world_size: int = 2, *args) -> list:
    """Run ``fn(rank, *args)`` on *world_size* processes joined by gloo on 127.0.0.1.

    *fn* must be importable (module level). Returns each rank's (picklable) result;
    an exception on any rank is raised here.
    """
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_entry, args=(world_size, free_port(), fn, args, results), nprocs=world_size)
        return [results[r] for r in range(world_size)]


def tiny_dir(name: str) -> str:
    """A fresh temporary folder holding tiny model *name* (the caller removes it; see
    :func:`tiny_model` for one that is removed automatically)."""
    return save_tiny(name, tempfile.mkdtemp(prefix=f"fusion-passes-{name}-"))


@contextlib.contextmanager
def tiny_model(name: str) -> Iterator[str]:
    """``with tiny_model("llama") as directory:`` tiny model *name* in a temporary folder
    that is removed when the block ends."""
    with tempfile.TemporaryDirectory(prefix=f"fusion-passes-{name}-") as directory:
        yield save_tiny(name, directory)


def _capture_worker(rank: int, directory: str, dtype: str, tokens: int) -> list[dict]:
    """On each gloo rank: load with tp_plan, compile full-graph, capture every post-grad
    graph before and after FusionPass (text + report). Rank 0's result is kept."""
    from fusion_passes import FusionPass, _compat
    from fusion_passes.cli.capture import snapshot

    inductor_config = _compat.inductor_config

    model = load_tp(directory, getattr(torch, dtype))
    for module in model.modules():  # Qwen3-MoE's plan hooks q/k norms for backward: inference only
        if getattr(module, "_backward_hooks", None):
            module._backward_hooks.clear()
    out: list[dict] = []

    class Capture(_compat.CustomGraphPass):
        def __call__(self, graph):
            before = snapshot(graph).print_readable(print_output=False)
            fusion = FusionPass()
            fusion(graph)
            out.append({"before": before, "after": snapshot(graph).print_readable(print_output=False),
                        "report": fusion.report.to_dict(), "summary": fusion.report.summary()})

        def uuid(self):
            return None  # never cached: we want to see the graph

    ids = torch.arange(tokens).view(1, tokens) % 64
    with inductor_config.patch(post_grad_custom_post_pass=Capture(), fx_graph_cache=False), torch.no_grad():
        torch.compile(model, fullgraph=True)(ids)
    return out if rank == 0 else []


def trace_hf(model: str, dtype: str = "bfloat16", world_size: int = 2, tokens: int = 16) -> list[dict]:
    """HF transformers *model* (a key of :data:`MODELS`) loaded with ``tp_plan="auto"`` on
    *world_size* gloo processes: per post-grad graph, its text before and after FusionPass
    and the report (rank 0). Costs about a minute per model."""
    with tiny_model(model) as directory:
        return spawn(_capture_worker, world_size, directory, dtype, tokens)[0]
