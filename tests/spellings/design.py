"""The DESIGN part of the corpus: fusable chains the recognizer was designed and tested
against. Each chain gets the all-reduced sum ``t``; the code after it is the project's own
(:mod:`.sources`); what the chain returns is what the model keeps (the norm output or the
quantized values, and the residual where the model reads it again)."""

from __future__ import annotations

import torch

from . import sources as S
from .harness import Case

BF16, FP16, F32 = torch.bfloat16, torch.float16, torch.float32
ADD = "allreduce_add_rmsnorm"
FINAL = "allreduce_add_rmsnorm_final"
NO_RES = "allreduce_rmsnorm"
EPS = 1e-6


def _hf_llama(t, res, w):
    h = t + res  # LlamaDecoderLayer.forward: residual + hidden_states
    return S.hf_llama_rmsnorm(h, w, EPS), h


def _hf_llama_final(t, res, w):
    return (S.hf_llama_rmsnorm(t + res, w, EPS),)


def _hf_gemma3(t, res, wg):
    h = t + res
    return S.hf_gemma3_rmsnorm(h, wg, EPS), h


def _torch_rms_norm(t, res, w):
    h = t + res
    return S.torch_rms_norm(h, w, EPS), h


def _vllm_native(t, res, w):
    return S.vllm_forward_native_old(t, res, w, EPS)


def _vllm_native_embedding(t, w):
    # VocabParallelEmbedding's all-reduce, then layer 0's input norm; the sum is the residual
    return S.vllm_forward_native_old(t, None, w, EPS), t


def _sglang_native(t, res, w):
    return S.sglang_forward_native(t, res, w, EPS)


def _deepseek_fp16(t, res, w):
    # vllm-project/vllm @00cba797, vllm/model_executor/models/deepseek_v2.py,
    # DeepseekV2DecoderLayer.forward (fp16): hidden_states *= 1. / self.routed_scaling_factor
    # (2.5 for DeepSeek-V3), then post_attention_layernorm(hidden_states, residual)
    t = t * (1.0 / 2.5)
    return S.vllm_forward_native_old(t, res, w, EPS)


def _vllm_native_per_token(t, res, w):
    y, res = S.vllm_forward_native_old(t, res, w, EPS)
    q, s = S.vllm_quant_fp8_per_token(y)
    return q, s, res


def _hf_llama_qkv_per_token(t, res, w):
    # transformers' FP8 linears (compressed_tensors.py CompressedTensorsFP8Linear): q_proj,
    # k_proj and v_proj each quantize the same norm output; here in vLLM's per-token order
    y, h = _hf_llama(t, res, w)
    return (*S.vllm_quant_fp8_per_token(y), *S.vllm_quant_fp8_per_token(y), *S.vllm_quant_fp8_per_token(y), h)


def _hf_llama_fp8_linear_qkv(t, res, w):
    # transformers 5.20.2 CompressedTensorsFP8Linear.forward, for q_proj, k_proj, v_proj:
    # each flattens and quantizes the same norm output (and passes scale.unsqueeze(-1) on)
    y, h = _hf_llama(t, res, w)
    out = []
    for _ in range(3):
        q, s = S.hf_quantize_fp8_per_row(y.reshape(-1, y.shape[-1]))
        out += [q, s.unsqueeze(-1)]
    return (*out, h)


def _vllm_ir_maybe_inplace(t, res, w):
    # vLLM 0.33.0, vllm/model_executor/layers/layernorm.py RMSNorm.forward_native with a
    # residual: ir.ops.fused_add_rms_norm.maybe_inplace (torch-wrapped), here WITHOUT vLLM's
    # in-place functionalization pass: torch functionalizes it
    out, res = torch.ops.vllm_ir.fused_add_rms_norm.maybe_inplace(t, res, w, EPS)
    return out, res


