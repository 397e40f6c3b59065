"""HELD-OUT part of the corpus: fusable chains written down from their sources BEFORE the
recognizer was designed, and never run or looked at while designing or tuning it. They
measure how well recognition by meaning generalizes to spellings it was not shown
(issue 16's target: >= 95% fuse completely, with exact numerics). Do not tune the
recognizer against a failure here; add the spelling to :mod:`.design` instead and keep this
part's number honest.

First measurement, before anything was changed because of this part: 12 of 13 fused
completely with exact numerics on two gloo ranks (92%). The miss: ``sglang_input_to_float8``
(its ``aminmax`` decomposes to ``amin`` / ``amax`` over every dim, which the quant reading
did not take for a per-tensor reduction). That spelling went to the design part
(``hf_llama_sglang_input_to_float8``) and was handled there; the case here then passes too,
but the honest held-out figure stays 12/13."""

from __future__ import annotations

import torch

from . import sources as S
from .harness import Case

BF16, FP16, F32 = torch.bfloat16, torch.float16, torch.float32
ADD = "allreduce_add_rmsnorm"
NO_RES = "allreduce_rmsnorm"
EPS = 1e-6


def _megatron(t, res, w):
    h = t + res
    return S.megatron_rmsnorm(h, w, EPS), h


def _torchtitan_fp32_weight(t, res, w32):
    # torchtitan keeps the norm weight in fp32 (nn.Parameter(torch.ones(dim))): the bf16
    # output times it promotes to fp32
    h = t + res
    return S.torchtitan_rmsnorm(h, w32, EPS), h


def _t5(t, res, w):
    h = t + res
    return S.hf_t5_layernorm(h, w, EPS), h


def _olmo2(t, res, w):
    h = t + res
    return S.hf_olmo2_rmsnorm(h, w, EPS), h


def _sglang_gemma3_embedding(t, wg):
    return S.sglang_gemma3_rmsnorm(t, wg, EPS), t


def _sglang_gemma_group(t, res, wg):
    y, res = S.sglang_gemma_forward_native(t, res, wg, EPS)
    return (*S.sglang_native_per_token_group_quant_fp8(y, 128), res)


def _vllm_ir_native_fp32_weight_ub(t, res, w32, ub):
    y, res = S.vllm_ir_fused_add_rms_norm_native(t, res, w32, EPS)
    return (*S.vllm_quant_fp8_per_token(y, ub), res)


def _torchao_rowwise_pow2(t, res, w):
    # torchao's "rowwise" Float8LinearConfig recipe sets round_scales_to_power_of_2=True
    h = t + res
    y = S.torchtitan_rmsnorm(h, w, EPS)
    return (*S.torchao_float8_training(y, rowwise=True, round_scales_to_power_of_2=True), h)


def _torchao_inference_tensor(t, res, w):
    h = t + res
    y = S.megatron_rmsnorm(h, w, EPS)
    return (*S.torchao_float8_inference(y, rowwise=False), h)


def _sglang_input_to_float8(t, res, w):
    y, res = S.sglang_forward_native(t, res, w, EPS)
    return (*S.sglang_input_to_float8(y), res)


def _c_rms_norm_embedding(t, w):
    # vllm-project/vllm @00cba797, layernorm.py rms_norm -> ops.rms_norm(out, x, weight, eps)
    out = torch.empty_like(t)
    torch.ops._C.rms_norm(out, t, w, EPS)
    return out, t


def _hf_fp16_group64_ue8m0(t, res, w):
    h = t + res
    y = S.hf_llama_rmsnorm(h, w, EPS)
    return (*S.vllm_quant_fp8_group(y, 64, use_ue8m0=True), h)


def _fp32_rms_norm_per_token(t, res, w):
    h = t + res
    y = S.torch_rms_norm(h, w, EPS)
    return (*S.vllm_quant_fp8_per_token(y), h)


CASES = [
    Case("megatron_legacy", "Megatron-LM @00caa53a megatron/legacy/model/rms_norm.py RMSNorm.forward",
         _megatron, expect=ADD, held_out=True),
    Case("torchtitan_fp32_weight", "torchtitan @026e23a9 torchtitan/models/norms.py RMSNorm.forward",
         _torchtitan_fp32_weight, inputs=("res", "w32"), expect=ADD, held_out=True),
    Case("hf_t5_layernorm", "transformers 5.20.2 models/t5/modeling_t5.py T5LayerNorm.forward", _t5,
         expect=ADD, held_out=True),
    Case("hf_olmo2", "transformers 5.20.2 models/olmo2/modeling_olmo2.py Olmo2RMSNorm.forward", _olmo2,
         expect=ADD, held_out=True),
    Case("sglang_gemma3_embedding", "sglang @000fc1a8 srt/layers/layernorm.py Gemma3RMSNorm.forward",
         _sglang_gemma3_embedding, inputs=("wg",), expect=NO_RES, held_out=True),
    Case("sglang_gemma_group128", "sglang @000fc1a8 layernorm.py GemmaRMSNorm.forward_native + "
         "test_fp8_kernel.py native_per_token_group_quant_fp8", _sglang_gemma_group, inputs=("res", "wg"),
         expect=ADD + "_fp8_per_group", held_out=True),
    Case("vllm_ir_native_fp32_weight_ub", "vllm 0.33 vllm/ir/ops/layernorm.py fused_add_rms_norm (native) + "
         "QuantFP8.forward_native per token with scale_ub", _vllm_ir_native_fp32_weight_ub,
         inputs=("res", "w32", "ub"), expect=ADD + "_fp8_per_token", held_out=True),
    Case("torchao_rowwise_pow2", "torchtitan RMSNorm + torchao 0.18 float8 rowwise recipe "
         "(round_scales_to_power_of_2)", _torchao_rowwise_pow2, expect=ADD + "_fp8_per_token", held_out=True),
    Case("torchao_inference_tensorwise", "Megatron legacy RMSNorm + torchao 0.18 _choose_scale_float8 "
         "(per tensor) + _quantize_affine_float8", _torchao_inference_tensor, expect=ADD + "_fp8_per_tensor",
         held_out=True),
    Case("sglang_input_to_float8", "sglang RMSNorm.forward_native + srt/layers/quantization/fp8_utils.py "
         "input_to_float8", _sglang_input_to_float8, expect=ADD + "_fp8_per_tensor", held_out=True),
    Case("vllm_c_rms_norm_embedding", "vllm @00cba797 layernorm.py rms_norm -> _C.rms_norm (out variant)",
         _c_rms_norm_embedding, inputs=("w",), expect=NO_RES, held_out=True, needs=("standins",)),
    Case("hf_fp16_group64_ue8m0", "transformers LlamaRMSNorm (fp16) + QuantFP8._quantize_group_native "
         "(1x64, UE8M0)", _hf_fp16_group64_ue8m0, dtype=FP16, expect=ADD + "_fp8_per_group", held_out=True),
    Case("fp32_rms_norm_per_token", "torch F.rms_norm (fp32 activations) + QuantFP8.forward_native per token",
         _fp32_rms_norm_per_token, dtype=F32, expect=ADD + "_fp8_per_token", held_out=True),
]
