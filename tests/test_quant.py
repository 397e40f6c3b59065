"""all-reduce -> [add] -> RMSNorm -> quant: one fused op returning what the chain returned.

Quant chains are vLLM 0.33's own code where it runs on CPU (``QuantFP8.forward_native``,
what vLLM compiles with ``custom_ops=["none"]``) and the custom-op forms of
:mod:`test_quant_vllm_ops`. Numerics: simulated ranks (tests/ranks.py) of the unfused
and the fused graph, compared BIT-EXACTLY: the reference backend runs the same torch ops
in the same order as the chain (quantized values, scales, residual and norm outputs).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from hypothesis import assume, given, settings, strategies as st
from torch.testing import FileCheck

from fusion_passes import FusionPass, backends, epilogue
from fusion_passes.match import find_site
from fusion_passes.recognize import all_reduce as recognize_all_reduce
from fusion_passes.variants import Flags
from graphs import all_reduce, fp32_weight_rms_norm, gemma_rms_norm, hf_rms_norm, trace
from ranks import run_ranks
from test_quant_vllm_ops import QUANTS as C_QUANTS, _nvfp4_block, register_c_quant_ops

HAVE_C_OPS = register_c_quant_ops()


def _vllm_quant_fp8():
    """vLLM's QuantFP8 layers (native forward), or None where vLLM does not import."""
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    try:
        from vllm.config import VllmConfig, set_current_vllm_config
        from vllm.model_executor.layers.quantization.input_quant_fp8 import QuantFP8
        from vllm.model_executor.layers.quantization.utils.quant_utils import GroupShape
    except ModuleNotFoundError as e:
        if e.name != "vllm":  # vLLM itself missing: skip; anything else missing is a real error
            raise
        return None
    with set_current_vllm_config(VllmConfig()):
        mk = lambda *a, **k: QuantFP8(*a, compile_native=False, **k)  # noqa: E731
        return {
            "static": mk(True, GroupShape.PER_TENSOR),
            "token": mk(False, GroupShape.PER_TOKEN),
            "tensor": mk(False, GroupShape.PER_TENSOR),
            "group128": mk(False, GroupShape(1, 128), use_ue8m0=False),
            "group64_ue8m0": mk(False, GroupShape(1, 64), use_ue8m0=True),
            "group128_col": mk(False, GroupShape(1, 128), column_major_scales=True, use_ue8m0=False),
        }


VLLM_Q = _vllm_quant_fp8()
needs_vllm = pytest.mark.skipif(VLLM_Q is None, reason="needs vLLM 0.33 importable (VLLM_TARGET_DEVICE=cpu)")

# form -> (quant kind, group size or None, how to call it on norm output y with scale s / ub)
FORMS = {
    "native_static": ("fp8_static", None, lambda y, s, ub: VLLM_Q["static"].forward_native(y, s)[:1]),
    "native_token": ("fp8_per_token", None, lambda y, s, ub: VLLM_Q["token"].forward_native(y)),
    "native_token_ub": ("fp8_per_token", None, lambda y, s, ub: VLLM_Q["token"].forward_native(y, scale_ub=ub)),
    "native_tensor": ("fp8_per_tensor", None, lambda y, s, ub: VLLM_Q["tensor"].forward_native(y)),
    "native_group128": ("fp8_per_group", 128, lambda y, s, ub: VLLM_Q["group128"].forward_native(y)),
    "native_group64_ue8m0": ("fp8_per_group", 64, lambda y, s, ub: VLLM_Q["group64_ue8m0"].forward_native(y)),
    "native_group128_col": ("fp8_per_group", 128, lambda y, s, ub: VLLM_Q["group128_col"].forward_native(y)),
    "c_static": ("fp8_static", None, lambda y, s, ub: C_QUANTS["static"](y, s)[:1]),
    "c_token": ("fp8_per_token", None, lambda y, s, ub: C_QUANTS["token"](y)),
    "c_tensor": ("fp8_per_tensor", None, lambda y, s, ub: C_QUANTS["tensor"](y)),
    "c_group128_ue8m0_col": ("fp8_per_group", 128, lambda y, s, ub: C_QUANTS["group_ue8m0_col"](y)),
}
NORMS = {"vllm": fp32_weight_rms_norm, "gemma": gemma_rms_norm, "hf": hf_rms_norm}


