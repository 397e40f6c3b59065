"""CPU tests of the kernel backends' gates (no GPU, no vendor kernel).

The gates are pure functions of the call, tested directly. The vendor adapters' calls are
checked against the vendors' own signatures in tests/test_vendor_adapters.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fusion_passes import arguments, backends, ops, variants
from fusion_passes.backends import Call, aiter as aiter_backend, flashinfer as fi_backend, thresholds
from fusion_passes.backends import triton as triton_backend


def bound(variant, x, residual, weight, eps, group, **kw):
    """One call's FusedArgs, bound and resolved as the fused op binds them."""
    spec = variants.get(variant)
    a = arguments.bind(spec, (x, residual, weight, eps, group), kw)
    return arguments.fused_args(spec, a, arguments.resolve(spec, a))


def call(variant="add_rmsnorm", device="cuda", dtype=torch.bfloat16, hidden=4096, world_size=2, tokens=64,
         single_node=True):
    return Call(variant=variant, device=device, dtype=dtype, hidden=hidden, world_size=world_size,
                tokens=tokens, single_node=single_node)


def test_registration_order():
    assert backends.ORDER == ["aiter", "flashinfer", "triton", "reference"]


def test_cpu_calls_go_to_reference():
    assert backends.select(call(device="cpu")) == "reference"


# -- triton ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, reason",
    [
        (dict(device="cpu"), "NVIDIA CUDA GPU"),
        (dict(device="rocm"), "NVIDIA CUDA GPU"),
        (dict(dtype=torch.float64), "dtype"),
        (dict(world_size=3), "power of two"),
        (dict(world_size=16), "world size 16"),
        (dict(single_node=False), "several nodes"),
        (dict(hidden=32768), "fit in registers"),
        (dict(hidden=4100), "multiple of 16"),
        (dict(world_size=8), "no measured crossover"),
        (dict(world_size=4), "no measured crossover"),
        (dict(world_size=2, tokens=32768, hidden=16384), "workspace"),
    ],
)
def test_triton_declines(kw, reason):
    got = triton_backend.unsupported(call(**kw))
    assert got is not None and reason in got, got


def test_triton_follows_the_measured_world_size_1_table():
    """thresholds.TRITON at world size 1 (results/bench_kernels_h200_ws1*.json): the quant
    variants that beat Inductor's best compiled epilogue at every token count are admitted at
    every size; add + RMSNorm at hidden 7168 only where it won (1..256, 2048 and up)."""
    for variant in ("add_rmsnorm_fp8_per_token", "add_rmsnorm_fp8_per_group", "add_rmsnorm_nvfp4",
                    "add_rmsnorm_mxfp4"):
        for tokens in (1, 64, 16384, None):
            assert triton_backend.unsupported(call(variant=variant, world_size=1, tokens=tokens)) is None
    admitted = {t: triton_backend.unsupported(call(world_size=1, hidden=7168, tokens=t)) is None
                for t in (1, 256, 257, 512, 1024, 2047, 2048, 16384, None)}
    assert admitted == {1: True, 256: True, 257: False, 512: False, 1024: False, 2047: False, 2048: True,
                        16384: True, None: True}
    assert triton_backend.unsupported(call(variant="add_rmsnorm_fp8_static", world_size=1, hidden=7168,
                                           tokens=16384)) is not None  # lost in one of its two timings


def test_triton_declines_beyond_measured_crossover(monkeypatch):
    table = dict(thresholds.TRITON["max_tokens_faster"])
    table[(4, "add_rmsnorm")] = 512
    monkeypatch.setitem(thresholds.TRITON, "max_tokens_faster", table)
    assert triton_backend.unsupported(call(world_size=4, tokens=512)) is None
    assert "crossover" in triton_backend.unsupported(call(world_size=4, tokens=513))
    assert triton_backend.unsupported(call(world_size=4, tokens=None)) is None  # graph site: some range


def test_triton_variants_are_declared_honestly():
    """Every fused op is in the triton kernel (FP4 since the NVFP4/MXFP4 epilogues); each
    is admitted only where `bench kernels` measured it (thresholds.TRITON)."""
    assert triton_backend.VARIANTS == frozenset(ops.VARIANTS) - {"add_rmsnorm_fp8_per_tensor"}
    measured = {v for (_, v) in thresholds.TRITON["max_tokens_faster"]}
    assert measured == triton_backend.VARIANTS


