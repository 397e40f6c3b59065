"""The quant epilogues against code we did not write (tests/oracles.py), byte for byte.

Inputs mix 32-element blocks of several kinds: random magnitudes, all zeros, -0.0 and
negatives that round to -0, fp32/fp16/bf16 subnormals, values near the dtype's max, values
exactly on FP8 E4M3 rounding midpoints after an inexact scale (row amax 1344 = 448 * 3), and
values exactly on E2M1 midpoints (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5 times a power of two).
Every comparison is bit-exact (bytes of the FP8/FP4 data, fp32 scales by value). A
difference of convention is never tolerated silently: tests at the end show that it exists
and that its named flag (tests/oracles.py ``CONVENTIONS``) reproduces the third party.
"""

from __future__ import annotations

import dataclasses
import pathlib

import pytest
import torch
from hypothesis import given, settings, strategies as st

from fusion_passes import epilogue
import oracles

vllm = pytest.importorskip("vllm", reason="needs vLLM 0.33 (the vllm extra): its own quant reference paths")
torchao = pytest.importorskip("torchao", reason="needs torchao (the dev extra): its float8 / mx_formats references")

KINDS = ("random", "zeros", "neg_zero", "tiny", "huge", "fp8_ties", "e2m1_ties")
NORMAL_KINDS = tuple(k for k in KINDS if k != "tiny")
E4M3_MIDPOINTS = torch.tensor([1.0625, 1.1875, 1.3125, 1.4375, 1.5625, 1.6875, 1.8125, 1.9375])
E2M1_MIDPOINTS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
# Scale 7: fl(1/7) is 4.5e-8 (relative) too large, so x * fl(1/7) and x / 7 round apart on
# some E4M3 ties (tests/test_oracle_conventions.py); every 7 * midpoint is exact in bf16.
FP8_TIE_SCALE = 7.0