def _block(form: str, residual: bool, consumer: bool, norm: str, eps: float):
    quant = FORMS[form][2]
    rms = NORMS[norm]

    def block(x, res, w, s, ub, wg):
        t = all_reduce(x)
        if residual:
            t = t + res
        y = rms(t, w, eps)
        outs = tuple(quant(y, s, ub))
        if consumer:  # a second consumer of the norm output: a bf16 GEMM (or a hidden-state tap)
            outs += (y @ wg,)
        return (*outs, t) if residual else outs

    return block


def _strides(t):
    """Layout that matters: strides of the dims longer than 1 (a size-1 dim's is arbitrary)."""
    return tuple(st for sz, st in zip(t.shape, t.stride()) if sz > 1)


def _bits(t):
    return t.view(torch.uint8) if t.element_size() == 1 else t


def _args(tokens, hidden, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    return (r(tokens, hidden), r(tokens, hidden), 1 + 0.2 * r(hidden), torch.tensor([0.02]),
            torch.tensor([1.5]), r(hidden, 8))


def _ranks(args, world=2):
    # distinct partial sums per rank; scales / weights replicated
    return [[a + 0.5 * r if a.dim() == 2 and a.shape[1] != 8 else a.clone() for a in args] for r in range(world)]


def _fuse(gm, **options):
    ref = copy.deepcopy(gm)
    p = FusionPass(**options)
    p(gm.graph)
    gm.recompile()
    gm.graph.lint()
    assert not p.report.errors, p.report.errors
    return ref, p.report


def _assert_same(ref, gm, args):
    rank_args = _ranks(args)
    want, got = run_ranks(ref, rank_args), run_ranks(gm, rank_args)
    for r in range(len(rank_args)):
        for a, b in zip(want[r], got[r], strict=True):
            assert (a.dtype, a.shape, _strides(a)) == (b.dtype, b.shape, _strides(b))
            # bit-exact: the reference backend runs the chain's own ops in the chain's order
            assert torch.equal(_bits(a), _bits(b)), (a, b)


def _expected_variant(kind, group, hidden, dtype, residual, consumer):
    plain = f"allreduce_{'add_' if residual else ''}rmsnorm"
    if group is not None and hidden % group:
        return plain, False  # vLLM pads the last group: that quant must not fuse
    return f"{plain}_{kind}{'_out' if consumer else ''}", True


@needs_vllm
@settings(max_examples=40)
@given(
    form=st.sampled_from(sorted(FORMS)),
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
    hidden=st.sampled_from([64, 128, 192, 256, 384]),
    tokens=st.sampled_from([1, 3, 7, 8]),
    eps=st.sampled_from([1e-6, 1e-5]),
    residual=st.booleans(),
    consumer=st.booleans(),
    norm=st.sampled_from(sorted(NORMS)),
    seed=st.integers(0, 2**16),
)
def test_property_quant_chain_fuses_bit_exact(fake_pg, form, dtype, hidden, tokens, eps, residual, consumer,
                                              norm, seed):
    assume(not form.startswith("c_") or (HAVE_C_OPS and dtype != torch.float32))  # 16-bit activations, wheel schemas
    assume(not (form.startswith("c_") and norm == "hf"))  # vLLM's custom ops follow vLLM's norm, not HF's order
    kind, group, _ = FORMS[form]
    assume(not (form.startswith("c_") and group and hidden % group))  # the CUDA op asserts hidden % group == 0
    args = _args(tokens, hidden, dtype, seed)
    gm = trace(_block(form, residual, consumer, norm, eps), *args)
    ref, report = _fuse(gm)
    variant, quant_fused = _expected_variant(kind, group, hidden, dtype, residual, consumer)
    assert [s.variant for s in report.sites] == [variant]
    code = gm.code
    FileCheck().check_not("all_reduce").check_not("wait_tensor").run(code)
    op = f"fusion_passes.allreduce_add_rmsnorm_{kind}.default" if quant_fused else \
        "fusion_passes.allreduce_add_rmsnorm.default"
    FileCheck().check_count(op, 1, exactly=True).run(code)
    if quant_fused:
        FileCheck().check_not("float8_e4m3fn);").check_not("auto_functionalized").run(code)
    _assert_same(ref, gm, args)


@needs_vllm
@settings(max_examples=30)
@given(
    form=st.sampled_from(["native_tensor", "c_tensor"]),
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
    hidden=st.sampled_from([8, 33, 64, 200, 256]),
    tokens=st.sampled_from([1, 2, 5, 8, 17]),
    eps=st.sampled_from([1e-6, 1e-5]),
    residual=st.booleans(),
    consumer=st.booleans(),
    norm=st.sampled_from(sorted(NORMS)),
    seed=st.integers(0, 2**16),
)
def test_property_per_tensor_quant_fuses_bit_exact(fake_pg, form, dtype, hidden, tokens, eps, residual, consumer,
                                                   norm, seed):
    """Dynamic per-tensor FP8 (ONE scale = max over every element of the norm output, as
    vLLM's Fp8LinearMethod with ``activation_scheme: dynamic``) fuses into
    ``allreduce_add_rmsnorm_fp8_per_tensor`` at any hidden size and token count, with the
    native floor (QuantFP8.forward_native) or without (the ``_C`` kernel): bit-exact."""
    # the CUDA op takes 16-bit activations after vLLM's norm (and needs the wheel's schemas)
    assume(form != "c_tensor" or (HAVE_C_OPS and dtype != torch.float32 and norm != "hf"))
    args = _args(tokens, hidden, dtype, seed)
    gm = trace(_block(form, residual, consumer, norm, eps), *args)
    ref, report = _fuse(gm)
    assert [s.variant for s in report.sites] == [
        f"allreduce_{'add_' if residual else ''}rmsnorm_fp8_per_tensor{'_out' if consumer else ''}"]
    code = gm.code
    FileCheck().check_count("fusion_passes.allreduce_add_rmsnorm_fp8_per_tensor.default", 1, exactly=True) \
        .run(code)
    FileCheck().check_not("all_reduce").check_not("aten.max").check_not("float8_e4m3fn);") \
        .check_not("auto_functionalized").check_not("aten.empty").run(code)
    _assert_same(ref, gm, args)


# ---------------------------------------------------------------------------- negatives


def _plain_site_note(gm):
    ar = next(recognize_all_reduce(n) for n in gm.graph.nodes if recognize_all_reduce(n) is not None)
    return find_site(ar)


def test_scale_from_another_tensor_does_not_fuse_the_quant(fake_pg):
    """y quantized with a per-token scale computed from z: only all-reduce + norm fuse."""
    def block(x, res, w, z):
        t = all_reduce(x) + res
        y = fp32_weight_rms_norm(t, w)
        s = (z.abs().amax(-1, keepdim=True).float() / 448.0).clamp(min=epilogue.fp8_min_scaling_factor())
        return (y.float() * s.reciprocal()).clamp(-448.0, 448.0).to(torch.float8_e4m3fn), s, t

    args = (*_args(5, 128, torch.bfloat16, 1)[:3], torch.randn(5, 128, dtype=torch.bfloat16))
    gm = trace(block, *args)
    site = _plain_site_note(gm)
    assert site.family.name == "allreduce_add_rmsnorm" and site.quant is None
    assert "computed from z" in site.note, site.note
    ref, report = _fuse(gm)
    assert [s.variant for s in report.sites] == ["allreduce_add_rmsnorm"]
    FileCheck().check_count("fusion_passes.allreduce_add_rmsnorm.default", 1, exactly=True) \
        .check("amax").check("float8_e4m3fn").run(gm.code)
    rank_args = [[a + r for a in args] for r in range(2)]
    for a, b in zip(run_ranks(ref, rank_args)[0], run_ranks(gm, rank_args)[0]):
        assert torch.equal(_bits(a), _bits(b))


def test_static_scale_computed_in_graph_does_not_fuse_the_quant(fake_pg):
    """A 'static' scale that the graph computes from another tensor is no static parameter."""
    def block(x, res, w, z):
        t = all_reduce(x) + res
        y = fp32_weight_rms_norm(t, w)
        s = z.abs().max().float() / 448.0
        return (y.float() * s.reciprocal()).clamp(-448.0, 448.0).to(torch.float8_e4m3fn), t

    args = (*_args(3, 64, torch.bfloat16, 2)[:3], torch.randn(3, 64, dtype=torch.bfloat16))
    gm = trace(block, *args)
    site = _plain_site_note(gm)
    assert site.quant is None and "not a static parameter" in site.note or "not amax" in site.note, site.note
    _, report = _fuse(gm)
    assert [s.variant for s in report.sites] == ["allreduce_add_rmsnorm"]


@needs_vllm
def test_group_size_not_dividing_hidden_does_not_fuse_the_quant(fake_pg):
    """hidden 192 with 1x128 groups: vLLM pads; the quant stays, AR + norm fuse."""
    def block(x, res, w):
        t = all_reduce(x) + res
        return (*VLLM_Q["group128"].forward_native(fp32_weight_rms_norm(t, w)), t)

    args = _args(3, 192, torch.bfloat16, 3)[:3]
    gm = trace(block, *args)
    site = _plain_site_note(gm)
    assert site.quant is None and "pads the norm output" in site.note
    ref, report = _fuse(gm)
    assert [s.variant for s in report.sites] == ["allreduce_add_rmsnorm"]
    FileCheck().check("constant_pad_nd").check("float8_e4m3fn").run(gm.code)
    _assert_same(ref, gm, args)


def test_quant_intermediate_with_outside_user_does_not_fuse_the_quant(fake_pg):
    """The per-token amax also feeds the output: the chain cannot disappear into one op."""
    def block(x, res, w):
        t = all_reduce(x) + res
        y = fp32_weight_rms_norm(t, w)
        amax = y.abs().amax(-1).unsqueeze(-1).float()
        s = (amax / 448.0).clamp(min=epilogue.fp8_min_scaling_factor())
        return (y.float() * s.reciprocal()).clamp(-448.0, 448.0).to(torch.float8_e4m3fn), s, amax, t

    args = _args(4, 64, torch.bfloat16, 4)[:3]
    gm = trace(block, *args)
    site = _plain_site_note(gm)
    assert site.quant is None and "user outside" in site.note, site.note


@needs_vllm
@pytest.mark.skipif(not HAVE_C_OPS, reason="needs vLLM 0.33's wheel (its _C schemas) installed")
def test_per_tensor_scale_floor_native_vs_kernel(fake_pg):
    """A norm output with max |y| < 1/512 (norm weight 1e-4): vLLM's native chain floors the
    scale at 1/(448*512), the _C.dynamic_scaled_fp8_quant kernel does not. Each form fuses
    with its own floor (scale_min -1 = native, 0 = kernel), bit-exact, and the two scales differ."""
    x, res, w, s, ub, wg = _args(6, 128, torch.bfloat16, 21)
    w = torch.full_like(w, 1e-4)
    scales = {}
    for form, scale_min in (("native_tensor", -1.0), ("c_tensor", 0.0)):
        args = (x, res, w, s, ub, wg)
        gm = trace(_block(form, True, False, "vllm", 1e-6), *args)
        ref, report = _fuse(gm)
        assert [site.variant for site in report.sites] == ["allreduce_add_rmsnorm_fp8_per_tensor"]
        (fused,) = gm.graph.find_nodes(op="call_function",
                                       target=torch.ops.fusion_passes.allreduce_add_rmsnorm_fp8_per_tensor.default)
        assert fused.args[5] == scale_min
        _assert_same(ref, gm, args)
        scales[form] = run_ranks(gm, _ranks(args))[0][1]
    floor = torch.tensor([epilogue.fp8_min_scaling_factor()])  # the fp32 the clamp compares with
    assert torch.equal(scales["native_tensor"], floor)
    assert 0 < scales["c_tensor"].item() < floor.item()


def test_per_tensor_op_fake_and_bad_input(fake_pg):
    """The fused op's fake: q like the input in FP8, ONE fp32 scale [1], the norm output only
    when asked; a non-FP8 quant dtype is refused by name."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    op = torch.ops.fusion_passes.allreduce_add_rmsnorm_fp8_per_tensor
    with FakeTensorMode():
        x = torch.empty(7, 3, 96, dtype=torch.bfloat16)
        q, sc, r, n = op(x, x, torch.empty(96, dtype=torch.bfloat16), 1e-6, "c10d:0", return_norm=True)
        assert (q.shape, q.dtype, sc.shape, sc.dtype) == ((7, 3, 96), torch.float8_e4m3fn, (1,), torch.float32)
        assert (r.shape, n.shape) == ((7, 3, 96), (7, 3, 96))
        q, sc, r, n = op(x, None, None, 1e-6, "c10d:0", fp8_dtype=torch.float8_e4m3fnuz)
        assert (q.dtype, tuple(n.shape)) == (torch.float8_e4m3fnuz, (0,))
        with pytest.raises(TypeError, match="fp8_dtype"):
            op(x, None, None, 1e-6, "c10d:0", fp8_dtype=torch.int8)


def _per_tensor_block(scale_of, *, floor=None, ub=False, leak=False):
    """all-reduce -> add -> vLLM norm -> a hand-written per-tensor FP8 chain; ``scale_of``
    picks the tensor whose max makes the scale (the norm output y, or another input z);
    ``ub``: z is an upper bound on the amax."""
    lo = epilogue.fp8_min_scaling_factor() if floor is None else floor

    def block(x, res, w, z):
        t = all_reduce(x) + res
        y = fp32_weight_rms_norm(t, w)
        amax = scale_of(y, z).abs().max().unsqueeze(-1).to(torch.float32)
        if ub:
            amax = amax.clamp(max=z)
        s = (amax / 448.0).clamp(min=lo)
        q = (y.to(torch.float32) * s.reciprocal()).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
        return (q, s, t, amax) if leak else (q, s, t)

    return block


@pytest.mark.parametrize("case,reason", [
    (dict(scale_of=lambda y, z: z), "per-tensor scale is computed from z"),
    (dict(scale_of=lambda y, z: y, ub=True), "upper bound on a per-tensor scale"),
    (dict(scale_of=lambda y, z: y, leak=True), "of the per-tensor quant has a user outside it"),
], ids=["scale_from_other_tensor", "scale_ub", "amax_has_outside_user"])
def test_per_tensor_quant_that_is_not_vllms_does_not_fuse(fake_pg, case, reason):
    """Per-tensor chains that differ from vLLM's (scale from another tensor, another floor,
    an upper bound, an intermediate read outside): AR + norm fuse, the quant stays, numerics
    unchanged bit for bit."""
    z = torch.tensor([3.0]) if case.get("ub") else torch.randn(5, 64, dtype=torch.bfloat16)
    args = (*_args(5, 64, torch.bfloat16, 11)[:3], z)
    gm = trace(_per_tensor_block(**case), *args)
    site = _plain_site_note(gm)
    assert site.family.name == "allreduce_add_rmsnorm" and site.quant is None
    assert reason in site.note, site.note
    ref, report = _fuse(gm)
    assert [s.variant for s in report.sites] == ["allreduce_add_rmsnorm"]
    FileCheck().check_count("fusion_passes.allreduce_add_rmsnorm.default", 1, exactly=True) \
        .check("aten.max").check("float8_e4m3fn").run(gm.code)
    FileCheck().check_not("allreduce_add_rmsnorm_fp8_per_tensor").run(gm.code)
    _assert_same(ref, gm, args)


def test_per_tensor_has_no_gpu_kernel_so_the_gpu_leaves_the_quant(fake_pg):
    """No kernel backend implements add_rmsnorm_fp8_per_tensor: for a CUDA call the selector
    lands on the reference backend, which match.find_site refuses on a GPU (the eager chain
    inside one op is slower than Inductor's compiled chain), so AR + norm fuse and the quant
    stays. Each vendor's refusal names the variant."""
    call = backends.Call(variant="add_rmsnorm_fp8_per_tensor", device="cuda", dtype=torch.bfloat16,
                         hidden=7168, world_size=2, flags=Flags(residual_in_fp32=True))
    assert backends.select(call) == "reference"
    for name in backends.ORDER:
        why = backends.why_not(name, call)
        if name == "reference":
            assert why is None
        else:
            assert why is not None and "add_rmsnorm_fp8_per_tensor" in why, (name, why)
    assert backends.why_not("triton", call) == "triton does not implement add_rmsnorm_fp8_per_tensor"


class _PlainOnly:
    """A real backend that fuses all-reduce + norm only (the reference's math), to check
    quant-aware selection: its quant variants are missing, so the quant must stay."""

    name = "plain_only"
    variants = frozenset({"add_rmsnorm"})

    def unsupported(self, call):
        return None

    def run(self, variant, *args, **kwargs):
        return backends.get("reference").run(variant, *args, **kwargs)


@needs_vllm
def test_quant_left_unfused_when_no_backend_runs_it(fake_pg):
    backends.register("plain_only", _PlainOnly, before="reference")
    try:
        def block(x, res, w):
            t = all_reduce(x) + res
            return (*VLLM_Q["group128"].forward_native(fp32_weight_rms_norm(t, w)), t)

        args = _args(3, 256, torch.bfloat16, 5)[:3]
        gm = trace(block, *args)
        ar = next(recognize_all_reduce(n) for n in gm.graph.nodes if recognize_all_reduce(n) is not None)
        site = find_site(ar, "plain_only")
        assert site.family.name == "allreduce_add_rmsnorm" and site.backend == "plain_only"
        assert site.note.startswith("quant fp8_per_group left unfused: no backend runs add_rmsnorm_fp8_per_group")
        ref, report = _fuse(gm, backend="plain_only")
        assert [(s.variant, s.backend) for s in report.sites] == [("allreduce_add_rmsnorm", "plain_only")]
        FileCheck().check_count("fusion_passes.allreduce_add_rmsnorm.default", 1, exactly=True) \
            .check("max").check("float8_e4m3fn").run(gm.code)
        _assert_same(ref, gm, args)
    finally:
        backends.unregister("plain_only")


@needs_vllm
def test_idempotent_and_deterministic(fake_pg):
    def block(x, res, w):
        t = all_reduce(x) + res
        return (*VLLM_Q["token"].forward_native(fp32_weight_rms_norm(t, w)), t)

    args = _args(3, 128, torch.bfloat16, 6)[:3]
    a, b = trace(block, *args), trace(block, *args)
    _fuse(a)
    _fuse(b)
    once = a.code
    _, report = _fuse(a)
    assert a.code == once == b.code
    assert report.fused == []


# ---------------------------------------------------------------------- FP4 + fused ops


@pytest.mark.skipif(not HAVE_C_OPS, reason="needs vLLM 0.33's wheel (its _C schemas) installed")
@settings(max_examples=8)
@given(tokens=st.sampled_from([1, 3, 130]), hidden=st.sampled_from([16, 64, 96]), swizzle=st.booleans(),
       dtype=st.sampled_from([torch.bfloat16, torch.float16]), seed=st.integers(0, 2**16))
def test_property_nvfp4_fuses_bit_exact(fake_pg, tokens, hidden, swizzle, dtype, seed):
    args = (*_args(tokens, hidden, dtype, seed)[:3], torch.tensor([448.0 * 6.0 / 10.0]))
    gm = trace(_nvfp4_block(swizzle), *args)
    ref, report = _fuse(gm)
    assert [s.variant for s in report.sites] == ["allreduce_add_rmsnorm_nvfp4"]
    _assert_same(ref, gm, args)


@pytest.mark.parametrize("return_norm", [False, True])
def test_mxfp4_op_matches_epilogue_and_rejects_bad_input(fake_pg, return_norm):
    """MXFP4 has no unfused form to match in vLLM 0.33 (see fusion_passes.recognize.quant_fp4): check the
    fused op's fake (output shapes, dtypes, the optional norm output) and its input errors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    op = torch.ops.fusion_passes.allreduce_add_rmsnorm_mxfp4
    with FakeTensorMode():
        x = torch.empty(5, 64, dtype=torch.bfloat16)
        q, s, r, n = op(x, x, torch.empty(64, dtype=torch.bfloat16), 1e-6, "c10d:0", return_norm=return_norm)
        assert (q.shape, q.dtype, s.shape, s.dtype) == ((5, 32), torch.uint8, (5, 2), torch.uint8)
        assert tuple(n.shape) == ((5, 64) if return_norm else (0,))
        with pytest.raises(TypeError, match="fp16/bf16"):
            op(x.float(), None, None, 1e-6, "c10d:0")
        with pytest.raises(ValueError, match="hidden % 32"):
            op(torch.empty(5, 48, dtype=torch.bfloat16), None, None, 1e-6, "c10d:0")


def test_epilogue_fp4_matches_vllm_reference():
    """NVFP4 against vLLM's own ref_nvfp4_quant; MXFP4 against hand-checked OCP values."""
    pytest.importorskip("vllm", reason="needs vLLM 0.33 (the vllm extra): its ref_nvfp4_quant")
    from vllm.model_executor.layers.quantization.utils.nvfp4_emulation_utils import ref_nvfp4_quant
    g = torch.Generator().manual_seed(0)
    y = (torch.randn(9, 64, generator=g) * 3).to(torch.bfloat16)
    gs = torch.tensor([448.0 * 6.0 / y.abs().max().float().item()])
    packed, scales = epilogue.nvfp4(y, gs, swizzle=False)
    want_q, want_s = ref_nvfp4_quant(y, gs, 16)
    lut = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6])
    codes = torch.stack([packed & 15, packed >> 4], -1).reshape(9, 64).long()
    assert torch.equal(lut[codes & 7] * torch.where(codes >= 8, -1.0, 1.0), want_q)
    assert torch.equal(scales.float(), want_s)
    # MXFP4: block max 6.0 -> exponent floor(log2(6)) - 2 = 0 (byte 127); ties go to even
    row = torch.tensor([[6.0, 0.25, 0.75, 2.5, -5.0, -0.1] + [0.0] * 26], dtype=torch.bfloat16)
    q, s = epilogue.mxfp4(row)
    assert s.tolist() == [[127]]
    assert q[0, :3].tolist() == [0x7 | (0x0 << 4), 0x2 | (0x4 << 4), 0xE | (0x8 << 4)]


