"""Chains that must NOT fuse (``expect=None``), and chains whose quant must not fuse
(``expect`` is the plain norm family). Each names its source, or says "constructed" and what
it varies: a fused op here would change the numerics or drop a value the graph reads."""

from __future__ import annotations

import torch

from . import sources as S
from .harness import Case

BF16, FP16 = torch.bfloat16, torch.float16
EPS = 1e-6


def _maybe_inplace_on_a_slice(t, res, w):
    # constructed: vLLM IR's in-place norm on the first half of the all-reduced tokens; under
    # auto_functionalized_v2 its input is a slice of its base (the _x_slice_* form), which
    # the fused op (whole tensors in, whole tensors out) cannot write
    half = t.shape[0] // 2
    out, r = torch.ops.vllm_ir.fused_add_rms_norm.maybe_inplace(t[:half], res[:half], w, EPS)
    return out, r


def _gelu_between(t, res, w):
    # constructed: an activation on the reduced value before the residual add
    h = torch.nn.functional.gelu(t.float()).to(t.dtype) + res
    return S.hf_llama_rmsnorm(h, w, EPS), h


def _mean_over_tokens(t, res, w):
    # constructed: LlamaRMSNorm with the statistic over dim 0 (tokens), not the hidden dim
    h = t + res
    x = h.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(0, keepdim=True) + EPS)
    return w * x.to(h.dtype), h


def _cohere_layernorm(t, res, w):
    h = t + res
    return S.hf_cohere_layernorm(h, w), h


def _polynorm_sqrt_div(t, res, w):
    # the norm spelled x / sqrt(mean(x^2) + eps) (vLLM PolyNorm._norm) in a Llama-style block
    h = t + res
    return w * S.vllm_polynorm_norm(h.float(), EPS).to(h.dtype), h


def _eps_inside_mean(t, res, w):
    # constructed: eps added to every square before the mean: mean(x^2 + eps) rounds
    # differently from mean(x^2) + eps
    h = t + res
    x = h.float()
    x = x * torch.rsqrt((x.pow(2) + EPS).mean(-1, keepdim=True))
    return w * x.to(h.dtype), h


def _fp32_tap(t, res, w):
    # constructed: the fp32 normalized value (before the weight) is also returned, a value
    # the fused op does not produce
    h = t + res
    x = h.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)
    return w * x.to(h.dtype), h, x


def _vllm_gemma_fp16(t, res, wg):
    return S.vllm_gemma_forward_static(wg, EPS, t, res)


def _bias_add(t, b, w):
    # constructed: a broadcast bias add ([H]) where a residual would be
    h = t + b
    return S.hf_llama_rmsnorm(h, w, EPS), h


def _per_rank_scale(t, x, res, w):
    # constructed: a "static" scale computed from this rank's partial sum x: different on
    # every rank, so no fused kernel may quantize with it (AR + norm still fuse)
    h = t + res
    y = S.hf_llama_rmsnorm(h, w, EPS)
    s = (x.abs().max().to(torch.float32) / 448.0).reshape(1)
    return S.vllm_quant_fp8_static(y, s), h


def _amax_over_tokens(t, res, w):
    # constructed: QuantFP8 per-token with the amax over dim 0 (per hidden column)
    h = t + res
    y = S.hf_llama_rmsnorm(h, w, EPS)
    x_max = y.abs().amax(dim=0, keepdim=True).to(torch.float32)
    scale = (x_max / 448.0).clamp(min=1.0 / (448.0 * 512.0))
    q = (y.to(torch.float32) * scale.reciprocal()).clamp(-448.0, 448.0).to(S.FP8)
    return q, scale, h


HF = "transformers LlamaRMSNorm"
CASES = [
    Case("neg_maybe_inplace_on_a_slice", "constructed: vllm 0.33 ir.ops.fused_add_rms_norm.maybe_inplace on "
         "t[:n/2] under auto_functionalized_v2", _maybe_inplace_on_a_slice, v2=True, needs=("vllm",)),
    Case("neg_gelu_between", "constructed: gelu between all-reduce and add, " + HF, _gelu_between),
    Case("neg_mean_over_tokens", "constructed: " + HF + " with mean over dim 0", _mean_over_tokens),
    Case("neg_cohere_layernorm", "transformers 5.20.2 models/cohere CohereLayerNorm.forward", _cohere_layernorm),
    Case("neg_polynorm_sqrt_div", "vllm @00cba797 layernorm.py PolyNorm._norm (x / sqrt)", _polynorm_sqrt_div),
    Case("neg_eps_inside_mean", "constructed: rsqrt(mean(x^2 + eps))", _eps_inside_mean),
    Case("neg_fp32_tap", "constructed: the fp32 normalized value also returned", _fp32_tap),
    Case("neg_vllm_gemma_fp16", "vllm @00cba797 layernorm.py GemmaRMSNorm.forward_static (fp16 keeps the "
         "residual in fp32)", _vllm_gemma_fp16, inputs=("res", "wg"), dtype=FP16),
    Case("neg_bias_add", "constructed: broadcast bias add before " + HF, _bias_add, inputs=("w", "w")),
    Case("neg_quant_per_rank_scale", "constructed: static scale from the per-rank partial sum",
         _per_rank_scale, inputs=("x", "res", "w"), expect="allreduce_add_rmsnorm"),
    Case("neg_quant_amax_over_tokens", "constructed: QuantFP8 per-token amax over dim 0", _amax_over_tokens,
         expect="allreduce_add_rmsnorm"),
]
