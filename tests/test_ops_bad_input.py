"""The fused ops on bad or edge input, for every variant: a named error or the right
(empty) result, never uninitialized memory or an error from deep inside the math."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fusion_passes  # noqa: F401  (registers the ops)
from fusion_passes import epilogue, groups, ops, variants

H = 128
GROUP = "c10d:0"
# valid quant arguments of every variant (tensors on the CPU)
QUANT = {
    "add_rmsnorm": {},
    "add_rmsnorm_fp8_static": dict(scale=torch.tensor([0.02])),
    "add_rmsnorm_fp8_per_token": dict(scale_ub=torch.tensor([2.0])),
    "add_rmsnorm_fp8_per_group": dict(group_size=64),
    "add_rmsnorm_fp8_per_tensor": {},
    "add_rmsnorm_nvfp4": dict(global_scale=torch.tensor([400.0])),
    "add_rmsnorm_mxfp4": {},
}
TENSOR_ARGS = [(v, name) for v in variants.NAMES
               for name in ("residual", "weight", *(k for k, t in QUANT[v].items() if torch.is_tensor(t)))]


def test_every_variant_has_a_case():
    assert set(QUANT) == set(variants.NAMES)


def _call(variant, x, **over):
    args = dict(residual=torch.zeros_like(x), weight=torch.ones(x.shape[-1], dtype=x.dtype), eps=1e-6, group=GROUP,
                **QUANT[variant])
    args.update(over)
    residual, weight, eps, group = (args.pop(k) for k in ("residual", "weight", "eps", "group"))
    return ops.OPS[variant](x, residual, weight, eps, group, **args)


@pytest.mark.parametrize("variant, name", TENSOR_ARGS)
@pytest.mark.parametrize("device", ["meta"])
def test_a_tensor_on_another_device_is_a_named_error(variant, name, device):
    """A residual, weight or quant tensor on another device (meta here: the only other one
    on a CPU machine) is refused by name, in the eager op and in its fake."""
    x = torch.randn(4, H, dtype=torch.bfloat16)
    value = {"residual": torch.zeros_like(x), "weight": torch.ones(H, dtype=x.dtype)}.get(name, QUANT[variant].get(name))
    with pytest.raises(ValueError, match=f"{name} is on {device} but input is on cpu"):
        _call(variant, x, **{name: value.to(device)})
    with pytest.raises(ValueError, match=f"{name} is on {device}"):
        with FakeTensorMode(allow_non_fake_inputs=True):
            _call(variant, x, **{name: value.to(device)})


@pytest.mark.parametrize("variant", variants.NAMES)
@pytest.mark.parametrize("lead", [(0,), (2, 0)])
def test_zero_tokens_give_empty_results(variant, lead):
    """No tokens: every output has the fake's shape, dtype and layout; per-tensor FP8 gives
    its one scale (the floor: the max over no element is 0), not an error from max()."""
    x = torch.empty(*lead, H, dtype=torch.bfloat16)
    with groups.simulated_sum(x, 2):
        got = _call(variant, x)
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = _call(variant, x)
    names = variants.get(variant).output_names
    for name, g, f in zip(names, got, fake, strict=True):
        assert (g.dtype, tuple(g.shape)) == (f.dtype, tuple(f.shape)), name
        assert g.numel() == (1 if variant == "add_rmsnorm_fp8_per_tensor" and name == "scales" else 0), name
    if variant == "add_rmsnorm_fp8_per_tensor":
        floor = torch.tensor([epilogue.fp8_min_scaling_factor(torch.float8_e4m3fn)], dtype=torch.float32)
        assert torch.equal(got[1], floor)


@pytest.mark.parametrize("group_size", [0, -64])
def test_per_group_size_must_be_positive(group_size):
    x = torch.randn(4, H, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=f"group_size > 0, got {group_size}"):
        _call("add_rmsnorm_fp8_per_group", x, group_size=group_size)
    with pytest.raises(ValueError, match="group_size > 0"):
        with FakeTensorMode(allow_non_fake_inputs=True):
            _call("add_rmsnorm_fp8_per_group", x, group_size=group_size)


@pytest.mark.parametrize("variant", ["add_rmsnorm_fp8_per_group", "add_rmsnorm_fp8_per_tensor"])
def test_a_negative_scale_min_must_be_a_named_sentinel(variant):
    x = torch.randn(4, H, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="SCALE_MIN_NATIVE"):
        _call(variant, x, scale_min=-0.5)


def test_the_sentinels_resolve_per_variant():
    """SCALE_MIN_NATIVE is 1/(fp8_max*512) everywhere; SCALE_MIN_KERNEL is each kernel's floor."""
    from fusion_passes import arguments

    native = epilogue.fp8_min_scaling_factor(torch.float8_e4m3fn)
    x = torch.randn(2, H, dtype=torch.bfloat16)
    for variant, extra, kernel in (("add_rmsnorm_fp8_per_group", dict(group_size=64), 0.0),
                                   ("add_rmsnorm_fp8_per_group", dict(group_size=64, ue8m0=True), 1e-10),
                                   ("add_rmsnorm_fp8_per_tensor", {}, 0.0)):
        spec = variants.get(variant)
        for sentinel, want in ((variants.SCALE_MIN_NATIVE, native), (variants.SCALE_MIN_KERNEL, kernel)):
            a = arguments.bind(spec, (x, None, None, 1e-6, GROUP), {**extra, "scale_min": sentinel})
            assert arguments.resolve(spec, a)["scale_min"] == want, (variant, extra, sentinel)


