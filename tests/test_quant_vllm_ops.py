"""vLLM's quant custom ops (``_C.*`` through ``auto_functionalized``) before a fused norm.

The CUDA extension of the vLLM 0.33 wheel (``vllm/_C_stable_libtorch.abi3.so``) cannot load
on this machine: it links ``libcuda.so.1``, the NVIDIA driver, which a GPU-less host does not
have, so ``torch.ops._C.*`` quant ops do not exist here.
:func:`fusion_passes.cli.vllm_cpu_ops.register_c_quant_ops` registers them from the
wheel's OWN registration strings (the ``TORCH_LIBRARY`` schema text read out of that .so),
with a fake implementation (they mutate and return nothing) and a CPU implementation that
writes what the CUDA kernel computes (the kernel's documented math, via
:mod:`fusion_passes.epilogue`). The graphs are then produced by vLLM's own
``MatcherQuantFP8.forward_custom`` (the exact form vLLM's fusion passes match).
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch.testing import FileCheck

from fusion_passes import FusionPass
from fusion_passes.cli.vllm_cpu_ops import C_OPS, register_c_quant_ops, wheel_schemas
from graphs import all_reduce, fp32_weight_rms_norm, trace
from ranks import run_ranks

auto_functionalized = torch.ops.higher_order.auto_functionalized

needs_c_ops = pytest.mark.skipif(not register_c_quant_ops(),
                                 reason="needs vLLM 0.33's wheel (its _C schemas) installed")


FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


# The three functions below are vLLM 0.33's MatcherQuantFP8.forward_custom
# (compilation/passes/fusion/matcher_utils.py), line for line: vLLM's fusion passes match
# exactly these graphs. (matcher_utils itself cannot be imported here: at import it looks
# up torch.ops._C.rotary_embedding, another op of the CUDA extension.)
def vllm_static_fp8(y, scale):
    result = torch.empty(y.shape, device=y.device, dtype=FP8)
    _, result = auto_functionalized(torch.ops._C.static_scaled_fp8_quant.default, result=result, input=y,
                                    scale=scale, group_shape=[-1, -1])
    return result, scale


def vllm_per_token_fp8(y, scale_ub=None):
    result = torch.empty(y.shape, device=y.device, dtype=FP8)
    scale = torch.empty((y.shape[0], 1), device=y.device, dtype=torch.float32)
    _, result, scale = auto_functionalized(torch.ops._C.dynamic_per_token_scaled_fp8_quant.default,
                                           result=result, input=y, scale=scale, scale_ub=scale_ub)
    return result, scale


def vllm_per_tensor_fp8(y):
    """vLLM 0.33's ``_custom_ops.scaled_fp8_quant(y)`` (dynamic, per tensor), functionalized:
    a ``[1]`` fp32 scale buffer written by ``_C.dynamic_scaled_fp8_quant``: the form a model
    (Fp8LinearMethod through QuantFP8.forward_cuda) emits. (MatcherQuantFP8.forward_custom
    would pass ``scale_ub=None``, an argument this op's schema does not have.)"""
    result = torch.empty(y.shape, device=y.device, dtype=FP8)
    scale = torch.empty(1, device=y.device, dtype=torch.float32)
    _, result, scale = auto_functionalized(torch.ops._C.dynamic_scaled_fp8_quant.default,
                                           result=result, input=y, scale=scale)
    return result, scale


def vllm_per_group_fp8(y, group_size=128, ue8m0=False, column_major=False):
    result = torch.empty(y.shape, device=y.device, dtype=FP8)
    shape = (y.shape[0], y.shape[1] // group_size)
    if column_major:
        scale = torch.empty(tuple(reversed(shape)), device=y.device, dtype=torch.float32).permute(-1, -2)
    else:
        scale = torch.empty(shape, device=y.device, dtype=torch.float32)
    _, result, scale = auto_functionalized(
        torch.ops._C.per_token_group_fp8_quant.default, input=y, output_q=result, output_s=scale,
        group_size=group_size, eps=1e-10, fp8_min=-FP8_MAX, fp8_max=FP8_MAX, scale_ue8m0=ue8m0,
        dummy_is_scale_transposed=column_major, dummy_is_tma_aligned=False)
    return result, scale


QUANTS = {
    "static": vllm_static_fp8,
    "token": vllm_per_token_fp8,
    "tensor": vllm_per_tensor_fp8,
    "group": vllm_per_group_fp8,
    "group_ue8m0_col": lambda y: vllm_per_group_fp8(y, 128, True, True),
}


def _inputs(hidden: int, tokens: int = 5, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(hidden + tokens)
    x = torch.randn(tokens, hidden, dtype=dtype, generator=g)
    res = torch.randn(tokens, hidden, dtype=dtype, generator=g)
    w = 1 + 0.1 * torch.randn(hidden, dtype=dtype, generator=g)
    return x, res, w


def _ranks(args):
    return [[a.clone() if r == 0 else (a + 0.25 * r if a.is_floating_point() and a.numel() > 1 else a.clone())
             for a in args] for r in range(2)]


def _strides(t):
    """Layout that matters: strides of the dims longer than 1 (a size-1 dim's is arbitrary)."""
    return tuple(st for sz, st in zip(t.shape, t.stride()) if sz > 1)


def _bits(t):
    return t.view(torch.uint8) if t.element_size() == 1 else t


def _check_same(ref_gm, gm, args):
    rank_args = _ranks(args)
    want, got = run_ranks(ref_gm, rank_args), run_ranks(gm, rank_args)
    for r in range(2):
        assert len(want[r]) == len(got[r])
        for a, b in zip(want[r], got[r]):
            assert (a.dtype, a.shape, _strides(a)) == (b.dtype, b.shape, _strides(b))
            # the reference backend runs the same math in the same order: bit-identical
            assert torch.equal(_bits(a), _bits(b))


def _fuse(gm):
    ref = copy.deepcopy(gm)
    p = FusionPass()
    p(gm.graph)
    gm.recompile()
    gm.graph.lint()
    return ref, p.report


@needs_c_ops
@pytest.mark.parametrize("key,variant", [
    ("static", "fp8_static"), ("token", "fp8_per_token"), ("tensor", "fp8_per_tensor"), ("group", "fp8_per_group"),
    ("group_ue8m0_col", "fp8_per_group"),
])
def test_vllm_custom_quant_fuses(fake_pg, key, variant):
    m = QUANTS[key]
    H = 256
    x, res, w = _inputs(H)
    scale = torch.tensor([[0.03]], dtype=torch.float32)

    def block(x, res, w, scale):
        t = all_reduce(x) + res
        y = fp32_weight_rms_norm(t, w)
        q, s = m(y, scale) if key == "static" else m(y)
        return (q, t) if key == "static" else (q, s, t)

    gm = trace(block, x, res, w, scale)
    ref, report = _fuse(gm)
    assert [s.variant for s in report.sites] == [f"allreduce_add_rmsnorm_{variant}"]
    FileCheck().check_count(f"fusion_passes.allreduce_add_rmsnorm_{variant}.default", 1, exactly=True) \
        .check_not("auto_functionalized").check_not("all_reduce").run(gm.code)
    _check_same(ref, gm, (x, res, w, scale))


def _nvfp4_block(swizzle: bool):
    from vllm._custom_ops import create_fp4_output_tensors

    def block(x, res, w, gs):
        t = all_reduce(x) + res
        y = fp32_weight_rms_norm(t, w)
        out, out_scale = create_fp4_output_tensors(y.shape[0], y.shape[1], y.device, swizzle)
        # rms_quant_fusion.py's NVFP4 pattern: auto_functionalized(scaled_fp4_quant.out, ...)
        at = auto_functionalized(torch.ops._C.scaled_fp4_quant.out, input=y, input_scale=gs,
                                 is_sf_swizzled_layout=swizzle, output=out, output_scale=out_scale)
        return at[1], at[2], t

    return block


@needs_c_ops
@pytest.mark.parametrize("swizzle", [True, False])
def test_vllm_nvfp4_quant_fuses(fake_pg, swizzle):
    H = 64
    x, res, w = _inputs(H, tokens=3)
    gs = torch.tensor([448.0 * 6.0 / 8.0])
    gm = trace(_nvfp4_block(swizzle), x, res, w, gs)
    ref, report = _fuse(gm)
    assert [s.variant for s in report.sites] == ["allreduce_add_rmsnorm_nvfp4"]
    FileCheck().check_count("fusion_passes.allreduce_add_rmsnorm_nvfp4.default", 1, exactly=True) \
        .check_not("auto_functionalized").run(gm.code)
    _check_same(ref, gm, (x, res, w, gs))


@needs_c_ops
def test_nvfp4_on_fp32_does_not_fuse_the_quant(fake_pg):
    """NVFP4 takes fp16/bf16 only: on an fp32 norm output only all-reduce + norm fuse."""
    H = 64
    x, res, w = _inputs(H, tokens=3, dtype=torch.float32)
    gs = torch.tensor([100.0])
    gm = trace(_nvfp4_block(True), x, res, w, gs)
    ref, report = _fuse(gm)
    (site,) = report.sites
    assert site.fused and site.variant == "allreduce_add_rmsnorm"
    FileCheck().check_count("fusion_passes.allreduce_add_rmsnorm.default", 1, exactly=True) \
        .check("auto_functionalized").check_not("allreduce_add_rmsnorm_nvfp4").run(gm.code)


def test_wheel_schemas_are_the_registered_ones():
    """The schemas we register are the wheel's own text (so our graphs are vLLM's)."""
    schemas = wheel_schemas()
    if not schemas:
        pytest.skip("needs vLLM 0.33's wheel installed")
    assert set(schemas) == set(C_OPS)
    assert schemas["static_scaled_fp8_quant"].startswith("static_scaled_fp8_quant(Tensor! result, Tensor input")
    register_c_quant_ops()
    assert "Tensor(a!) output" in str(torch.ops._C.scaled_fp4_quant.out._schema)


del sys


# vLLM 0.33's _custom_ops.py calls, in place (what model code runs): a plain torch.compile
# functionalizes them into auto_functionalized_v2 (vLLM's own compile turns v2 off)
def _inplace_static(y, scale):
    result = torch.empty(y.shape, device=y.device, dtype=FP8)
    torch.ops._C.static_scaled_fp8_quant(result, y, scale, None)
    return (result,)


def _inplace_token(y, scale):
    result = torch.empty(y.shape, device=y.device, dtype=FP8)
    s = torch.empty((y.shape[0], 1), device=y.device, dtype=torch.float32)
    torch.ops._C.dynamic_per_token_scaled_fp8_quant(result, y, s, None)
    return result, s


def _inplace_tensor(y, scale):
    result = torch.empty(y.shape, device=y.device, dtype=FP8)
    s = torch.empty(1, device=y.device, dtype=torch.float32)
    torch.ops._C.dynamic_scaled_fp8_quant(result, y, s)
    return result, s


def _inplace_group(y, scale, column_major=False):
    result = torch.empty(y.shape, device=y.device, dtype=FP8)
    shape = (y.shape[0], y.shape[1] // 128)
    if column_major:
        s = torch.empty(tuple(reversed(shape)), device=y.device, dtype=torch.float32).permute(-1, -2)
    else:
        s = torch.empty(shape, device=y.device, dtype=torch.float32)
    torch.ops._C.per_token_group_fp8_quant(y, result, s, 128, 1e-10, -FP8_MAX, FP8_MAX, False, column_major, False)
    return result, s


def _trace_v2(fn, *args):
    """The graph a plain ``torch.compile`` hands Inductor (AOTAutograd, v2 functionalization)."""
    from torch._functorch.aot_autograd import aot_function
    from torch._inductor import config
    from torch._inductor.decomposition import select_decomp_table

    captured = {}

    def capture(gm, example_inputs):
        captured["gm"] = gm
        return gm

    with torch.no_grad(), config.patch(enable_auto_functionalized_v2=True):
        aot_function(fn, fw_compiler=capture, decompositions=select_decomp_table())(*[a.clone() for a in args])
    return captured["gm"]


@needs_c_ops
@pytest.mark.parametrize("quant,variant", [
    (_inplace_static, "fp8_static"), (_inplace_token, "fp8_per_token"), (_inplace_tensor, "fp8_per_tensor"),
    (_inplace_group, "fp8_per_group"),
])
def test_vllm_custom_quant_v2_fuses(fake_pg, quant, variant):
    """The in-place calls under ``auto_functionalized_v2``: the quant fuses, bit-identical."""
    x, res, w = _inputs(256)
    scale = torch.tensor([[0.03]], dtype=torch.float32)

    def block(x, res, w, scale):
        t = all_reduce(x) + res
        return (*quant(fp32_weight_rms_norm(t, w), scale), t)

    gm = _trace_v2(block, x, res, w, scale)
    assert any("auto_functionalized_v2" in str(n.target) for n in gm.graph.nodes)
    ref, report = _fuse(gm)
    assert [s.variant for s in report.sites] == [f"allreduce_add_rmsnorm_{variant}"], report.table()
    FileCheck().check_count(f"fusion_passes.allreduce_add_rmsnorm_{variant}.default", 1, exactly=True) \
        .check_not("auto_functionalized").check_not("all_reduce").run(gm.code)
    _check_same(ref, gm, (x, res, w, scale))


@needs_c_ops
def test_v2_quant_into_a_strided_view_stays_unfused_with_its_reason(fake_pg):
    """A column-major group scale is a permuted view of its buffer: v2 records it as a
    strided view of the base, a layout the fused op does not write. The norm fuses, the
    quant stays with the reason."""
    x, res, w = _inputs(256)
    scale = torch.tensor([[0.03]], dtype=torch.float32)

    def block(x, res, w, scale):
        t = all_reduce(x) + res
        return (*_inplace_group(fp32_weight_rms_norm(t, w), scale, column_major=True), t)

    gm = _trace_v2(block, x, res, w, scale)
    ref, report = _fuse(gm)
    (site,) = report.sites
    assert site.variant == "allreduce_add_rmsnorm", report.table()
    assert "output_s is a slice or strided view of a larger tensor" in site.reason
    _check_same(ref, gm, (x, res, w, scale))
