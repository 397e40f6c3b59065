"""Hugging Face decoders for ``bench model``: real transformers code, random weights, no download.

* :data:`SHAPES`: a dense Llama-3-8B-shaped config and a Qwen3-30B-A3B-shaped MoE config
  (every layer MoE, 128 experts, top 8), built with the transformers config classes; the
  layer count is the caller's. :data:`TINY` holds the same families at toy sizes (CPU
  dry runs, tests).
* :func:`reduce_explicitly`: the one-GPU form. HF's tensor-parallel plan puts no
  all-reduce in a one-rank graph, so the row-parallel outputs (``o_proj``, the dense
  ``down_proj`` or the MoE ``experts``) get ``_c10d_functional.all_reduce`` + ``wait_tensor``
  over a one-rank group through forward hooks: the sites exist, the math is unchanged.
* :func:`to_fp8`: FP8 weights (per output channel) and activations quantized per token
  into ``torch._scaled_mm``. ``kind="vllm"``: :class:`Fp8Linear`, whose quant is written as
  vLLM's native ``QuantFP8`` (PER_TOKEN) writes it, which fusion-passes recognizes;
  ``kind="hf"``: transformers' own ``CompressedTensorsFP8Linear`` (its
  ``quantize_fp8_per_row``, another spelling). Decoder linears only: the router, the MoE
  experts (grouped GEMM) and ``lm_head`` stay bf16.
* :func:`reference`: the fp32 eager reference of the same weights (FP8 weights
  dequantized, activations unquantized, MoE experts by transformers' eager loop).
* :func:`make_cache`: a ``StaticCache`` whose layers do not advance on a step, so one step
  can be captured in a CUDA graph and replayed (:class:`ReplayStaticLayer`).
"""

from __future__ import annotations

import contextlib
import os
import types

import torch
from torch import nn

from fusion_passes import _compat

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Llama-3-8B (meta-llama/Meta-Llama-3-8B config.json) and Qwen3-30B-A3B (Qwen/Qwen3-30B-A3B
# config.json; 48 layers there): only num_hidden_layers is the caller's.
SHAPES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(
        hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
        vocab_size=128256, rms_norm_eps=1e-5, max_position_embeddings=8192, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
    "qwen3_moe": ("Qwen3MoeConfig", dict(
        hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
        num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936, rms_norm_eps=1e-6,
        max_position_embeddings=40960, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
}
# Toy sizes of the same families (heads and KV heads divisible by 2 for TP 2 dry runs).
TINY: dict[str, dict] = {
    "llama": dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=512),
    "qwen3_moe": dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_experts=8,
                      num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                      vocab_size=512),
}
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
FP8_MIN_SCALE = 1.0 / (FP8_MAX * 512)  # vLLM's _FP8_MIN_SCALING_FACTOR (input_quant_fp8.py)


def config(name: str, layers: int, tiny: bool = False):
    """The transformers config of model *name* with *layers* decoder layers."""
    import transformers

    if name not in SHAPES:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(SHAPES)}")
    cls, kwargs = SHAPES[name]
    kwargs = {**kwargs, **(TINY[name] if tiny else {}), "num_hidden_layers": layers}
    return getattr(transformers, cls)(**kwargs)


def build(name: str, layers: int, *, tiny: bool = False, device: str = "cpu", dtype=torch.bfloat16,
          seed: int = 0, init: bool = True) -> nn.Module:
    """A random *name* model on *device*: transformers' own init (normal, std 0.02) with the
    RMSNorm weights drawn from U(0.5, 1.5) so the weight multiply matters. ``init=False``
    leaves memory uninitialized (tracing only: no value is read)."""
    from transformers import AutoModelForCausalLM

    cfg = config(name, layers, tiny)
    torch.manual_seed(seed)
    if init:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    else:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        model = model.to_empty(device=device)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if init and p.dim() == 1 and pname.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.eval()


def decoder_layers(model) -> list[nn.Module]:
    return list(model.model.layers)