@pytest.mark.parametrize("variant, hidden, error", [
    ("add_rmsnorm_nvfp4", 40, "hidden % 16"), ("add_rmsnorm_mxfp4", 48, "hidden % 32"),
    ("add_rmsnorm_fp8_per_group", 96, "hidden % 64"),
])
def test_hidden_not_a_multiple_of_the_block(variant, hidden, error):
    with pytest.raises(ValueError, match=error):
        _call(variant, torch.randn(2, hidden, dtype=torch.bfloat16))


@pytest.mark.parametrize("variant", ["add_rmsnorm_nvfp4", "add_rmsnorm_mxfp4"])
def test_fp4_takes_16_bit_activations_only(variant):
    with pytest.raises(TypeError, match="fp16/bf16"):
        _call(variant, torch.randn(2, H))


@pytest.mark.parametrize("variant, name", [("add_rmsnorm_fp8_static", "scale"), ("add_rmsnorm_nvfp4", "global_scale")])
def test_one_element_scales(variant, name):
    with pytest.raises(ValueError, match=f"1-element {name}"):
        _call(variant, torch.randn(2, H, dtype=torch.bfloat16), **{name: torch.ones(2)})


def test_bad_fp8_dtype_and_unknown_argument():
    x = torch.randn(2, H, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="fp8_dtype must be one of"):
        _call("add_rmsnorm_fp8_per_token", x, fp8_dtype=torch.float16)
    with pytest.raises(Exception, match="scale_ub"):  # the dispatcher refuses a name not in the schema
        _call("add_rmsnorm_mxfp4", x, scale_ub=None)


def test_scale_ub_must_have_one_element():
    """vLLM's scale_ub is one number (QuantFP8.forward_cuda asserts numel() == 1): a
    [hidden] one made eager return [T, hidden] scales against the fake's [T, 1]."""
    x = torch.randn(4, H, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"add_rmsnorm_fp8_per_token needs a 1-element scale_ub, got \(128,\)"):
        _call("add_rmsnorm_fp8_per_token", x, scale_ub=torch.full((H,), 2.0))
    with pytest.raises(ValueError, match="1-element scale_ub"):
        with FakeTensorMode(allow_non_fake_inputs=True):
            _call("add_rmsnorm_fp8_per_token", x, scale_ub=torch.full((H,), 2.0))
    with groups.simulated_sum(x, 2):  # a 0-dim scale_ub is one element too: scales [T, 1]
        got = _call("add_rmsnorm_fp8_per_token", x, scale_ub=torch.tensor(2.0))
        want = _call("add_rmsnorm_fp8_per_token", x, scale_ub=torch.tensor([2.0]))
    assert tuple(got[1].shape) == (4, 1) and all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


@pytest.mark.parametrize("variant, name", [("add_rmsnorm_fp8_per_group", "scale_min"),
                                           ("add_rmsnorm_fp8_per_group", "amax_eps"),
                                           ("add_rmsnorm_fp8_per_tensor", "scale_min")])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_float_quant_argument_must_be_finite(variant, name, value):
    """NaN made every scale and code NaN (and inf every code 0), where -3 was refused."""
    x = torch.randn(4, H, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=f"{variant} {name} must be a finite number, got {value}"):
        _call(variant, x, **{name: value})
    with pytest.raises(ValueError, match=f"{name} must be a finite number"):
        with FakeTensorMode(allow_non_fake_inputs=True):
            _call(variant, x, **{name: value})


def test_a_graph_with_a_per_channel_scale_ub_leaves_its_quant(fake_pg):
    """A per-token FP8 chain whose amax is capped by a [hidden] tensor is no vLLM form: the
    quant stays, named; all-reduce + norm fuse; numerics unchanged bit for bit (before, the
    op was fed the [hidden] bound and the fake's [T, 1] scales disagreed with the graph)."""
    from graphs import all_reduce, count, fp32_weight_rms_norm, run_pass, trace

    def block(x, res, w, ub):
        t = all_reduce(x) + res
        y = fp32_weight_rms_norm(t, w)
        amax = y.abs().amax(-1, keepdim=True).float().clamp(max=ub)
        s = (amax / 448.0).clamp(min=epilogue.fp8_min_scaling_factor())
        return (y.float() * s.reciprocal()).clamp(-448.0, 448.0).to(torch.float8_e4m3fn), s, t

    g = torch.Generator().manual_seed(3)
    args = (torch.randn(5, H, generator=g).bfloat16(), torch.randn(5, H, generator=g).bfloat16(),
            torch.randn(H, generator=g).bfloat16(), torch.rand(H, generator=g) * 4)
    gm = trace(block, *args)
    before, report = run_pass(gm)
    assert not report.errors and [s.variant for s in report.sites] == ["allreduce_add_rmsnorm"]
    assert "the upper bound ub_1 has shape (128,), not one element" in report.sites[0].reason
    assert count(gm, "fusion_passes.allreduce_add_rmsnorm") == 1
    want, got = before(*args), gm(*args)
    assert all(torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                           b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b)
               for a, b in zip(want, got, strict=True))
