"""Each named difference of convention (tests/oracles.py ``CONVENTIONS``) exists, and its flag
reproduces the third party: one check per convention, on an input built to hit it."""

from __future__ import annotations

import pytest
import torch

from fusion_passes import epilogue
from fusion_passes.variants import KERNEL_GROUP_EPS, get as variant
import oracles

pytest.importorskip("vllm", reason="needs vLLM 0.33 (the vllm extra): its own quant reference paths")
pytest.importorskip("torchao", reason="needs torchao (the dev extra): its float8 / mx_formats references")

BF16 = torch.bfloat16


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def fp8_scale_applied_by_division():
    # amax 3136: scale 7; 12.6875 / 7 = 1.8125 is an E4M3 tie (-> 1.75, even), while fl(1/7)
    # is 4.5e-8 too large, more than half an fp32 ulp of 1.8125: 12.6875 * fl(1/7) -> 1.875
    y = torch.tensor([[3136.0, 12.6875, -12.6875, 1.0]], dtype=BF16)
    q, _ = epilogue.fp8_per_token(y)
    vq, _ = oracles.vllm_fp8_per_token(y)
    tq, _ = oracles.torchao_fp8(y, [1, 4])
    assert torch.equal(_bytes(q), _bytes(vq))
    assert not torch.equal(_bytes(vq), _bytes(tq)), "the two conventions should round the tie apart"
    assert q[0, 1].float().item() == 1.875 and tq[0, 1].float().item() == 1.75
    gq, _ = epilogue.fp8_per_group(y, 4)  # the flag: our dividing path, one group per row
    assert torch.equal(_bytes(gq), _bytes(tq))
    pq, _ = epilogue.fp8_per_group(y.reshape(1, -1), y.numel())  # per tensor
    assert torch.equal(_bytes(pq.reshape(y.shape)), _bytes(oracles.torchao_fp8(y, list(y.shape))[0]))


def fp8_scale_floor():
    y = torch.zeros(2, 8, dtype=BF16)
    y[1] = 1e-6
    q, s = epilogue.fp8_per_token(y)
    tq, ts = oracles.torchao_fp8(y, [1, 8], hp_value_lb=None)
    assert ts[0].item() == 0 and torch.isnan(tq[0].float()).all(), "torchao without a floor: scale 0, q NaN"
    assert s[0].item() == oracles.VLLM_NATIVE_SCALE_FLOOR.__float__() or s[0].item() > 0
    tq, ts = oracles.torchao_fp8(y, [1, 8], hp_value_lb=oracles.TORCHAO_LB_FOR_VLLM_FLOOR)
    gq, gs = epilogue.fp8_per_group(y, 8)
    assert torch.equal(_bytes(gq), _bytes(tq)) and torch.equal(gs.reshape(-1), ts.reshape(-1))
    assert torch.equal(s.reshape(-1), ts.reshape(-1)), "the floored scale is vLLM's"


def fp8_group_kernel_floors():
    y = torch.zeros(2, 128, dtype=BF16)
    y[1, 3] = 1e-9  # amax below the native floor's 1/512, above 0
    for ue8m0 in (False, True):
        kq, ks = epilogue.fp8_per_group(y, 64, ue8m0, amax_eps=KERNEL_GROUP_EPS,
                                        scale_min=variant("add_rmsnorm_fp8_per_group").kernel_scale_min({"ue8m0": ue8m0}))
        vq, vs = oracles.vllm_fp8_per_group(y, 64, ue8m0)
        assert not torch.equal(ks, vs), "the kernel's floors differ from the native chain's"
        nq, ns = epilogue.fp8_per_group(y, 64, ue8m0, amax_eps=0.0, scale_min=oracles.VLLM_NATIVE_SCALE_FLOOR)
        assert torch.equal(ns, vs) and torch.equal(_bytes(nq), _bytes(vq))


def ue8m0_exponent_range():
    below = 448.0 * 2.0**-130  # amax / 448 = 2^-130 < E8M0_MIN: torchao clamps to 2^-127 and scales by 1.0
    above = 448.0 * 2.0**-120
    for amax, differs in ((below, True), (above, False)):
        y = torch.full((1, 32), amax / 2, dtype=torch.float32)
        y[0, 0] = amax
        q, s = epilogue.fp8_per_group(y, 32, ue8m0=True, amax_eps=0.0, scale_min=0.0)
        data, exps = oracles.torchao_mx(y, oracles.FP8, 32, "rceil")
        same = torch.equal(_bytes(q), _bytes(data)) and torch.equal(s.reshape(-1), torch.exp2(exps.float() - 127).reshape(-1))
        assert same != differs, (amax, s, exps)