def test_patterns_command_lists_every_quant_family_before_the_plain_ones():
    from fusion_passes.patterns import CATALOGUE
    from fusion_passes.recognize import VARIANTS
    from fusion_passes.cli import patterns_cmd

    rows = patterns_cmd.rows()
    names = [r["family"] for r in rows]
    assert names == [f.name for f in CATALOGUE]
    for kind in VARIANTS:
        for fam in (f"allreduce_add_rmsnorm_{kind}", f"allreduce_rmsnorm_{kind}",
                    f"allreduce_add_rmsnorm_{kind}_out", f"allreduce_rmsnorm_{kind}_out"):
            assert fam in names
    first_plain = names.index("allreduce_add_rmsnorm")
    assert all(f.quant is not None for f in CATALOGUE[:first_plain])
    assert all(f.quant is None for f in CATALOGUE[first_plain:])
    assert all("reference" in r["backends"] for r in rows)  # the reference runs every variant


def test_per_tensor_quant_with_another_floor_fuses_with_its_form(fake_pg):
    """A per-tensor chain flooring its scale at 1e-12 instead of vLLM's 1/(448*512) is the
    same math with another constant: recognized by meaning (fusion_passes.recognize.meaning), fused
    with the FP8 form that names the floor, bit-exact on simulated ranks."""
    args = (*_args(5, 64, torch.bfloat16, 11)[:3], torch.randn(5, 64, dtype=torch.bfloat16))
    gm = trace(_per_tensor_block(lambda y, z: y, floor=1e-12), *args)
    ref, report = _fuse(gm)
    assert [s.variant for s in report.sites] == ["allreduce_add_rmsnorm_fp8_per_tensor"]
    node = next(n for n in gm.graph.nodes if "fp8_per_tensor" in str(n.target))
    assert node.kwargs.get("form") == "scale_min=1e-12"
    rank_args = [[a + r for a in args] for r in range(2)]
    for a, b in zip(run_ranks(ref, rank_args)[0], run_ranks(gm, rank_args)[0]):
        assert torch.equal(_bits(a), _bits(b))