def row_parallel_outputs(model) -> list[nn.Module]:
    """The modules whose outputs a tensor-parallel decoder all-reduces: per layer the
    attention's ``o_proj`` and the dense ``down_proj`` or the MoE ``experts``."""
    out = []
    for layer in decoder_layers(model):
        out.append(layer.self_attn.o_proj)
        out.append(layer.mlp.experts if hasattr(layer.mlp, "experts") else layer.mlp.down_proj)
    return out


def reduce_explicitly(model, group_name: str) -> list:
    """Hook ``_c10d_functional.all_reduce(out, "sum", group_name)`` + ``wait_tensor`` onto
    every row-parallel output; returns the hook handles (``h.remove()`` undoes it)."""
    c10d = torch.ops._c10d_functional

    def hook(module, args, out):
        return c10d.wait_tensor(c10d.all_reduce(out, "sum", group_name))

    return [m.register_forward_hook(hook) for m in row_parallel_outputs(model)]


# --------------------------------------------------------------------------- FP8


def quant_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token FP8 exactly as vLLM's ``QuantFP8.forward_native`` (PER_TOKEN) writes
    it: amax of |x| over the last dim, upcast, / fp8_max, floored; ``x32 * (1/scale)``."""
    amax = x.abs().amax(dim=-1).unsqueeze(-1).to(torch.float32)
    scale = (amax / FP8_MAX).clamp(min=FP8_MIN_SCALE)
    q = (x.to(torch.float32) * scale.reciprocal()).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


class Fp8Linear(nn.Linear):
    """FP8 weight [out, in] with per-output-channel scales, activations per token
    (:func:`quant_per_token` on the input as it comes, ``[..., in]``), ``torch._scaled_mm``.
    With ``reference`` set: fp32 ``x @ dequantized(W).T`` (the numerics oracle, eager only)."""

    reference = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reference:
            return nn.functional.linear(x.float(), self.weight.float() * self.weight_scale.t())
        q, scale = quant_per_token(x)
        out = _compat.scaled_mm(q.reshape(-1, q.shape[-1]), self.weight.t(), scale_a=scale.reshape(-1, 1),
                               scale_b=self.weight_scale, out_dtype=x.dtype)
        return out.reshape(*x.shape[:-1], out.shape[-1])


def _hf_fp8_class():
    from transformers.integrations.compressed_tensors import CompressedTensorsFP8Linear

    class HfFp8Linear(CompressedTensorsFP8Linear):
        """transformers' compressed-tensors FP8 linear; ``reference`` as :class:`Fp8Linear`."""

        reference = False

        def forward(self, x):
            if self.reference:
                return nn.functional.linear(x.float(), self.weight.float() * self.weight_scale.t())
            return super().forward(x)

    return HfFp8Linear


def _fp8_targets(model) -> list[nn.Module]:
    out = []
    for layer in decoder_layers(model):
        attn = layer.self_attn
        out += [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj]
        if not hasattr(layer.mlp, "experts"):
            out += [layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj]
    return out


def to_fp8(model, kind: str = "vllm") -> int:
    """Turn the decoder linears into FP8 linears in place (module objects, hooks and HF's
    tensor-parallel forwards kept); returns how many. Weight scales per output channel of
    this rank's shard."""
    if kind not in ("vllm", "hf"):
        raise ValueError(f"FP8 linear kind must be 'vllm' or 'hf', got {kind!r}")
    cls = Fp8Linear if kind == "vllm" else _hf_fp8_class()
    targets = _fp8_targets(model)
    for m in targets:
        w = m.weight.detach()
        w = (w.to_local() if hasattr(w, "to_local") else w).float()
        scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
        m.weight = nn.Parameter((w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), requires_grad=False)
        if kind == "vllm":
            m.register_buffer("weight_scale", scale.t().contiguous())
        else:
            m.weight_scale = nn.Parameter(scale.t().contiguous(), requires_grad=False)
            m.has_bias = False
        m.__class__ = cls
        _rebind_tp_forward(m)
    return len(targets)