@pytest.mark.parametrize("kw, reason", [
    (dict(variant="add_rmsnorm_fp8_per_group", group_size=32), "group size 32"),
    (dict(variant="add_rmsnorm_nvfp4", dtype=torch.float32), "float32"),
    (dict(variant="add_rmsnorm_mxfp4", hidden=4112), "4112"),
])
def test_triton_declines_quant_shapes_it_does_not_run(kw, reason):
    """The selector sees the group size and the activation dtype, so these calls go elsewhere
    before any launch (the backend's run-time fallback is only a safety net)."""
    why = triton_backend.unsupported(Call(**{**dict(device="cuda", dtype=torch.bfloat16, hidden=4096,
                                                     world_size=1, tokens=8), **kw}))
    assert why is not None and reason in why, why


def test_triton_quantizes_the_unrounded_norm_for_fp8_only():
    """quant_unrounded: the kernel's FP8 quants read the norm value before its rounding
    (Q_RAW; checked against the reference on a GPU by tests/gpu/parity_check.py); the FP4
    quants have no such form (epilogue.FP8_CODES) and are declined with the flag."""
    flags = variants.Flags(quant_unrounded=True)
    for variant in ("add_rmsnorm_fp8_static", "add_rmsnorm_fp8_per_token", "add_rmsnorm_fp8_per_group"):
        c = Call(variant=variant, device="cuda", dtype=torch.bfloat16, hidden=4096, world_size=1, tokens=8,
                 flags=flags)
        assert triton_backend.unsupported(c) is None, variant
    for variant in ("add_rmsnorm_nvfp4", "add_rmsnorm_mxfp4"):
        c = Call(variant=variant, device="cuda", dtype=torch.bfloat16, hidden=4096, world_size=1, tokens=8,
                 flags=flags)
        why = triton_backend.unsupported(c)
        assert why is not None and "quant_unrounded" in why, why


# -- aiter ----------------------------------------------------------------------------
def acall(**kw):
    kw.setdefault("device", "rocm")
    return call(**kw)


@pytest.mark.parametrize(
    "kw, reason",
    [
        (dict(device="cuda"), "ROCm"),
        (dict(world_size=6), "world size 6"),
        (dict(world_size=1), "world size 1"),
        (dict(hidden=4100), "multiple of 8"),
        (dict(hidden=32768), "2-stage"),
        (dict(variant="add_rmsnorm_fp8_per_token", hidden=8192), "per-token FP8"),
        (dict(tokens=8192, hidden=8192), "RCCL"),
        (dict(hidden=256, tokens=4096), "2-stage kernel"),
        (dict(dtype=torch.float32), "dtype"),
        (dict(single_node=False), "several nodes"),
    ],
)
def test_aiter_declines(kw, reason):
    got = aiter_backend.unsupported(acall(**kw), arch="gfx942:sramecc+:xnack-", installed=True)
    assert got is not None and reason in got, got


def test_aiter_declines_other_archs():
    assert "gfx90a" in aiter_backend.unsupported(acall(), arch="gfx90a")


@pytest.mark.parametrize("variant", sorted(aiter_backend.VARIANTS))
def test_aiter_accepts(variant):
    assert aiter_backend.unsupported(acall(variant=variant, hidden=7168), arch="gfx950", installed=True) is None
    assert "not installed" in aiter_backend.unsupported(acall(variant=variant), arch="gfx950", installed=False)


def test_aiter_has_no_static_fp8():
    assert "add_rmsnorm_fp8_static" not in aiter_backend.VARIANTS


# -- flashinfer -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, sm, reason",
    [
        (dict(device="rocm"), 90, "NVIDIA"),
        (dict(world_size=3), 90, "world size 3"),
        (dict(single_node=False), 90, "multicast"),
        (dict(hidden=4100), 90, "multiple of 16"),
        (dict(variant="add_rmsnorm_nvfp4"), 90, "SM100"),
        (dict(world_size=8, tokens=64, hidden=8192), 90, "crossover"),  # 1 MiB > 0.5 MiB on SM90 TP8
        (dict(world_size=4), 80, "no measured crossover"),
    ],
)
def test_flashinfer_declines(kw, sm, reason):
    got = fi_backend.unsupported(call(**kw), sm=sm, installed=True)
    assert got is not None and reason in got, got


def test_flashinfer_accepts():
    assert fi_backend.unsupported(call(world_size=8, tokens=32, hidden=8192), sm=90, installed=True) is None  # 0.5 MiB
    assert fi_backend.unsupported(call(variant="add_rmsnorm_nvfp4", world_size=4), sm=100, installed=True) is None
    assert "not installed" in fi_backend.unsupported(call(), sm=90, installed=False)