def _block(kind: str, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """32 values of one kind (fp32, exactly representable in *dtype*)."""
    n = 32
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    if kind == "random":
        return torch.randn(n, generator=g) * 10.0 ** (torch.rand(1, generator=g).item() * 6 - 3)
    if kind == "zeros":
        return torch.zeros(n)
    if kind == "neg_zero":  # -0.0, and negatives that round to -0 against the block's 1.0
        x = -1e-3 * torch.rand(n, generator=g)
        x[::3] = -0.0
        x[0] = 1.0
        return x
    if kind == "tiny":  # subnormals of the dtype
        return torch.randn(n, generator=g) * {torch.float16: 1e-7, torch.bfloat16: 1e-39, torch.float32: 1e-40}[dtype]
    if kind == "huge":  # below torch.finfo(dtype).max, and below oracles.MX_AMAX_ROUNDS_TO_INF
        return torch.randn(n, generator=g).clamp(-4, 4) * (torch.finfo(dtype).max / 32)
    if kind == "fp8_ties":
        picks = E4M3_MIDPOINTS[torch.randint(0, 8, (n,), generator=g)] * 2.0 ** torch.randint(-6, 8, (n,), generator=g)
        x = sign * FP8_TIE_SCALE * picks.clamp(max=448.0)
        x[0] = 448.0 * FP8_TIE_SCALE
        return x
    picks = E2M1_MIDPOINTS[torch.randint(0, 7, (n,), generator=g)]
    x = sign * picks
    x[0] = 6.0
    return x * 2.0 ** torch.randint(-8, 8, (1,), generator=g).item()


@dataclasses.dataclass
class Rows:
    """A drawn norm output: kinds per 32-element block, then built deterministically."""

    dtype: torch.dtype
    lead: tuple
    blocks: int
    kinds: list
    seed: int

    def tensor(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed)
        rows = int(torch.tensor(self.lead).prod().item()) if self.lead else 1
        k = iter(self.kinds * (rows * self.blocks))
        data = torch.stack([torch.cat([_block(next(k), self.dtype, g) for _ in range(self.blocks)])
                            for _ in range(rows)])
        return data.to(self.dtype).reshape(*self.lead, self.blocks * 32)  # the ties are exact in every dtype


@st.composite
def rows(draw, dtypes=(torch.bfloat16, torch.float16, torch.float32), blocks=(4, 8), kinds=KINDS):
    """Norm outputs [T, H] or [B, T, H], H a multiple of 128, mixing block kinds."""
    lead = draw(st.sampled_from([(1,), (3,), (5,), (2, 3)]))
    return Rows(dtype=draw(st.sampled_from(dtypes)), lead=lead, blocks=draw(st.sampled_from(blocks)),
                kinds=draw(st.lists(st.sampled_from(kinds), min_size=1, max_size=5)), seed=draw(st.integers(0, 2**16)))


def same_bytes(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape, got.dtype, want.dtype)
    g, w = got.contiguous().view(torch.uint8), want.contiguous().view(torch.uint8)
    bad = g != w
    assert not bad.any(), f"{what}: {int(bad.sum())} bytes differ, first at {bad.nonzero()[0].tolist()}"


def same_scales(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape and got.stride() == want.stride(), (what, got.shape, want.shape)
    assert torch.equal(got, want), f"{what}: {(got != want).sum()} scales differ"


# ------------------------------------------------------------------ FP8 against vLLM native
@settings(max_examples=150)
@given(r=rows(), ub=st.sampled_from([None, 0.5, 1e4]))
def test_fp8_static_per_token_per_tensor_equal_vllm_native(r, ub):
    y = r.tensor()
    scale = torch.tensor([0.37])
    same_bytes(epilogue.fp8_static(y, scale), oracles.vllm_fp8_static(y, scale), "static q")
    ub_t = None if ub is None else torch.tensor([ub])
    q, s = epilogue.fp8_per_token(y, ub_t)
    wq, ws = oracles.vllm_fp8_per_token(y, ub_t)
    same_bytes(q, wq, "per-token q")
    same_scales(s, ws, "per-token scales")
    q, s = epilogue.fp8_per_tensor(y)
    wq, ws = oracles.vllm_fp8_per_tensor(y)
    same_bytes(q, wq, "per-tensor q")
    same_scales(s, ws, "per-tensor scale")


@settings(max_examples=150)
@given(r=rows(), group=st.sampled_from([32, 64, 128]), ue8m0=st.booleans(), column_major=st.booleans())
def test_fp8_per_group_equals_vllm_native(r, group, ue8m0, column_major):
    """QuantFP8._quantize_group_native's floors: amax_eps=0, scale_min=1/(fp8_max*512)."""
    y = r.tensor()
    q, s = epilogue.fp8_per_group(y, group, ue8m0, column_major, amax_eps=0.0,
                                  scale_min=oracles.VLLM_NATIVE_SCALE_FLOOR)
    wq, ws = oracles.vllm_fp8_per_group(y, group, ue8m0, column_major)
    same_bytes(q, wq, "per-group q")
    same_scales(s, ws, "per-group scales")


# ------------------------------------------------------------------ FP8 against torchao
@settings(max_examples=150)
@given(r=rows(), group=st.sampled_from([32, 128]))
def test_fp8_equals_torchao_blockwise(r, group):
    """torchao divides by the scale at every granularity (CONVENTIONS
    "fp8_scale_applied_by_division"): our per-group path, with one group per block, per row
    or per tensor, is its math; hp_value_lb gives vLLM's floor ("fp8_scale_floor")."""
    y = r.tensor()
    hidden = y.shape[-1]
    for block, ours in (
        ([1] * (y.dim() - 1) + [group], lambda: epilogue.fp8_per_group(y, group)),
        ([1] * (y.dim() - 1) + [hidden], lambda: epilogue.fp8_per_group(y, hidden)),
        (list(y.shape), lambda: epilogue.fp8_per_group(y.reshape(1, -1), y.numel())),
    ):
        q, s = ours()
        wq, ws = oracles.torchao_fp8(y, block)
        same_bytes(q.reshape(y.shape), wq, f"torchao block {block} q")
        assert torch.equal(s.reshape(-1), ws.reshape(-1)), f"torchao block {block} scales"


@settings(max_examples=150)
@given(r=rows(kinds=("random", "neg_zero", "huge", "fp8_ties", "e2m1_ties", "tiny")), group=st.sampled_from([32, 128]))
def test_ue8m0_equals_torchao_rceil(r, group):
    """UE8M0 per-group FP8 = torchao's MXFP8 RCEIL (ceil(log2(amax / 448)), data * 2^-e):
    bit-exact on every group whose scale is above E8M0's range ("ue8m0_exponent_range")."""
    y = r.tensor()
    q, s = epilogue.fp8_per_group(y, group, ue8m0=True, amax_eps=0.0, scale_min=0.0)
    data, exps = oracles.torchao_mx(y, oracles.FP8, group, "rceil")
    amax = y.float().reshape(-1, y.shape[-1] // group, group).abs().amax(-1)
    live = amax / epilogue.fp8_max() > oracles.E8M0_MIN
    assert torch.equal(s.reshape(live.shape)[live], torch.exp2(exps.float() - 127).reshape(live.shape)[live])
    rows_live = live.repeat_interleave(group, -1).reshape(y.shape)
    same_bytes(q[rows_live], data.reshape(y.shape)[rows_live], "UE8M0 q")


# ------------------------------------------------------------------ NVFP4
def _pow2_global_scale(y: torch.Tensor) -> torch.Tensor:
    """A power-of-two global scale near vLLM's 448 * 6 / amax (CONVENTIONS "nvfp4_per_tensor_scale_inverse")."""
    amax = y.float().abs().max().clamp(min=1e-30)
    return torch.exp2(torch.floor(torch.log2(448.0 * 6.0 / amax))).clamp(2.0**-100, 2.0**100).reshape(1)


@settings(max_examples=150)
@given(r=rows(dtypes=(torch.bfloat16, torch.float16)), pow2=st.booleans())
def test_nvfp4_equals_vllm_ref_and_torchao(r, pow2):
    y = r.tensor()
    gs = _pow2_global_scale(y) if pow2 else (448.0 * 6.0 / y.float().abs().max().clamp(min=1e-30)).reshape(1)
    packed, scales = epilogue.nvfp4(y, gs, swizzle=False)
    values, ref_scales = oracles.vllm_nvfp4_linear(y, gs)
    got = oracles.e2m1_values(packed)
    assert torch.equal(got, values), "NVFP4 values vs vLLM"
    signed = oracles.vllm_nvfp4_scaled(y, gs, ref_scales) != 0  # CONVENTIONS "e2m1_exact_negative_zero"
    assert torch.equal(got.signbit()[signed], values.signbit()[signed]), "NVFP4 signs of values that round to 0"
    assert torch.equal(scales.float(), ref_scales), "NVFP4 block scales vs vLLM"
    if pow2:  # torchao, with its block-scale floor as a flag
        tq, ts = oracles.torchao_nvfp4(y, gs)
        fq, fs = epilogue.nvfp4(y, gs, swizzle=False, block_scale_min=oracles.TORCHAO_NVFP4_SCALE_FLOOR)
        same_bytes(fq, tq, "NVFP4 packed vs torchao")
        same_bytes(fs, ts, "NVFP4 scales vs torchao")


@settings(max_examples=100)
@given(tokens=st.integers(1, 300), blocks=st.integers(1, 11), seed=st.integers(0, 2**16))
def test_nvfp4_swizzle_equals_vllm_and_torchao(tokens, blocks, seed):
    g = torch.Generator().manual_seed(seed)
    scales = torch.randint(1, 127, (tokens, blocks), generator=g, dtype=torch.uint8).view(torch.float8_e4m3fn)
    ours = epilogue.nvfp4_swizzle(scales)
    same_bytes(ours, oracles.vllm_swizzle(scales), "swizzle vs vLLM swizzle_blockscale")
    same_bytes(ours, oracles.torchao_swizzle(scales), "swizzle vs torchao to_blocked")


# ------------------------------------------------------------------ MXFP4
@settings(max_examples=150)
@given(r=rows(dtypes=(torch.bfloat16, torch.float16)))
def test_mxfp4_equals_torchao_even(r):
    y = r.tensor()
    if y.dtype == torch.float16:  # torchao's to_mx takes bf16/fp32: fp16 -> fp32 is exact
        y32 = y.float()
    else:
        y32 = y
    data, exps = oracles.torchao_mx(y32, torch.float4_e2m1fn_x2, 32, "even")
    q, s = epilogue.mxfp4(y, divisor_min=oracles.TORCHAO_MX_DIVISOR_FLOOR)
    same_bytes(q.reshape(data.shape), data, "MXFP4 packed vs torchao")
    same_bytes(s.reshape(exps.shape), exps, "MXFP4 scales vs torchao")


def test_mxfp4_equals_vllm_triton_kernel(tmp_path):
    """vLLM's own MXFP4 kernel (mxfp4_utils.downcast_to_mxfp, the Triton kernel it runs on
    GPUs without AITER) in Triton's CPU interpreter (tests/vllm_triton_oracle.py): both
    dtypes, one process for all inputs (the interpreter is slow). Every block kind except
    subnormal inputs, where the interpreter (numpy) is not the GPU: a bf16 block of
    2^-127 and 2^-128 (scale byte 0, so scaled by 2^127 to 1.0 and 0.5) came back as codes
    0, and a block of random subnormals as codes of magnitude 1.0 and more."""
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton", reason="needs triton (a torch dependency): its interpreter runs vLLM's kernel")
    inputs = [Rows(dtype=dt, lead=(t,), blocks=b, kinds=list(kinds), seed=i).tensor()
              for i, (dt, t, b, kinds) in enumerate(
                  (dt, t, b, kinds) for dt in (torch.bfloat16, torch.float16) for t, b in ((1, 4), (5, 8), (130, 1))
                  for kinds in (NORMAL_KINDS, ("e2m1_ties",), ("neg_zero", "zeros"), ("huge", "random")))]
    torch.save(inputs, tmp_path / "in.pt")
    script = Path(__file__).with_name("vllm_triton_oracle.py")
    run = subprocess.run([sys.executable, str(script), str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    for i, (y, (q, s)) in enumerate(zip(inputs, torch.load(tmp_path / "out.pt"))):
        eq, es = epilogue.mxfp4(y)
        same_bytes(eq, q, f"input {i} MXFP4 packed vs vLLM's kernel")
        same_bytes(es, s, f"input {i} MXFP4 scales vs vLLM's kernel")


# The GPU check's params for each variant (tests/gpu/triton_check.py), in oracles.quant_params' form.
GPU_PARAMS = {
    "add_rmsnorm_fp8_static": [(torch.tensor([0.02]),)],
    "add_rmsnorm_fp8_per_token": [(None,), (torch.tensor([3.0]),)],
    "add_rmsnorm_fp8_per_group": [(128, False, False), (128, True, True), (64, False, True)],
    "add_rmsnorm_nvfp4": [(torch.tensor([448.0 * 6 / 5]), True), (torch.tensor([448.0 * 6 / 5]), False)],
    "add_rmsnorm_mxfp4": [()],
}


@pytest.mark.parametrize("variant", sorted(GPU_PARAMS))
def test_oracle_quant_is_the_fused_ops_quant(variant):
    """oracles.oracle_quant (what the GPU check compares the kernel with) reproduces the
    fused op's own quant (its defaults: kernel floors, vLLM's conventions) byte for byte."""
    from fusion_passes import variants

    g = torch.Generator().manual_seed(3)
    y = (torch.randn(77, 512, generator=g) * 2).to(torch.bfloat16)  # a norm output: rms about 2
    y[0, :40] = -0.0  # exact -0.0 in one NVFP4 / MXFP4 block, and zeros in a 32-element group
    for params in GPU_PARAMS[variant]:
        q, s, source = oracles.oracle_quant(variant, y, params)
        assert "epilogue" not in source, source
        eq, es = epilogue.quantize(variant, y, oracles.quant_params(variants.get(variant), *params))
        same_bytes(q.reshape(eq.shape), eq, f"{variant} {params} q vs {source}")
        if es is None:
            assert s is None
        elif es.dtype == torch.float32:
            assert torch.equal(s.reshape(es.shape), es), f"{variant} {params} scales vs {source}"
        else:
            same_bytes(s.reshape(es.shape), es, f"{variant} {params} scales vs {source}")


def test_the_gpu_checks_case_binding_runs_on_the_reference_backend(fake_pg):
    """tests/gpu/triton_check.py binds its positional cases with oracles.fused_args: on the
    CPU (reference backend) every variant's case runs and returns the op's own results."""
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).parent / "gpu"))
    import triton_check
    from fusion_passes import variants
    from fusion_passes.backends.reference import ReferenceBackend

    group = "c10d:" + fake_pg.group_name
    x, res, w = torch.randn(3, 256).bfloat16(), torch.randn(3, 256).bfloat16(), torch.rand(256).bfloat16()
    for variant, cases in sorted(GPU_PARAMS.items()):
        for params in cases:
            q, s, r, n = triton_check.run(ReferenceBackend(), variant, x, res, w, 1e-6, group, False, True, *params,
                                          with_norm_out=True)
            op = getattr(torch.ops.fusion_passes, f"allreduce_{variant}")
            kw = dict(zip(variants.get(variant).positional, params))
            want = op(x, res, w, 1e-6, group, return_norm=True, backend="reference", **kw)
            assert torch.equal(q.view(torch.uint8), want[0].view(torch.uint8)), (variant, params)
            assert torch.equal(r, want[-2]) and torch.equal(n, want[-1]), (variant, params)