def _vllm_moe_view_maybe_inplace(t, res, w):
    # vLLM 0.33.0, vllm/model_executor/models/mixtral.py MixtralMoE.forward: the MoE output
    # (all-reduced inside the experts' op) returns as final_hidden_states.view(orig_shape),
    # a view with its base's own shape; the decoder layer then calls
    # post_attention_layernorm -> fused_add_rms_norm.maybe_inplace on it. Under
    # auto_functionalized_v2 the view is the `_x_alias` form.
    return _vllm_ir_maybe_inplace(t.view(t.shape), res, w)


def _c_fused_add_rms_norm(t, res, w):
    # vllm-project/vllm @00cba797, layernorm.py fused_add_rms_norm -> ops.fused_add_rms_norm
    # (_custom_ops.py: torch.ops._C.fused_add_rms_norm), in place on x and residual
    torch.ops._C.fused_add_rms_norm(t, res, w, EPS)
    return t, res


def _sgl_fused_add_rmsnorm(t, res, w):
    # sgl-project/sglang @000fc1a8, layernorm.py RMSNorm.forward_cuda:
    # fused_add_rmsnorm(x, residual, self.weight.data, eps) (sgl_kernel, in place)
    torch.ops.sgl_kernel.fused_add_rmsnorm(t, res, w, EPS, False)
    return t, res


def _static_full_scale(t, res, w):
    # a constant static scale: the checkpoint's input_scale materialized as a graph constant
    y, h = _hf_llama(t, res, w)
    scale = torch.full((1,), 0.0173, dtype=F32)
    return S.vllm_quant_fp8_static(y, scale), h


def _sglang_static(t, res, w, s):
    y, res = S.sglang_forward_native(t, res, w, EPS)
    q, _ = S.sglang_native_static_quant_fp8(y, s)
    return q, res


def _python_float_scale(t, res, w):
    # vLLM QuantFP8.forward_native static, with the scale a Python float: what torch.compile
    # makes of a float attribute (it specializes it into the graph as a constant)
    y, h = _hf_llama(t, res, w)
    scale = 0.0173
    out = y.to(torch.float32) * (1.0 / scale)
    return out.clamp(-448.0, 448.0).to(S.FP8), h


def _torchao_rowwise(t, res, w):
    y, h = _hf_llama(t, res, w)
    return (*S.torchao_float8_training(y), h)


def _torchao_inference_row(t, res, w):
    y, h = _hf_llama(t, res, w)
    return (*S.torchao_float8_inference(y), h)


def _sglang_group(t, res, w):
    y, res = S.sglang_forward_native(t, res, w, EPS)
    return (*S.sglang_native_per_token_group_quant_fp8(y, 128), res)


def _sglang_per_token(t, res, w):
    y, res = S.sglang_forward_native(t, res, w, EPS)
    return (*S.sglang_torch_per_token_quant_fp8(y), res)


def _ref_nvfp4(t, res, w, gs):
    y, res = S.vllm_forward_native_old(t, res, w, EPS)
    return (*S.ref_nvfp4_quant(y, gs, 16), res)


def _apex(t, res, w):
    h = t + res
    return S.apex_manual_rms_norm(h, (h.shape[-1],), w, EPS), h


def _hf_static(t, res, w, s):
    y, h = _hf_llama(t, res, w)
    return S.vllm_quant_fp8_static(y, s), h


def _hf_group(t, res, w):
    y, h = _hf_llama(t, res, w)
    return (*S.vllm_quant_fp8_group(y, 128), h)


def _vllm_gemma_bf16(t, res, wg):
    return S.vllm_gemma_forward_static(wg, EPS, t, res)


def _torchao_tensorwise(t, res, w):
    y, h = _hf_llama(t, res, w)
    return (*S.torchao_float8_training(y, rowwise=False), h)


def _hf_sglang_per_tensor(t, res, w):
    y, h = _hf_llama(t, res, w)
    return (*S.sglang_input_to_float8(y), h)


HF = "transformers 5.20.2 models/llama/modeling_llama.py LlamaRMSNorm.forward"
VN = "vllm @00cba797 layers/layernorm.py RMSNorm.forward_native"
SG = "sglang @000fc1a8 srt/layers/layernorm.py RMSNorm.forward_native"

