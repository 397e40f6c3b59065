"""Real spellings, transcribed: each function is a project's own code with ``self`` turned
into arguments. The line above each names the project, the file, the function and the
version read (a git commit, or the installed release). Nothing here is ours: only the
argument plumbing is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
F32 = torch.float32


# ============================================================================== RMSNorms


# transformers 5.20.2, models/llama/modeling_llama.py, LlamaRMSNorm.forward (also Qwen2/3,
# DeepseekV3RMSNorm, Glm4RMSNorm: the same lines)
def hf_llama_rmsnorm(hidden_states, weight, variance_epsilon=1e-6):
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + variance_epsilon)
    return weight * hidden_states.to(input_dtype)


# transformers 5.20.2, models/gemma3/modeling_gemma3.py, Gemma3RMSNorm._norm / forward
def hf_gemma3_rmsnorm(x, weight, eps=1e-6):
    def _norm(x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    output = _norm(x.float())
    output = output * (1.0 + weight.float())
    return output.type_as(x)


# transformers 5.20.2, models/t5/modeling_t5.py, T5LayerNorm.forward
def hf_t5_layernorm(hidden_states, weight, variance_epsilon=1e-6):
    variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + variance_epsilon)
    if weight.dtype in [torch.float16, torch.bfloat16]:
        hidden_states = hidden_states.to(weight.dtype)
    return weight * hidden_states


# transformers 5.20.2, models/olmo2/modeling_olmo2.py, Olmo2RMSNorm.forward
def hf_olmo2_rmsnorm(hidden_states, weight, variance_epsilon=1e-6):
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + variance_epsilon)
    return (weight * hidden_states).to(input_dtype)


# transformers 5.20.2, models/cohere/modeling_cohere.py, CohereLayerNorm.forward (a LayerNorm:
# it subtracts the mean; must NOT fuse as an RMSNorm)
def hf_cohere_layernorm(hidden_states, weight, variance_epsilon=1e-5):
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    mean = hidden_states.mean(-1, keepdim=True)
    variance = (hidden_states - mean).pow(2).mean(-1, keepdim=True)
    hidden_states = (hidden_states - mean) * torch.rsqrt(variance + variance_epsilon)
    hidden_states = weight.to(torch.float32) * hidden_states
    return hidden_states.to(input_dtype)


# NVIDIA/Megatron-LM @00caa53a, megatron/legacy/model/rms_norm.py, RMSNorm._norm / forward
# (transformers' Llama4TextRMSNorm and torchtitan's RMSNorm, below, are the same lines)
def megatron_rmsnorm(x, weight, eps=1e-6):
    def _norm(x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    output = _norm(x.float()).type_as(x)
    return output * weight


# pytorch/torchtitan @026e23a9, torchtitan/models/norms.py, RMSNorm._norm / forward
def torchtitan_rmsnorm(x, weight, eps=1e-6):
    def _norm(x: torch.Tensor):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    output = _norm(x.float()).type_as(x)
    return output * weight


# torch 2.14, torch/nn/modules/normalization.py RMSNorm.forward -> F.rms_norm
def torch_rms_norm(x, weight, eps=1e-6):
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


# NVIDIA/apex @3c53cf81, apex/normalization/fused_layer_norm.py, manual_rms_norm (the python
# fallback of FusedRMSNorm): the multiply by rsqrt is done on the UNCAST input (bf16 * fp32)
def apex_manual_rms_norm(input, normalized_shape, weight, eps):
    dims = tuple(i for i in range(-1, -len(normalized_shape) - 1, -1))
    variance = input.to(torch.float32).pow(2).mean(dims, keepdim=True)
    input = input * torch.rsqrt(variance + eps)
    if weight is None:
        return input
    if weight.dtype in [torch.float16, torch.bfloat16]:
        input = input.to(weight.dtype)
    return weight * input


# vllm-project/vllm @00cba797, vllm/model_executor/layers/layernorm.py, RMSNorm.forward_native
# (before vLLM IR): the residual added in fp32, the weight after the cast back
def vllm_forward_native_old(x, residual, weight, variance_epsilon=1e-6):
    orig_dtype = x.dtype
    x = x.to(torch.float32)
    if residual is not None:
        x = x + residual.to(torch.float32)
        residual = x.to(orig_dtype)
    variance = x.pow(2).mean(dim=-1, keepdim=True)
    x = x * torch.rsqrt(variance + variance_epsilon)
    x = x.to(orig_dtype)
    if weight is not None:
        x = x * weight
    if residual is None:
        return x
    return x, residual


# vllm-project/vllm @00cba797, vllm/model_executor/layers/layernorm.py,
# GemmaRMSNorm.forward_static: fp16 adds in fp32 and KEEPS the residual in fp32
def vllm_gemma_forward_static(weight, variance_epsilon, x, residual):
    orig_dtype = x.dtype
    if residual is not None:
        x = x.float() + residual.float() if orig_dtype == torch.float16 else x + residual
        residual = x
    x = x.float()
    variance = x.pow(2).mean(dim=-1, keepdim=True)
    x = x * torch.rsqrt(variance + variance_epsilon)
    x = x * (1.0 + weight.float())
    x = x.to(orig_dtype)
    return x if residual is None else (x, residual)


# vLLM 0.33.0 (installed), vllm/ir/ops/layernorm.py, fused_add_rms_norm (the native
# implementation of the IR op; what ``custom_ops=none`` without the IR wrap inlines)
def vllm_ir_fused_add_rms_norm_native(x, x_residual, weight, epsilon):
    orig_dtype = x.dtype
    x = x.to(torch.float32)
    x = x + x_residual.to(torch.float32)
    x_residual = x.to(orig_dtype)
    x_var = x
    variance = x_var.pow(2).mean(dim=-1, keepdim=True)
    x = x * torch.rsqrt(variance + epsilon)
    if weight is not None:
        x = x.to(weight.dtype) * weight
    return x.to(orig_dtype), x_residual


# sgl-project/sglang @000fc1a8, python/sglang/srt/layers/layernorm.py, RMSNorm.forward_native
def sglang_forward_native(x, residual, weight, variance_epsilon=1e-6):
    if not x.is_contiguous():
        x = x.contiguous()
    orig_dtype = x.dtype
    x = x.to(torch.float32)
    if residual is not None:
        x = x + residual.to(torch.float32)
        residual = x.to(orig_dtype)
    variance = x.pow(2).mean(dim=-1, keepdim=True)
    x = x * torch.rsqrt(variance + variance_epsilon)
    x = (x * weight).to(orig_dtype)
    if residual is None:
        return x
    return x, residual


# sgl-project/sglang @000fc1a8, python/sglang/srt/layers/layernorm.py, GemmaRMSNorm.forward_native
def sglang_gemma_forward_native(x, residual, weight, variance_epsilon=1e-6):
    orig_dtype = x.dtype
    if residual is not None:
        x = x + residual
        residual = x
    x = x.float()
    variance = x.pow(2).mean(dim=-1, keepdim=True)
    x = x * torch.rsqrt(variance + variance_epsilon)
    x = x * (1.0 + weight.float())
    x = x.to(orig_dtype)
    return x if residual is None else (x, residual)


# sgl-project/sglang @000fc1a8, python/sglang/srt/layers/layernorm.py, Gemma3RMSNorm
def sglang_gemma3_rmsnorm(x, weight, eps=1e-6):
    def _norm(x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    output = _norm(x.float())
    output = output * (1.0 + weight.float())
    return output.type_as(x)


# vllm-project/vllm @00cba797, vllm/model_executor/layers/layernorm.py, PolyNorm._norm:
# x / sqrt(...) instead of x * rsqrt(...) (rounds differently; must NOT fuse)
def vllm_polynorm_norm(x, variance_epsilon=1e-6):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + variance_epsilon)


# ============================================================================ FP8 quants

_FP8_MAX = torch.finfo(FP8).max
_FP8_MIN_SCALING_FACTOR = 1.0 / (_FP8_MAX * 512.0)


# vLLM 0.33.0 (installed), vllm/model_executor/layers/quantization/input_quant_fp8.py,
# QuantFP8.forward_native, static per-tensor (group_broadcast of a [1] scale is a no-op)
def vllm_quant_fp8_static(x, scale):
    out = x.to(torch.float32) * scale.to(torch.float32).reciprocal()
    return out.clamp(-_FP8_MAX, _FP8_MAX).to(FP8)


# ... same function, dynamic GroupShape.PER_TOKEN
def vllm_quant_fp8_per_token(x, scale_ub=None):
    x_max = x.abs().amax(dim=-1)
    x_max = x_max.unsqueeze(-1).to(torch.float32)
    if scale_ub is not None:
        x_max = x_max.clamp(max=scale_ub)
    scale = (x_max / _FP8_MAX).clamp(min=_FP8_MIN_SCALING_FACTOR)
    out = x.to(torch.float32) * scale.to(torch.float32).reciprocal()
    return out.clamp(-_FP8_MAX, _FP8_MAX).to(FP8), scale


# ... same file, QuantFP8._quantize_group_native (hidden a multiple of the group: no pad)
def vllm_quant_fp8_group(x, group_size=128, use_ue8m0=False):
    orig_shape = x.shape
    num_groups = x.shape[-1] // group_size
    x_grouped = x.view(-1, num_groups, group_size)
    absmax = x_grouped.abs().max(dim=-1, keepdim=True)[0].float()
    scales_raw = (absmax / _FP8_MAX).clamp(min=_FP8_MIN_SCALING_FACTOR)
    scales = torch.exp2(torch.ceil(torch.log2(scales_raw))) if use_ue8m0 else scales_raw
    x_scaled = x_grouped / scales
    x_quant = x_scaled.clamp(-_FP8_MAX, _FP8_MAX).to(FP8)
    x_quant = x_quant.view(-1, num_groups * group_size).view(orig_shape)
    scales = scales.squeeze(-1).reshape(orig_shape[:-1] + (num_groups,))
    return x_quant, scales


# torchao 0.18.0 (installed), torchao/float8/float8_utils.py amax_to_scale / to_fp8_saturated,
# float8_scaling_utils.py hp_tensor_to_float8_dynamic (AXISWISE, axiswise_dim=-1: rowwise),
# float8_training_tensor.py _ToFloat8ConstrFunc.forward. Returns (bits, scale): the parts of
# the Float8TrainingTensor (its _scale is the multiplier 448/amax).
def torchao_float8_training(hp_tensor, rowwise=True, round_scales_to_power_of_2=False):
    x = torch.abs(hp_tensor)
    amax = torch.amax(x, dim=-1, keepdim=True) if rowwise else torch.max(x)
    amax = amax.to(torch.float64)
    scale = torch.finfo(FP8).max / torch.clamp(amax, min=1e-12)
    scale = scale.to(torch.float32)
    if round_scales_to_power_of_2:
        scale = torch.exp2(torch.floor(torch.log2(scale)))
    tensor_scaled = hp_tensor.to(torch.float32) * scale
    max_value = torch.finfo(FP8).max
    bits_fp8 = tensor_scaled.clamp(min=-max_value, max=max_value).to(FP8)
    return bits_fp8, scale


# torchao 0.18.0 (installed), torchao/quantization/quant_primitives.py _choose_scale_float8
# (block_size = [1, H] rowwise, or the full shape: per tensor) + _quantize_affine_float8
def torchao_float8_inference(tensor, rowwise=True):
    quant_max = torch.finfo(FP8).max
    block_size = [1, tensor.shape[-1]] if rowwise else list(tensor.shape)
    tensor_reshaped = tensor.view(tensor.shape)
    dims = [1] if rowwise else [0, 1]
    max_abs = tensor_reshaped.abs().amax(dim=dims, keepdim=True)
    scale = max_abs / quant_max
    output_shape = [n // b for n, b in zip(tensor.shape, block_size)]
    scale = scale.reshape(output_shape).to(dtype=torch.float32)
    tensor_fp32 = tensor.to(torch.float32)
    tensor_scaled = tensor_fp32 / scale
    tensor_clamped = tensor_scaled.clamp(min=-quant_max, max=quant_max)
    return tensor_clamped.to(FP8), scale


# sgl-project/sglang, python/sglang/srt/layers/quantization/fp8_utils.py, input_to_float8
# (per tensor; returns the dequant scale 1/(448/amax))
def sglang_input_to_float8(x, dtype=FP8):
    min_val, max_val = x.aminmax()
    amax = torch.maximum(min_val.abs(), max_val.abs()).float().clamp(min=1e-12)
    fp_max = torch.finfo(dtype).max
    scale = fp_max / amax
    x_scl_sat = (x.float() * scale).clamp(min=-fp_max, max=fp_max)
    return x_scl_sat.to(dtype).contiguous(), scale.float().reciprocal()


# sgl-project/sglang, test/srt/test_fp8_kernel.py, native_per_token_group_quant_fp8 (the
# torch reference SGLang checks its per-token-group kernel against)
def sglang_native_per_token_group_quant_fp8(x, group_size, eps=1e-10, dtype=FP8):
    finfo = torch.finfo(dtype)
    fp8_min = finfo.min
    fp8_max = finfo.max
    x_ = x.reshape(x.numel() // group_size, group_size)
    amax = x_.abs().max(dim=-1, keepdim=True)[0].clamp(min=eps).to(torch.float32)
    x_s = amax / fp8_max
    x_q = (x_ / x_s).clamp(min=fp8_min, max=fp8_max).to(dtype)
    x_q = x_q.reshape(x.shape)
    x_s = x_s.reshape(x.shape[:-1] + (x.shape[-1] // group_size,))
    return x_q, x_s


# sgl-project/sglang, test/srt/test_fp8_kernel.py, native_static_quant_fp8
def sglang_native_static_quant_fp8(x, x_s, dtype=FP8):
    finfo = torch.finfo(dtype)
    fp8_min = finfo.min
    fp8_max = finfo.max
    x_ = x.reshape(x.numel() // x.shape[-1], x.shape[-1])
    x_s_inv = 1.0 / x_s
    x_q = (x_ * x_s_inv).clamp(min=fp8_min, max=fp8_max).to(dtype)
    x_q = x_q.reshape(x.shape)
    return x_q, x_s


# transformers 5.20.2, integrations/compressed_tensors.py, quantize_fp8_per_row (what
# CompressedTensorsFP8Linear.forward runs on input.reshape(-1, hidden))
def hf_quantize_fp8_per_row(x):
    x_float = x.to(torch.float32)
    row_max = x_float.abs().amax(dim=-1)  # (num_rows,)
    # Avoid division by zero for all-zero rows
    safe_max = torch.where(row_max > 0, row_max, torch.ones_like(row_max))
    scales = safe_max / torch.finfo(FP8).max  # float32
    x_fp8 = torch.clamp(x_float / scales.unsqueeze(-1), min=torch.finfo(FP8).min, max=torch.finfo(FP8).max).to(FP8)
    return x_fp8, scales


# sgl-project/sglang, sgl-kernel/benchmark/bench_per_token_quant_fp8.py (XPU),
# torch_per_token_quant_fp8: the pure-torch reference of sgl_per_token_quant_fp8
def sglang_torch_per_token_quant_fp8(input):
    finfo = torch.finfo(torch.float8_e4m3fn)
    absmax = input.abs().to(torch.float32).amax(dim=-1, keepdim=True)
    scale = absmax / finfo.max
    scale_inv = torch.where(scale > 0, scale.reciprocal(), torch.zeros_like(scale))
    q = (input.to(torch.float32) * scale_inv).clamp(finfo.min, finfo.max)
    return q.to(torch.float8_e4m3fn), scale.squeeze(-1)


# ============================================================================== NVFP4

FLOAT4_E2M1_MAX = 6.0
FLOAT4_E2M1_MAX_RECIPROCAL = 1.0 / 6.0


# vLLM 0.33.0 (installed), vllm/model_executor/layers/quantization/utils/
# nvfp4_emulation_utils.py: get_reciprocal, cast_to_fp4, ref_nvfp4_quant
def get_reciprocal(x):
    if isinstance(x, torch.Tensor):
        return 1.0 / (x + (x == 0) * 1e8)
    return 0.0 if x == 0 else 1.0 / x


def cast_to_fp4(x):
    sign = torch.sign(x)
    x = torch.abs(x)
    x[(x >= 0.0) & (x <= 0.25)] = 0.0
    x[(x > 0.25) & (x < 0.75)] = 0.5
    x[(x >= 0.75) & (x <= 1.25)] = 1.0
    x[(x > 1.25) & (x < 1.75)] = 1.5
    x[(x >= 1.75) & (x <= 2.5)] = 2.0
    x[(x > 2.5) & (x < 3.5)] = 3.0
    x[(x >= 3.5) & (x <= 5.0)] = 4.0
    x[x > 5.0] = 6.0
    return x * sign


def ref_nvfp4_quant(x, global_scale, block_size):
    m, n = x.shape
    x = torch.reshape(x, (m, n // block_size, block_size))
    vec_max = torch.max(torch.abs(x), dim=-1, keepdim=True)[0].to(torch.float32)
    scale = global_scale * (vec_max * FLOAT4_E2M1_MAX_RECIPROCAL)
    scale = torch.clamp(scale, max=448, min=-448)
    scale = scale.to(torch.float8_e4m3fn).to(torch.float32)
    output_scale = get_reciprocal(scale * get_reciprocal(global_scale))
    scaled_x = x.to(torch.float32) * output_scale
    clipped_x = torch.clamp(scaled_x, -6.0, 6.0).reshape(m, n)
    return cast_to_fp4(clipped_x), scale.squeeze(-1)
