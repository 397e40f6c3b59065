"""The fused ops' contract: schemas, fakes, and eager numerics of every variant.

Eager runs go through the REAL op (binding, checks, backend selection: the reference on
CPU) on simulated ranks: inside :func:`fusion_passes.groups.simulated_sum` its all-reduce
returns the sum of the ranks' inputs. The expected values are the unfused math written
out here: the cross-rank sum in rank order, the aten residual add, the norm as models
write it (tests/graphs.py), then the variant's quant function from
:mod:`fusion_passes.epilogue` called directly with the op's arguments. The quant
functions themselves are compared with vLLM's own code in tests/test_quant.py.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fusion_passes  # noqa: F401  (registers the ops)
from fusion_passes import epilogue, groups, ops, variants
from fusion_passes.recognize import roles
from fusion_passes.patterns import CATALOGUE
from graphs import fp32_weight_rms_norm
from ranks import rank_sum

op = torch.ops.fusion_passes.allreduce_add_rmsnorm
H = 128
GROUP = "c10d:0"

# The schemas as published (graphs and dumps carry these argument lists). The per-group
# scale_min default is SCALE_MIN_KERNEL (-2.0): it was -1.0 with the same meaning before
# the sentinels were named. The FP8 variants' ``form`` (fusion_passes.fp8_forms) came
# later: it is the last argument, so graphs written before it bind unchanged. ``promote_out``
# (the norm output's type promotion, issue 22), ``carry_fp32`` and ``quant_unrounded`` (what
# Inductor's compile keeps unrounded, issue 22) came after ``residual_in_fp32``, then
# ``sum_stored`` (the sum Inductor stores in the variance's loop, issue 22), then
# ``amax_unrounded`` (a norm output its Triton code stores in the amax's loop); the rewrite
# writes every argument after ``backend`` as a keyword, so no graph binds these by position.
FLAGS_22 = (", bool promote_out=False, bool carry_fp32=False, bool quant_unrounded=False, bool sum_stored=False"
            ", bool amax_unrounded=False")
SCHEMAS = {
    "add_rmsnorm": "(Tensor input, Tensor? residual, Tensor? weight, float eps, str group, bool gemma=False, "
                   "bool weight_in_fp32=True, str backend=\"auto\", bool residual_in_fp32=False" + FLAGS_22 + ") -> (Tensor, Tensor)",
    "add_rmsnorm_fp8_static": "(Tensor input, Tensor? residual, Tensor? weight, float eps, str group, Tensor scale, "
                              "ScalarType fp8_dtype=24, bool gemma=False, bool weight_in_fp32=True, "
                              "bool return_norm=False, str backend=\"auto\", bool residual_in_fp32=False" + FLAGS_22 + ", str form=\"\") "
                              "-> (Tensor, Tensor, Tensor)",
    "add_rmsnorm_fp8_per_token": "(Tensor input, Tensor? residual, Tensor? weight, float eps, str group, "
                                 "Tensor? scale_ub=None, ScalarType fp8_dtype=24, bool gemma=False, "
                                 "bool weight_in_fp32=True, bool return_norm=False, str backend=\"auto\", "
                                 "bool residual_in_fp32=False" + FLAGS_22 + ", str form=\"\") -> (Tensor, Tensor, Tensor, Tensor)",
    "add_rmsnorm_fp8_per_group": "(Tensor input, Tensor? residual, Tensor? weight, float eps, str group, "
                                 "SymInt group_size, bool ue8m0=False, bool column_major=False, "
                                 "float amax_eps=1e-10, float scale_min=-2., ScalarType fp8_dtype=24, "
                                 "bool gemma=False, bool weight_in_fp32=True, bool return_norm=False, "
                                 "str backend=\"auto\", bool residual_in_fp32=False" + FLAGS_22 + ", str form=\"\") "
                                 "-> (Tensor, Tensor, Tensor, Tensor)",
    "add_rmsnorm_fp8_per_tensor": "(Tensor input, Tensor? residual, Tensor? weight, float eps, str group, "
                                  "float scale_min=-1., ScalarType fp8_dtype=24, bool gemma=False, "
                                  "bool weight_in_fp32=True, bool return_norm=False, str backend=\"auto\", "
                                  "bool residual_in_fp32=False" + FLAGS_22 + ", str form=\"\") -> (Tensor, Tensor, Tensor, Tensor)",
    "add_rmsnorm_nvfp4": "(Tensor input, Tensor? residual, Tensor? weight, float eps, str group, "
                         "Tensor global_scale, bool swizzle=True, bool gemma=False, bool weight_in_fp32=True, "
                         "bool return_norm=False, str backend=\"auto\", bool residual_in_fp32=False" + FLAGS_22 + ") "
                         "-> (Tensor, Tensor, Tensor, Tensor)",
    "add_rmsnorm_mxfp4": "(Tensor input, Tensor? residual, Tensor? weight, float eps, str group, "
                         "bool gemma=False, bool weight_in_fp32=True, bool return_norm=False, "
                         "str backend=\"auto\", bool residual_in_fp32=False" + FLAGS_22 + ") -> (Tensor, Tensor, Tensor, Tensor)",
}

# One valid call per case: variant, quant arguments, and the unfused quant on the norm output y.
CASES = {
    "fp8_static": ("add_rmsnorm_fp8_static", dict(scale=torch.tensor([0.02])),
                   lambda y: (epilogue.fp8_static(y, torch.tensor([0.02])),)),
    "fp8_per_token": ("add_rmsnorm_fp8_per_token", {}, lambda y: epilogue.fp8_per_token(y)),
    "fp8_per_token_ub": ("add_rmsnorm_fp8_per_token", dict(scale_ub=torch.tensor([1.5])),
                         lambda y: epilogue.fp8_per_token(y, torch.tensor([1.5]))),
    "fp8_per_group_kernel": ("add_rmsnorm_fp8_per_group", dict(group_size=64),  # the kernel's floors
                             lambda y: epilogue.fp8_per_group(y, 64, amax_eps=1e-10, scale_min=0.0)),
    "fp8_per_group_ue8m0_col": ("add_rmsnorm_fp8_per_group", dict(group_size=32, ue8m0=True, column_major=True),
                                lambda y: epilogue.fp8_per_group(y, 32, True, True, amax_eps=1e-10, scale_min=1e-10)),
    "fp8_per_group_native": ("add_rmsnorm_fp8_per_group",
                             dict(group_size=128, amax_eps=0.0, scale_min=variants.SCALE_MIN_NATIVE),
                             lambda y: epilogue.fp8_per_group(y, 128)),  # QuantFP8's own floors
    "fp8_per_tensor_native": ("add_rmsnorm_fp8_per_tensor", {}, lambda y: epilogue.fp8_per_tensor(y)),
    "fp8_per_tensor_kernel": ("add_rmsnorm_fp8_per_tensor", dict(scale_min=variants.SCALE_MIN_KERNEL),
                              lambda y: epilogue.fp8_per_tensor(y, scale_min=0.0)),
    "nvfp4_swizzled": ("add_rmsnorm_nvfp4", dict(global_scale=torch.tensor([400.0])),
                       lambda y: epilogue.nvfp4(y, torch.tensor([400.0]))),
    "nvfp4_linear": ("add_rmsnorm_nvfp4", dict(global_scale=torch.tensor([400.0]), swizzle=False),
                     lambda y: epilogue.nvfp4(y, torch.tensor([400.0]), False)),
    "mxfp4": ("add_rmsnorm_mxfp4", {}, lambda y: epilogue.mxfp4(y)),
}


def _bits(t):
    return t.view(torch.uint8) if t.element_size() == 1 else t


def _strides(t):
    return tuple(s for n, s in zip(t.shape, t.stride()) if n > 1)


def _ranks(shape, world=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g).to(torch.bfloat16) for _ in range(world)]


def _on_ranks(fn, inputs, *args, **kwargs):
    """The real op on every simulated rank (rank r's input is inputs[r])."""
    total = rank_sum(inputs)
    outs = []
    for x in inputs:
        with groups.simulated_sum(total, len(inputs)):
            outs.append(fn(x, *args, **kwargs))
    return outs


def test_schemas_are_as_published():
    assert {name: str(o._schema).split("(", 1)[1] for name, o in ops.OPS.items()} == {
        name: s[1:] for name, s in SCHEMAS.items()}
    assert {str(o._schema).split("(")[0] for o in ops.OPS.values()} == {
        f"fusion_passes::{variants.get(n).op}" for n in SCHEMAS}


def test_every_table_reads_the_registry():
    """The ops, the recognizer's kinds and the catalogue cover exactly the registry's variants."""
    assert tuple(ops.OPS) == variants.NAMES
    assert roles.VARIANTS == {v.kind: v.name for v in variants.VARIANTS if v.kind}
    for v in variants.VARIANTS:
        fams = [f for f in CATALOGUE if f.variant == v.name]
        assert len(fams) == (3 if v.kind is None else 4), v.name
        assert all(f.becomes == f"fusion_passes.{v.op}" for f in fams)
    assert len({s for s in variants.SENTINELS}) == len(variants.SENTINELS) and all(s < 0 for s in variants.SENTINELS)


def test_fake_impl_shapes_and_dtypes():
    with FakeTensorMode():
        x = torch.empty(3, 7, 64, dtype=torch.bfloat16)
        out, res = op(x, x, torch.empty(64, dtype=torch.float32), 1e-6, GROUP, False, False)
        assert out.shape == x.shape and out.dtype == torch.float32  # w * h.to(bf16) promotes
        assert res.shape == x.shape and res.dtype == torch.bfloat16
        out, _ = op(x, None, None, 1e-6, GROUP)
        assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("return_norm", [False, True])
@pytest.mark.parametrize("lead", [(5,), (2, 3)])
@pytest.mark.parametrize("residual", [True, False])
def test_every_quant_op_matches_the_unfused_math(case, return_norm, lead, residual):
    """Each quant op, eager on 2 simulated ranks, equals all-reduce -> add -> norm -> quant
    bit for bit (values, shapes, dtypes, layouts), and its fake promises the same."""
    variant, qargs, unfused = CASES[case]
    fn = ops.OPS[variant]
    inputs = _ranks((*lead, H))
    res = _ranks((*lead, H), world=1, seed=1)[0] if residual else None
    w = 1 + 0.1 * _ranks((H,), world=1, seed=2)[0]
    outs = _on_ranks(fn, inputs, res, w, 1e-6, GROUP, return_norm=return_norm, **qargs)
    h = rank_sum(inputs) + res if residual else rank_sum(inputs)
    y = fp32_weight_rms_norm(h, w, 1e-6)
    want = (*unfused(y), h, y if return_norm else y.new_empty((0,)))
    with FakeTensorMode(allow_non_fake_inputs=True):
        fakes = fn(inputs[0], res, w, 1e-6, GROUP, return_norm=return_norm, **qargs)
    names = variants.get(variant).output_names
    assert len(want) == len(names)
    for got in outs:
        for name, g, e, f in zip(names, got, want, fakes, strict=True):
            assert (g.dtype, tuple(g.shape), _strides(g)) == (e.dtype, tuple(e.shape), _strides(e)), name
            assert (f.dtype, tuple(f.shape), _strides(f)) == (g.dtype, tuple(g.shape), _strides(g)), name
            assert torch.equal(_bits(g), _bits(e)), name


@pytest.mark.parametrize("gemma, w_fp32", [(True, True), (False, False)])
def test_norm_flags_reach_the_math(gemma, w_fp32):
    """gemma and weight_in_fp32 change the result (so a dropped flag would show)."""
    from graphs import gemma_rms_norm, hf_rms_norm

    inputs, w = _ranks((4, H)), 0.5 + _ranks((H,), world=1, seed=3)[0]
    (norm, _), _ = _on_ranks(op, inputs, None, w, 1e-6, GROUP, gemma, w_fp32)
    total = rank_sum(inputs)
    want = gemma_rms_norm(total, w) if gemma else hf_rms_norm(total, w)
    assert torch.equal(norm, want)
    (other, _), _ = _on_ranks(op, inputs, None, w, 1e-6, GROUP)
    assert not torch.equal(other, want)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(residual=torch.empty(4, 16)), "residual must match input"),
        (dict(weight=torch.empty(16)), r"weight must be \[32\]"),
        (dict(group="tp0"), "bad group"),
        (dict(input=torch.empty(4, 32, dtype=torch.int32)), "floating point"),
    ],
)
def test_bad_inputs_give_clear_errors(kwargs, error):
    args = dict(input=torch.empty(4, 32), residual=None, weight=torch.empty(32), eps=1e-6, group=GROUP)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=error):
        op(args["input"], args["residual"], args["weight"], args["eps"], args["group"])


def test_epilogue_matches_torch_rms_norm():
    x = torch.randn(6, 64, dtype=torch.bfloat16)
    w = torch.randn(64, dtype=torch.bfloat16)
    want = torch.nn.functional.rms_norm(x, (64,), w, 1e-6)
    torch.testing.assert_close(epilogue.rms_norm(x, w, 1e-6), want, rtol=0, atol=0)
