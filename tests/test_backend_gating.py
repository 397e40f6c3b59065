"""CPU tests of the kernel backends' gates and argument mapping (no GPU, no vendor library).

The vendor adapters (AITER: ROCm only; FlashInfer: JIT with nvcc + network) cannot run
here. Their gates are pure functions of the call, tested directly; their argument
mapping is tested with the vendor module replaced by a recording fake, which checks
ONLY which vendor function is called with which arguments, never the numerics.
"""

from __future__ import annotations

import types

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


class Recorder:
    """A stand-in vendor module: records (name, args, kwargs) and returns shaped empties."""

    def __init__(self, results):
        self.calls = []
        self._results = results

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)

        def fn(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            return self._results(name, args, kwargs)

        return fn


@pytest.fixture
def aiter_fake(fake_pg):
    def results(name, args, kwargs):
        if name == "get_tp_group":
            return types.SimpleNamespace(world_size=2)
        x = args[0]
        extra = (torch.empty(1),) if kwargs.get("emit_bf16") else ()
        return (torch.empty(1), x.clone(), torch.empty(2)) + extra if "quant" in name else (x.clone(), x.clone())

    rec = Recorder(results)
    return aiter_backend.AiterBackend(comm=rec, fp8_dtype=torch.float8_e4m3fn), rec, "c10d:" + fake_pg.group_name


def vendor_calls(rec):
    return [c for c in rec.calls if c[0] != "get_tp_group"]


def test_aiter_add_rmsnorm_mapping(aiter_fake):
    be, rec, group = aiter_fake
    x, r, w = torch.randn(4, 16), torch.randn(4, 16), torch.randn(16)
    be.run("add_rmsnorm", bound("add_rmsnorm", x, r, w, 1e-5, group, gemma=True))
    ((name, args, kwargs),) = vendor_calls(rec)
    assert name == "tensor_model_parallel_fused_allreduce_rmsnorm"
    assert args[0] is x and args[1] is r and args[2] is w and args[3] == 1e-5
    assert kwargs == {"gemma_norm": True}


def test_aiter_fills_missing_residual_and_weight(aiter_fake):
    be, rec, group = aiter_fake
    x = torch.randn(4, 16)
    be.run("add_rmsnorm", bound("add_rmsnorm", x, None, None, 1e-5, group))
    (_, args, _), = vendor_calls(rec)
    assert torch.equal(args[1], torch.zeros_like(x)) and torch.equal(args[2], torch.ones(16))


def test_aiter_quant_mappings(aiter_fake):
    be, rec, group = aiter_fake
    x, r, w = torch.randn(4, 256), torch.randn(4, 256), torch.randn(256)
    out = be.run("add_rmsnorm_fp8_per_token", bound("add_rmsnorm_fp8_per_token", x, r, w, 1e-6, group,
                                                    return_norm=True))
    assert out.norm_out is not None
    be.run("add_rmsnorm_fp8_per_group", bound("add_rmsnorm_fp8_per_group", x, r, w, 1e-6, group, group_size=128,
                                              column_major=True))
    be.run("add_rmsnorm_mxfp4", bound("add_rmsnorm_mxfp4", x, r, w, 1e-6, group))
    calls = vendor_calls(rec)
    assert [c[0] for c in calls] == [
        "tensor_model_parallel_fused_allreduce_rmsnorm_quant",
        "tensor_model_parallel_fused_allreduce_rmsnorm_quant",
        "tensor_model_parallel_fused_allreduce_rmsnorm_mxfp4_quant",
    ]
    assert calls[0][2] == {"quant_type": "per_token", "emit_bf16": True, "gemma_norm": False}
    assert calls[1][2] == {"quant_type": "per_group", "group_size": 128, "emit_bf16": False, "transpose_scale": True}
    assert calls[2][2] == {"emit_bf16": False}


def test_aiter_runs_unfused_what_it_would_compute_differently(aiter_fake, monkeypatch):
    from fusion_passes.backends import reference

    be, rec, group = aiter_fake
    seen = []
    monkeypatch.setattr(reference.ReferenceBackend, "run", lambda self, variant, a: seen.append(variant) or "ref")
    x, r, w = torch.randn(4, 256), torch.randn(4, 256), torch.randn(256)
    calls = [
        ("add_rmsnorm", dict(weight_in_fp32=False)),  # Hugging Face weight order
        ("add_rmsnorm_fp8_per_group", dict(group_size=128, ue8m0=True)),  # UE8M0
        ("add_rmsnorm_fp8_per_token", dict(scale_ub=torch.tensor([1.0]))),
        ("add_rmsnorm_mxfp4", dict(gemma=True)),
        ("add_rmsnorm_fp8_per_token", dict(fp8_dtype=torch.float8_e4m3fnuz)),  # not this GPU's FP8
    ]
    for variant, kw in calls:
        assert be.run(variant, bound(variant, x, r, w, 1e-6, group, **kw)) == "ref", (variant, kw)
    assert vendor_calls(rec) == [] and len(seen) == 5


def test_aiter_refuses_a_group_of_another_size(fake_pg):
    rec = Recorder(lambda name, a, k: types.SimpleNamespace(world_size=4))
    be = aiter_backend.AiterBackend(comm=rec)
    with pytest.raises(RuntimeError, match="world size 4"):
        be.run("add_rmsnorm", bound("add_rmsnorm", torch.randn(2, 8), None, None, 1e-6, "c10d:" + fake_pg.group_name))


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


@pytest.fixture
def fi_fake(fake_pg, monkeypatch):
    monkeypatch.setattr(fi_backend, "_sm", lambda: 90)
    pattern = types.SimpleNamespace(
        kARResidualRMSNorm=1, kARResidualRMSNormFP8Quant=2, kARResidualRMSNormFP4Quant=3,
        kARResidualRMSNormOutFP8Quant=4, kARResidualRMSNormOutFP4Quant=5,
        kARResidualRMSNormDynamicFP8Quant=10, kARResidualRMSNormOutDynamicFP8Quant=11,
    )
    rec = Recorder(lambda name, a, k: "workspace" if name.startswith("create") else None)
    comm = types.SimpleNamespace(
        AllReduceFusionPattern=pattern,
        QuantizationSFLayout=types.SimpleNamespace(SWIZZLED_128x4=0, SWIZZLED_8x4=1, LINEAR=2),
        create_allreduce_fusion_workspace=rec.create_allreduce_fusion_workspace,
        allreduce_fusion=rec.allreduce_fusion,
    )
    return fi_backend.FlashInferBackend(comm=comm), rec, "c10d:" + fake_pg.group_name


def test_flashinfer_add_rmsnorm_mapping(fi_fake):
    be, rec, group = fi_fake
    x, r, w = torch.randn(4, 64), torch.randn(4, 64), torch.randn(64)
    out = be.run("add_rmsnorm", bound("add_rmsnorm", x, r, w, 1e-5, group, gemma=True))
    norm, res_out = out.norm_out, out.residual_out
    (create, _, ckw), (name, _, kw) = rec.calls
    assert create == "create_allreduce_fusion_workspace" and name == "allreduce_fusion"
    assert ckw["backend"] == "trtllm" and ckw["world_size"] == 2 and ckw["hidden_dim"] == 64
    assert ckw["max_token_num"] == 64 * 1024 * 1024 // (64 * 4)  # vLLM's SM90 TP2 crossover, fp32 here
    assert kw["pattern"] == 1 and kw["rms_eps"] == 1e-5 and kw["weight_bias"] == 1.0 and kw["fp32_acc"]
    same = lambda a, b: a.data_ptr() == b.data_ptr() and a.shape == b.shape  # noqa: E731 - views of one buffer
    assert same(kw["input"], x) and same(kw["residual_in"], r)
    assert same(kw["norm_out"], norm) and same(kw["residual_out"], res_out)
    be.run("add_rmsnorm", bound("add_rmsnorm", x, r, w, 1e-5, group))
    assert [c[0] for c in rec.calls].count("create_allreduce_fusion_workspace") == 1  # created once


def test_flashinfer_quant_mappings(fi_fake):
    be, rec, group = fi_fake
    x, r, w = torch.randn(4, 64), torch.randn(4, 64), torch.randn(64)
    scale = torch.tensor([0.5])
    out = be.run("add_rmsnorm_fp8_static", bound("add_rmsnorm_fp8_static", x, r, w, 1e-6, group, scale=scale,
                                                 return_norm=True))
    assert out.scales is None and out.norm_out is not None and out.q.dtype == torch.float8_e4m3fn
    out = be.run("add_rmsnorm_fp8_per_token", bound("add_rmsnorm_fp8_per_token", x, r, w, 1e-6, group))
    s = out.scales
    assert s.shape == (4, 1) and out.norm_out is None
    out = be.run("add_rmsnorm_nvfp4", bound("add_rmsnorm_nvfp4", x, r, w, 1e-6, group,
                                            global_scale=torch.tensor([2.0])))
    assert out.q.shape == (4, 32) and out.scales.shape == (128, 4)
    kws = [kw for name, _, kw in rec.calls if name == "allreduce_fusion"]
    assert [k["pattern"] for k in kws] == [4, 10, 3]
    assert torch.equal(kws[0]["scale_factor"], scale)
    assert kws[1]["scale_out"] is s and kws[2]["layout_code"] == 0


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


def test_triton_legacy_positional_form_binds_like_the_op(fake_pg, monkeypatch):
    """tools/bench_kernels.py still calls ``TritonBackend.run`` positionally: it binds to the
    same FusedArgs as the op's keywords (here routed to the reference by the group size)."""
    from fusion_passes.backends import reference

    seen = []
    monkeypatch.setattr(reference.ReferenceBackend, "run", lambda self, variant, a: seen.append(a) or "ref")
    x, group = torch.randn(2, 96), "c10d:" + fake_pg.group_name
    triton_backend.TritonBackend().run("add_rmsnorm_fp8_per_group", x, None, None, 1e-6, group, False, True,
                                       32, True, False, True)
    want = bound("add_rmsnorm_fp8_per_group", x, None, None, 1e-6, group, group_size=32, ue8m0=True,
                 return_norm=True)
    assert seen[0].quant == want.quant and seen[0].return_norm and seen[0].flags == want.flags


def test_flashinfer_runs_unfused_what_it_would_compute_differently(fi_fake, monkeypatch):
    from fusion_passes.backends import reference

    be, rec, group = fi_fake
    monkeypatch.setattr(reference.ReferenceBackend, "run", lambda self, variant, a: "ref")
    x, r, w = torch.randn(4, 64), torch.randn(4, 64), torch.randn(64)
    assert be.run("add_rmsnorm", bound("add_rmsnorm", x, r, w, 1e-6, group, weight_in_fp32=False)) == "ref"
    assert be.run("add_rmsnorm_fp8_per_token", bound("add_rmsnorm_fp8_per_token", x, r, w, 1e-6, group,
                                                     scale_ub=torch.tensor([1.0]))) == "ref"
    assert rec.calls == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed without a CUDA GPU")
def test_bench_kernels_says_it_needs_a_gpu(capsys):
    from fusion_passes.tools import cli

    assert cli.main(["bench", "kernels", "--tokens", "1"]) == 2
    assert "needs an NVIDIA CUDA GPU" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a CUDA call gated on a machine without a CUDA GPU")
def test_why_not_never_raises_when_a_gate_cannot_query_the_device():
    """FlashInfer's gate reads the GPU's SM version; with no GPU that query raises. The
    selector must answer with a reason (and move on), not fail the compile."""
    why = backends.why_not("flashinfer", call(variant="add_rmsnorm_nvfp4"))
    assert why is not None and why.startswith("flashinfer")
    assert backends.select(call(variant="add_rmsnorm_nvfp4")) in ("triton", "reference")
