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