def test_flashinfer_offers_no_fp32_scale_per_group():
    assert "add_rmsnorm_fp8_per_group" not in fi_backend.VARIANTS


def test_triton_runs_an_unsupported_group_size_on_the_reference(fake_pg, monkeypatch):
    """A call that bypasses the selector (e.g. ``backend="triton"`` forced past its gate is refused,
    but ``TritonBackend.run`` called directly is not) is still answered correctly."""
    from fusion_passes.backends import reference

    seen = []
    monkeypatch.setattr(reference.ReferenceBackend, "run", lambda self, variant, a: seen.append((variant, a)) or "ref")
    args = bound("add_rmsnorm_fp8_per_group", torch.randn(2, 96), None, None, 1e-6, "c10d:" + fake_pg.group_name,
                 group_size=32, ue8m0=True)
    out = triton_backend.TritonBackend().run("add_rmsnorm_fp8_per_group", args)
    assert out == "ref" and seen == [("add_rmsnorm_fp8_per_group", args)]
    assert args.quant["scale_min"] == variants.KERNEL_GROUP_EPS  # SCALE_MIN_KERNEL with UE8M0, resolved


def test_triton_run_takes_only_bound_arguments():
    """One call form: ``run(variant, FusedArgs)``; anything else is a named error."""
    with pytest.raises(TypeError, match="takes a FusedArgs, got tuple"):
        triton_backend.TritonBackend().run("add_rmsnorm", (torch.randn(2, 64),))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed without a CUDA GPU")
def test_bench_kernels_says_it_needs_a_gpu(capsys):
    from fusion_passes import cli

    assert cli.main(["bench", "kernels", "--tokens", "1"]) == 2
    assert "needs an NVIDIA CUDA GPU" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a CUDA call gated on a machine without a CUDA GPU")
def test_why_not_never_raises_when_a_gate_cannot_query_the_device():
    """FlashInfer's gate reads the GPU's SM version; with no GPU that query raises. The
    selector must answer with a reason (and move on), not fail the compile."""
    why = backends.why_not("flashinfer", call(variant="add_rmsnorm_nvfp4"))
    assert why is not None and why.startswith("flashinfer")
    assert backends.select(call(variant="add_rmsnorm_nvfp4")) in ("triton", "reference")


@pytest.mark.parametrize("name", [n for n in backends.ORDER if n != "reference"])
def test_kernel_backends_leave_the_input_product_form_to_the_reference(fake_pg, monkeypatch, name):
    """The static form ``input_product`` (SGLang's native static quant with a 0-dim scale:
    the product rounded to bf16) is no kernel's: whichever backend the selector picks, the
    op runs the call on the reference backend, which computes the form."""
    from fusion_passes import fp8_forms

    assert "form" not in getattr(backends.get(name), "quant_options", ())
    monkeypatch.setattr(backends, "select", lambda *a, **k: name)
    x, scale = torch.randn(4, 4096, dtype=torch.bfloat16) * 3, torch.tensor(0.0173)
    q, _, norm = torch.ops.fusion_passes.allreduce_add_rmsnorm_fp8_static(
        x, None, None, 1e-6, "c10d:" + fake_pg.group_name, scale=scale, return_norm=True, form="input_product")
    want = fp8_forms.static(norm, scale, 448.0, torch.float8_e4m3fn, "input_product")
    assert torch.equal(q.view(torch.uint8), want.view(torch.uint8))
    fp32 = fp8_forms.static(norm, scale, 448.0, torch.float8_e4m3fn, "")  # the form shows on these values
    assert not torch.equal(q.view(torch.uint8), fp32.view(torch.uint8))


def test_vendor_kernels_decline_an_fp32_residual():
    """A previous site's carry_fp32 sum reaches a site as an fp32 residual (added in fp32,
    epilogue.add_residual); AITER and FlashInfer read the residual as the activation dtype."""
    for backend, device in ((aiter_backend.AiterBackend(), "rocm"), (fi_backend.FlashInferBackend(), "cuda")):
        flags = variants.Flags(residual_in_fp32=backend.name == "aiter")  # each one's accepted residual add
        base = Call(variant="add_rmsnorm", device=device, dtype=torch.bfloat16, hidden=4096, world_size=2,
                    tokens=64, residual=True, flags=flags, residual_dtype=torch.bfloat16)
        assert backend.declines(base) is None, backend.name
        why = backend.declines(dataclasses.replace(base, residual_dtype=torch.float32))
        assert why is not None and "residual" in why and "float32" in why, (backend.name, why)