CASES = [
    Case("hf_llama_bf16", HF, _hf_llama, expect=ADD, args=(("weight_in_fp32", False),)),
    Case("hf_llama_fp16_final", HF, _hf_llama_final, dtype=FP16, expect=FINAL),
    Case("hf_gemma3", "transformers 5.20.2 models/gemma3 Gemma3RMSNorm.forward", _hf_gemma3,
         inputs=("res", "wg"), expect=ADD),
    Case("torch_rms_norm", "torch 2.14 nn.RMSNorm -> F.rms_norm", _torch_rms_norm, expect=ADD),
    Case("vllm_native_residual", VN, _vllm_native, expect=ADD,
         args=(("residual_in_fp32", True), ("weight_in_fp32", False))),
    Case("vllm_native_embedding", VN, _vllm_native_embedding, inputs=("w",), expect=NO_RES),
    Case("sglang_native_residual", SG, _sglang_native, expect=ADD,
         args=(("residual_in_fp32", True), ("weight_in_fp32", True))),
    Case("deepseek_fp16_scale_native", "vllm @00cba797 models/deepseek_v2.py DeepseekV2DecoderLayer.forward "
         "(fp16: *= 1/routed_scaling_factor) + " + VN, _deepseek_fp16, dtype=FP16, expect=ADD,
         bound="hoisted_scale"),
    Case("vllm_native_per_token", VN + " + vllm 0.33 input_quant_fp8.py QuantFP8.forward_native (per token)",
         _vllm_native_per_token, expect=ADD + "_fp8_per_token"),
    Case("hf_llama_qkv_three_quants", HF + " + three identical QuantFP8.forward_native per-token quants "
         "(one per q/k/v FP8 linear)", _hf_llama_qkv_per_token, expect=ADD + "_fp8_per_token"),
    Case("hf_llama_fp8_linear_qkv", HF + " + transformers integrations/compressed_tensors.py "
         "quantize_fp8_per_row in CompressedTensorsFP8Linear.forward (q/k/v: three of one norm output)",
         _hf_llama_fp8_linear_qkv, expect=ADD + "_fp8_per_token"),
    Case("vllm_ir_maybe_inplace_v1", "vllm 0.33 layers/layernorm.py RMSNorm.forward_native -> "
         "ir.ops.fused_add_rms_norm.maybe_inplace (auto_functionalized)", _vllm_ir_maybe_inplace, expect=ADD,
         args=(("residual_in_fp32", True),), needs=("vllm",)),
    Case("vllm_ir_maybe_inplace_v2", "same, under auto_functionalized_v2", _vllm_ir_maybe_inplace,
         expect=ADD, args=(("residual_in_fp32", True),), v2=True, needs=("vllm",)),
    Case("vllm_moe_view_maybe_inplace_v2", "vllm 0.33 models/mixtral.py MixtralMoE.forward "
         "(final_hidden_states.view(orig_shape)) -> ir.ops.fused_add_rms_norm.maybe_inplace, under "
         "auto_functionalized_v2 (_x_alias)", _vllm_moe_view_maybe_inplace, expect=ADD,
         args=(("residual_in_fp32", True),), v2=True, needs=("vllm",)),
    Case("vllm_c_fused_add_rms_norm", "vllm @00cba797 layers/layernorm.py fused_add_rms_norm -> "
         "_C.fused_add_rms_norm (in place; csrc/layernorm_kernels.cu)", _c_fused_add_rms_norm, expect=ADD,
         args=(("residual_in_fp32", False), ("weight_in_fp32", False)), needs=("standins",)),
    Case("sgl_kernel_fused_add_rmsnorm_v2", "sglang @000fc1a8 layernorm.py RMSNorm.forward_cuda -> "
         "sgl_kernel.fused_add_rmsnorm (FlashInfer FusedAddRMSNormKernel)", _sgl_fused_add_rmsnorm, expect=ADD,
         args=(("residual_in_fp32", True), ("weight_in_fp32", True)), v2=True, needs=("standins",)),
    Case("static_fp8_full_scale", HF + " + QuantFP8.forward_native static, scale a torch.full constant",
         _static_full_scale, expect=ADD + "_fp8_static"),
    Case("sglang_native_static", SG + " + sglang test/srt/test_fp8_kernel.py native_static_quant_fp8",
         _sglang_static, inputs=("res", "w", "s"), expect=ADD + "_fp8_static"),
    # the same with the 0-dim fp32 scale of SGLang's test (x_s = torch.tensor(scale)): by
    # type promotion x_ * (1.0 / x_s) stays bf16, so the scaled value is rounded to bf16
    # before the FP8 cast. That double rounding differs from fp8(y * (1/s)) and fp8(y / s)
    # in fp32 (94 of the 65280 finite bf16 values at x_s = 0.0173, 126 at 0.001 and 7.7;
    # eager and Inductor's CPU compile of the quant at default precision agree with each
    # other): it is the static form input_product (fusion_passes/fp8_forms.py), bit for
    # bit on all of them (tests/test_spellings.py, the experiment's test)
    Case("sglang_native_static_0dim", SG + " + sglang test/srt/test_fp8_kernel.py native_static_quant_fp8 "
         "(0-dim fp32 scale)", _sglang_static, inputs=("res", "w", "s0"), expect=ADD + "_fp8_static",
         args=(("form", "input_product"),)),
    Case("static_fp8_python_float", HF + " + QuantFP8.forward_native static with a Python-float scale",
         _python_float_scale, expect=ADD + "_fp8_static"),
    Case("torchao_training_rowwise", HF + " + torchao 0.18 float8 hp_tensor_to_float8_dynamic (axiswise)",
         _torchao_rowwise, expect=ADD + "_fp8_per_token"),
    Case("torchao_inference_rowwise", HF + " + torchao 0.18 quant_primitives _choose_scale_float8 + "
         "_quantize_affine_float8 (per row)", _torchao_inference_row, expect=ADD + "_fp8_per_token"),
    Case("sglang_native_group128", SG + " + sglang test_fp8_kernel.py native_per_token_group_quant_fp8",
         _sglang_group, expect=ADD + "_fp8_per_group"),
    Case("sglang_torch_per_token", SG + " + sgl-kernel benchmark/bench_per_token_quant_fp8.py "
         "torch_per_token_quant_fp8", _sglang_per_token, expect=ADD + "_fp8_per_token"),
    Case("vllm_ref_nvfp4", VN + " + vllm 0.33 nvfp4_emulation_utils.py ref_nvfp4_quant", _ref_nvfp4,
         inputs=("res", "w", "gs"), expect=ADD + "_nvfp4"),
    Case("apex_manual_rms_norm", "apex @3c53cf81 normalization/fused_layer_norm.py manual_rms_norm", _apex,
         expect=ADD, args=(("weight_in_fp32", False),)),
    Case("hf_llama_vllm_static", HF + " + QuantFP8.forward_native static", _hf_static,
         inputs=("res", "w", "s"), expect=ADD + "_fp8_static"),
    Case("hf_llama_vllm_group128", HF + " + QuantFP8._quantize_group_native (1x128)", _hf_group,
         expect=ADD + "_fp8_per_group"),
    Case("vllm_gemma_bf16", "vllm @00cba797 layers/layernorm.py GemmaRMSNorm.forward_static (bf16)",
         _vllm_gemma_bf16, inputs=("res", "wg"), expect=ADD),
    # added after the held-out run missed SGLang's input_to_float8 (aminmax, decomposed to
    # amin/amax over every dim): the same quant after another norm
    Case("hf_llama_sglang_input_to_float8", HF + " + sglang srt/layers/quantization/fp8_utils.py "
         "input_to_float8", _hf_sglang_per_tensor, expect=ADD + "_fp8_per_tensor"),
    Case("torchao_training_tensorwise", HF + " + torchao 0.18 float8 hp_tensor_to_float8_dynamic (tensorwise)",
         _torchao_tensorwise, expect=ADD + "_fp8_per_tensor"),
]