def _nvfp4_pair(y, gs):
    return epilogue.nvfp4(y, gs, swizzle=False), oracles.torchao_nvfp4(y, gs)


def nvfp4_block_scale_floor():
    y = torch.zeros(1, 32, dtype=BF16)
    y[0, 16:] = torch.linspace(-3, 3, 16)  # block 0 all zero, block 1 normal
    gs = torch.tensor([256.0])
    (q, s), (tq, ts) = _nvfp4_pair(y, gs)
    assert _bytes(s)[0, 0] == 0 and _bytes(ts)[0, 0] != 0, "a zero block: scale 0 here, E4M3_EPS in torchao"
    fq, fs = epilogue.nvfp4(y, gs, swizzle=False, block_scale_min=oracles.TORCHAO_NVFP4_SCALE_FLOOR)
    assert torch.equal(fq, tq) and torch.equal(_bytes(fs), _bytes(ts))


def nvfp4_per_tensor_scale_inverse():
    """A non-power-of-two global scale makes the two differ somewhere; its nearest power of
    two never does (the property test covers random inputs)."""
    g = torch.Generator().manual_seed(0)
    found = 0
    for _ in range(64):
        y = (torch.randn(4, 64, generator=g) * 3).to(BF16)
        gs = (448.0 * 6.0 / y.float().abs().max()).reshape(1)
        (q, s), (tq, ts) = _nvfp4_pair(y, gs)
        found += not (torch.equal(q, tq) and torch.equal(_bytes(s), _bytes(ts)))
        pow2 = torch.exp2(torch.floor(torch.log2(gs)))
        (q, s), (tq, ts) = _nvfp4_pair(y, pow2)
        assert torch.equal(q, tq) and torch.equal(_bytes(s), _bytes(ts))
    assert found, "no input showed the per-tensor-scale difference"


def e2m1_exact_negative_zero():
    y = torch.zeros(1, 16, dtype=BF16)
    y[0, 0], y[0, 1], y[0, 2] = 6.0, -0.0, -0.01  # -0.01 rounds to -0 in either convention
    gs = torch.tensor([448.0])
    q, _ = epilogue.nvfp4(y, gs, swizzle=False)
    values, _ = oracles.vllm_nvfp4_linear(y, gs)
    ours = oracles.e2m1_values(q)
    assert ours[0, 1].signbit() and not values[0, 1].signbit(), "exact -0.0: -0 here, +0 in vLLM"
    assert ours[0, 2].signbit() and values[0, 2].signbit()
    tq, _ = oracles.torchao_nvfp4(y, gs)
    assert torch.equal(q, tq), "torchao keeps the sign of -0.0, as we do"


def mx_divisor_floor():
    y = torch.zeros(1, 32, dtype=BF16)
    y[0, 0], y[0, 1] = 2.0**-125, 2.0**-126  # amax 2^-125: exponent -127
    q, s = epilogue.mxfp4(y)
    data, exps = oracles.torchao_mx(y, torch.float4_e2m1fn_x2, 32, "even")
    assert _bytes(s)[0, 0] == 0 and torch.equal(s.reshape(-1), exps.reshape(-1))
    assert not torch.equal(q.reshape(data.shape), data), "2^127 here, 1 / 2^-126 in torchao"
    fq, _ = epilogue.mxfp4(y, divisor_min=oracles.TORCHAO_MX_DIVISOR_FLOOR)
    assert torch.equal(fq.reshape(data.shape), data)


def mx_amax_rounding_to_inf():
    for amax, differs in ((3.0e38, True), (2.9e38, False)):
        assert (amax >= oracles.MX_AMAX_ROUNDS_TO_INF) == differs
        y = torch.zeros(1, 32, dtype=BF16)
        y[0, 0], y[0, 1] = amax, -amax / 3
        q, s = epilogue.mxfp4(y)
        data, exps = oracles.torchao_mx(y, torch.float4_e2m1fn_x2, 32, "even")
        same = torch.equal(q.reshape(data.shape), data) and torch.equal(s.reshape(-1), exps.reshape(-1))
        assert same != differs, (amax, s, exps)


CHECKS = {f.__name__: f for f in (
    fp8_scale_applied_by_division, fp8_scale_floor, fp8_group_kernel_floors, ue8m0_exponent_range,
    nvfp4_block_scale_floor, nvfp4_per_tensor_scale_inverse, e2m1_exact_negative_zero, mx_divisor_floor,
    mx_amax_rounding_to_inf,
)}


def test_every_convention_has_a_check():
    assert set(CHECKS) == set(oracles.CONVENTIONS)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_convention(name):
    CHECKS[name]()