def _rebind_tp_forward(module: nn.Module) -> None:
    """HF's tensor-parallel plan wraps ``module.forward`` in a closure around the bound
    forward of the class it had then; point that closure at the new class's forward."""
    wrapper = module.__dict__.get("forward")
    for cell in getattr(wrapper, "__closure__", None) or ():
        bound = cell.cell_contents
        if isinstance(bound, types.MethodType) and bound.__self__ is module:
            cell.cell_contents = types.MethodType(type(module).forward, module)


# --------------------------------------------------------------------------- reference


def cast_params_(model, dtype: torch.dtype) -> None:
    """Cast the floating-point parameters between bf16 and fp32 in place (new Parameter
    objects; FP8 weights and their fp32 scales untouched). bf16 -> fp32 -> bf16 is exact."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or p.dtype not in (torch.bfloat16, torch.float32) or name == "weight_scale":
                continue
            module._parameters[name] = nn.Parameter(p.detach().to(dtype), requires_grad=False)


@contextlib.contextmanager
def reference(model, dtype: torch.dtype = torch.bfloat16):
    """Inside: the model computes in fp32 eagerly (FP8 linears on dequantized weights, MoE
    experts by the eager loop, no TF32). On exit: back to *dtype* and the grouped GEMM."""
    fp8 = [m for m in model.modules() if hasattr(m, "reference") and isinstance(m, nn.Linear)]
    configs = {id(m.config): m.config for m in model.modules() if hasattr(getattr(m, "config", None),
                                                                           "_experts_implementation")}
    saved = {k: c._experts_implementation for k, c in configs.items()}
    tf32 = torch.backends.cuda.matmul.allow_tf32
    cast_params_(model, torch.float32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        for m in fp8:
            m.reference = True
        for c in configs.values():
            if c._experts_implementation is not None:
                c._experts_implementation = "eager"
        yield model
    finally:
        for m in fp8:
            m.reference = False
        for k, c in configs.items():
            c._experts_implementation = saved[k]
        torch.backends.cuda.matmul.allow_tf32 = tf32
        cast_params_(model, dtype)


# --------------------------------------------------------------------------- KV cache and a step


def _replay_layer_class():
    from transformers.cache_utils import StaticLayer

    class ReplayStaticLayer(StaticLayer):
        """``StaticLayer`` whose ``update`` writes the step's keys and values at its
        ``cumulative_length`` without advancing it: every replay of a captured step writes
        the same cache slots (transformers' own layer advances, so a replayed graph would
        run past the cache)."""

        def update(self, key_states, value_states, *args, **kwargs):
            pos = torch.arange(key_states.shape[-2], device=self.device) + self.cumulative_length
            self.keys.index_copy_(2, pos, key_states)
            self.values.index_copy_(2, pos, value_states)
            return self.keys, self.values

    return ReplayStaticLayer


def make_cache(model, batch: int, max_len: int, start: int, dtype: torch.dtype, device, world: int = 1,
               seed: int = 0, like=None):
    """A replayable ``StaticCache`` of *batch* sequences that already hold *start* tokens:
    random keys and values (from *seed*), or those of cache *like* converted to *dtype*."""
    from transformers import StaticCache

    cfg = model.config
    cache = StaticCache(config=cfg, max_cache_len=max_len)
    replay = _replay_layer_class()
    for layer in cache.layers:
        layer.__class__ = replay
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    cache.early_initialization(batch, cfg.num_key_value_heads // world, head_dim, dtype, torch.device(device))
    gen = None if like is not None else torch.Generator(device=device).manual_seed(seed)
    for i, layer in enumerate(cache.layers):
        for name in ("keys", "values"):
            t = getattr(layer, name)
            if like is None:
                t.copy_(torch.randn(t.shape, generator=gen, device=device, dtype=torch.float32))
            else:
                t.copy_(getattr(like.layers[i], name))
        layer.cumulative_length.fill_(start)
    return cache


def token_ids(batch: int, seq: int, vocab: int, device) -> torch.Tensor:
    """Deterministic token ids ``[batch, seq]``."""
    return (torch.arange(batch * seq, device=device) * 7919 % vocab).view(batch, seq)


def step(model, ids: torch.Tensor, cache) -> torch.Tensor:
    """One forward step; the logits of each sequence's last token ``[batch, 1, vocab]``."""
    return model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
