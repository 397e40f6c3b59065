"""Tiny random configs of real vLLM architectures, what ``capture`` traces.

Each is the model's own transformers config class with small sizes, written as a
``config.json`` that vLLM loads with dummy weights (no download). This module imports
neither torch nor vLLM at import time: the command line reads its choices from here.
"""

from __future__ import annotations

import os
import pathlib

MODELS = ("llama", "deepseek_v3", "qwen3_moe", "mixtral", "gemma3")
"""Models :func:`fusion_passes.cli.capture.trace_vllm` knows."""
DTYPES = ("bfloat16", "float16")
"""Activation dtypes the tiny models are traced in."""
QUANTS = (None, "fp8_static", "fp8_dynamic", "fp8_block")
"""FP8 checkpoint formats (vLLM's ``fp8`` method); ``None`` is an unquantized model."""
QUANT_NAMES = tuple(q or "none" for q in QUANTS)
""":data:`QUANTS` as the command line spells them."""
TP_SIZES = (2, 4, 8)
"""Tensor-parallel sizes the tiny configs shard at: every model has 8 attention (and KV)
heads, so TP must divide 8; at TP 1 vLLM emits no all-reduce."""
BLOCK_FP8_MAX_TP = 2
"""Largest TP for ``fp8_block``: vLLM requires every weight shard to be whole 128 x 128
blocks (``fp8_utils.validate_fp8_block_shape``). The tiny configs' 256-wide row-parallel
inputs (attention output, DeepSeek-V3's expert intermediate size) split into whole blocks
only up to TP 2; at TP 4 llama and deepseek_v3 fail with "Weight
input_size_per_partition = 64 is not divisible by weight quantization block_k = 128"
(traced on CPU with vLLM 0.33)."""
HIDDEN = 256
"""Hidden size: tiny, but a multiple of block FP8's 128 and of 8 ranks x 8 lanes."""


def unsupported(model: str, tp: int, quant: str | None) -> str | None:
    """Why *model* cannot be traced at *tp* with *quant* (``None`` when it can)."""
    if model not in MODELS:
        return f"unknown model {model!r}; known: {', '.join(MODELS)}"
    if tp not in TP_SIZES:
        return f"tp {tp} is not one of {', '.join(map(str, TP_SIZES))} (the tiny models have 8 heads)"
    if quant not in QUANTS:
        return f"unknown quant {quant!r}; known: {', '.join(QUANT_NAMES)}"
    if quant == "fp8_block" and tp > BLOCK_FP8_MAX_TP:
        return (f"fp8_block traces at tp <= {BLOCK_FP8_MAX_TP} only: at tp {tp} the tiny models' weight shards "
                "are not whole 128 x 128 blocks")
    return None


def hf_config(model: str, layers: int, dtype: str):
    """A transformers config object of *model*'s real architecture, tiny and random."""
    common = dict(hidden_size=HIDDEN, num_hidden_layers=layers, vocab_size=512, max_position_embeddings=512,
                  torch_dtype=dtype)
    build = {"llama": _llama, "mixtral": _mixtral, "qwen3_moe": _qwen3_moe, "deepseek_v3": _deepseek_v3,
             "gemma3": _gemma3}.get(model)
    if build is None:
        raise ValueError(f"unknown model {model!r}; known: {', '.join(MODELS)}")
    return build(common)


def _llama(common: dict):
    from transformers import LlamaConfig

    return LlamaConfig(intermediate_size=512, num_attention_heads=8, num_key_value_heads=8,
                       architectures=["LlamaForCausalLM"], **common)


def _mixtral(common: dict):
    from transformers import MixtralConfig

    return MixtralConfig(intermediate_size=512, num_attention_heads=8, num_key_value_heads=8,
                         num_local_experts=4, num_experts_per_tok=2, architectures=["MixtralForCausalLM"], **common)


def _qwen3_moe(common: dict):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(intermediate_size=512, moe_intermediate_size=256, num_attention_heads=8,
                          num_key_value_heads=8, head_dim=32, num_experts=4, num_experts_per_tok=2,
                          decoder_sparse_step=1, mlp_only_layers=[], architectures=["Qwen3MoeForCausalLM"], **common)


def _deepseek_v3(common: dict):
    from transformers import DeepseekV3Config

    # first_k_dense_replace=1: layer 0 has a dense MLP, the rest are MoE (as the real model);
    # moe_intermediate_size 256: at TP=2 each shard of the shared experts' down_proj is
    # one whole 128-block, as block FP8 requires (fp8_utils.validate_fp8_block_shape)
    return DeepseekV3Config(intermediate_size=512, moe_intermediate_size=256, num_attention_heads=8,
                            num_key_value_heads=8, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                            n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=128, kv_lora_rank=128,
                            qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32, routed_scaling_factor=2.5,
                            architectures=["DeepseekV3ForCausalLM"], **common)


def _gemma3(common: dict):
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(intermediate_size=512, num_attention_heads=8, num_key_value_heads=8, head_dim=32,
                            sliding_window=64, architectures=["Gemma3ForCausalLM"], **common)


def quant_config(quant: str | None) -> dict | None:
    """The ``quantization_config`` of an FP8 checkpoint (vLLM's ``fp8`` method)."""
    if quant is None:
        return None
    if quant == "fp8_static":
        return {"quant_method": "fp8", "activation_scheme": "static"}
    if quant == "fp8_dynamic":
        return {"quant_method": "fp8", "activation_scheme": "dynamic"}
    if quant == "fp8_block":
        return {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    raise ValueError(f"unknown quant {quant!r}; known: {', '.join(QUANT_NAMES)}")


def write_config(model: str, layers: int, dtype: str, quant: str | None, root: str | os.PathLike) -> pathlib.Path:
    """Write *model*'s tiny ``config.json`` under *root*; returns the model directory."""
    cfg = hf_config(model, layers, dtype)
    if (q := quant_config(quant)) is not None:
        cfg.quantization_config = q
    path = pathlib.Path(root, f"{model}-{layers}l-{dtype}-{quant or 'none'}")
    cfg.save_pretrained(path)
    return path
