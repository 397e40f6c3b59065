"""The vendor adapters against the vendors' own signatures, with N-D inputs (no GPU).

FlashInfer 0.7.2.post1 is installed (a vLLM dependency) and imports on CPU: the adapter
calls the REAL ``flashinfer.comm.allreduce_fusion`` (its argument checks, the flattening,
``trtllm_ar.trtllm_allreduce_fusion`` with its workspace-metadata checks), with a real
``TRTLLMAllReduceFusionWorkspace`` object; only the JIT-compiled module at the bottom
(``get_trtllm_comm_module()``) is replaced by one that records what the kernel would get.
``create_allreduce_fusion_workspace`` is bound against its installed signature.

AITER does not install here: tests/data/aiter_signatures.json holds the parameters of every
function the adapter calls at the commit the adapter names, read from AITER's source by
tests/data/extract_aiter_signatures.py. A stand-in module built from that table binds each
call exactly (a wrong keyword or arity raises) and returns what AITER's own fakes return.

Both: every variant's outputs, packed by the op, have the shapes and dtypes of the op's fake.
"""

from __future__ import annotations

import ast
import inspect
import json
import types
from pathlib import Path

import pytest
import torch

from fusion_passes import arguments, ops, variants
from fusion_passes.backends import aiter as aiter_backend, flashinfer as fi_backend, reference
from fusion_passes._compat import FakeTensorMode

SHAPES = [(5, 256), (2, 3, 256)]  # 2-D and N-D activations [..., hidden]


def bound(variant, x, residual, weight, group, **kw):
    """One call's FusedArgs, bound and resolved as the fused op binds them."""
    spec = variants.get(variant)
    a = arguments.bind(spec, (x, residual, weight, 1e-6, group), kw)
    return arguments.fused_args(spec, a, arguments.resolve(spec, a))


def quant_kw(variant: str) -> dict:
    return {"add_rmsnorm_fp8_static": {"scale": torch.tensor([0.5])},
            "add_rmsnorm_fp8_per_group": {"group_size": 128},
            "add_rmsnorm_nvfp4": {"global_scale": torch.tensor([64.0])}}.get(variant, {})


def assert_like_fake(variant: str, args, outs, kw) -> None:
    """The op's packing of *outs* has the shapes, dtypes (and column-major layout) of its fake."""
    spec = variants.get(variant)
    got = ops._pack(spec, outs, args)
    with FakeTensorMode():
        x = torch.empty(args.input.shape, dtype=args.input.dtype)
        fake_kw = {k: (torch.empty(v.shape, dtype=v.dtype) if torch.is_tensor(v) else v) for k, v in kw.items()}
        res = None if args.residual is None else torch.empty_like(x)
        w = None if args.weight is None else torch.empty(args.weight.shape, dtype=args.weight.dtype)
        want = ops.fake(spec, x, res, w, args.eps, args.group, **fake_kw)
    assert len(got) == len(want)
    for name, g, w in zip(spec.output_names, got, want):
        assert (tuple(g.shape), g.dtype) == (tuple(w.shape), w.dtype), (variant, name, g.shape, w.shape)


# ------------------------------------------------------------------------------ FlashInfer
fi_comm = pytest.importorskip("flashinfer.comm", reason="needs flashinfer-python (a vLLM dependency) for its API")


class KernelModule:
    """Stands in for FlashInfer's JIT-compiled comm module: records the kernel's arguments."""

    def __init__(self):
        self.calls = []

    def trtllm_allreduce_fusion(self, **kw):
        self.calls.append(kw)


@pytest.fixture
def fi(fake_pg, monkeypatch):
    """(backend, kernel recorder, group, workspaces created) on the real FlashInfer Python layer."""
    from flashinfer.comm import allreduce as fi_allreduce, trtllm_ar

    kernel = KernelModule()
    monkeypatch.setattr(trtllm_ar, "get_trtllm_comm_module", lambda: kernel)
    monkeypatch.setattr(fi_backend, "_sm", lambda: 100)
    real_create = inspect.signature(fi_comm.create_allreduce_fusion_workspace)
    created = []

    def create(*args, **kwargs):
        b = real_create.bind(*args, **kwargs)  # a wrong keyword raises TypeError here
        ws = object.__new__(fi_allreduce.TRTLLMAllReduceFusionWorkspace)
        fi_allreduce.AllReduceFusionWorkspace.__init__(ws, b.arguments["world_size"], b.arguments["rank"])
        ws.ipc_handles, ws.workspace_tensor, ws.mem_handles = [], torch.empty(0), []
        ws.metadata = {"max_token_num": b.arguments["max_token_num"], "tp_size": b.arguments["world_size"],
                       "hidden_dim": b.arguments["hidden_dim"], "use_fp32_lamport": b.arguments["dtype"] == torch.float32}
        created.append((b.arguments, ws))
        return ws

    comm = types.SimpleNamespace(
        allreduce_fusion=fi_comm.allreduce_fusion, create_allreduce_fusion_workspace=create,
        AllReduceFusionPattern=fi_comm.AllReduceFusionPattern, QuantizationSFLayout=fi_comm.QuantizationSFLayout)
    yield fi_backend.FlashInferBackend(comm=comm), kernel, "c10d:" + fake_pg.group_name, created
    for _, ws in created:
        ws.destroy()


def _inputs(shape, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype),
            torch.randn(shape[-1:], generator=g).to(dtype))


def cases(names):
    """(variant, return_norm): add_rmsnorm always returns its norm output (no return_norm)."""
    return [(v, rn) for v in sorted(names) for rn in (False, True) if not (v == "add_rmsnorm" and rn)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("variant, return_norm", cases(fi_backend.VARIANTS))
def test_flashinfer_calls_bind_and_outputs_match_the_fakes(fi, variant, return_norm, shape):
    be, kernel, group, created = fi
    x, r, w = _inputs(shape)
    kw = {**quant_kw(variant), **({"return_norm": True} if return_norm else {})}
    args = bound(variant, x, r, w, group, **kw)
    outs = be.run(variant, args)
    assert_like_fake(variant, args, outs, kw)
    (k,) = kernel.calls
    tokens = x.numel() // x.shape[-1]
    assert (k["token_num"], k["hidden_dim"], k["world_size"]) == (tokens, x.shape[-1], 2)
    assert torch.equal(k["allreduce_in"], x.reshape(-1)) and torch.equal(k["residual_in"], r.reshape(-1))
    assert k["rms_gamma"] is w and k["rms_eps"] == 1e-6 and k["fp32_acc"] and k["weight_bias"] == 0.0
    assert k["residual_out"].data_ptr() == outs.residual_out.data_ptr()
    P = fi_comm.AllReduceFusionPattern
    want = {"add_rmsnorm": P.kARResidualRMSNorm,
            "add_rmsnorm_fp8_static": (P.kARResidualRMSNormFP8Quant, P.kARResidualRMSNormOutFP8Quant),
            "add_rmsnorm_fp8_per_token": (P.kARResidualRMSNormDynamicFP8Quant, P.kARResidualRMSNormOutDynamicFP8Quant),
            "add_rmsnorm_nvfp4": (P.kARResidualRMSNormFP4Quant, P.kARResidualRMSNormOutFP4Quant)}[variant]
    assert k["pattern_code"] == (want if variant == "add_rmsnorm" else want[return_norm])
    if variant == "add_rmsnorm_fp8_static":  # the scale itself: the kernel takes 1 / scale_factor
        assert torch.equal(k["scale_factor"], kw["scale"])
    if variant == "add_rmsnorm_nvfp4":
        assert torch.equal(k["scale_factor"], kw["global_scale"])
        assert k["layout_code"] == fi_comm.QuantizationSFLayout.SWIZZLED_128x4
    ((ws_args, _),) = created
    assert ws_args["backend"] == "trtllm" and ws_args["hidden_dim"] == x.shape[-1]


def test_flashinfer_workspace_once_gemma_bias_and_missing_residual(fi):
    be, kernel, group, created = fi
    x, _, w = _inputs((4, 64))
    be.run("add_rmsnorm", bound("add_rmsnorm", x, None, w, group, gemma=True))
    be.run("add_rmsnorm", bound("add_rmsnorm", x, None, None, group))
    assert len(created) == 1  # one workspace per (group, hidden, dtype)
    assert created[0][0]["max_token_num"] == 64 * 1024 * 1024 // (64 * 2)  # vLLM's SM100 TP2 crossover, bf16
    first, second = kernel.calls
    assert first["weight_bias"] == 1.0 and torch.equal(first["residual_in"], torch.zeros(4 * 64, dtype=x.dtype))
    assert torch.equal(second["rms_gamma"], torch.ones(64, dtype=x.dtype))


def test_flashinfer_runs_unfused_what_it_computes_differently(fi, monkeypatch):
    """From its kernel source (see the adapter's docstring): the rounded residual sum, the
    weight read in the activation dtype, no scale upper bound, no Hugging Face weight order."""
    be, kernel, group, _ = fi
    seen = []
    monkeypatch.setattr(reference.ReferenceBackend, "run", lambda self, variant, a: seen.append(variant) or "ref")
    x, r, w = _inputs((4, 64))
    for variant, weight, kw in [
        ("add_rmsnorm", w, dict(weight_in_fp32=False)),
        ("add_rmsnorm", w, dict(residual_in_fp32=True)),
        ("add_rmsnorm", w.float(), {}),
        ("add_rmsnorm_fp8_per_token", w, dict(scale_ub=torch.tensor([1.0]))),
    ]:
        assert be.run(variant, bound(variant, x, r, weight, group, **kw)) == "ref", kw
    assert kernel.calls == [] and len(seen) == 4
    assert "rounded" in fi_backend.unsupported(
        fi_backend.Call("add_rmsnorm", "cuda", torch.bfloat16, 4096, 2, flags=variants.Flags(residual_in_fp32=True)),
        sm=90, installed=True)


# ---------------------------------------------------------------------------------- AITER
TABLE = json.loads(Path(__file__).with_name("data").joinpath("aiter_signatures.json").read_text())


def _signature(name: str) -> inspect.Signature:
    kinds = {"POSITIONAL_OR_KEYWORD": inspect.Parameter.POSITIONAL_OR_KEYWORD,
             "KEYWORD_ONLY": inspect.Parameter.KEYWORD_ONLY}
    return inspect.Signature([
        inspect.Parameter(p, kinds[kind], default=inspect.Parameter.empty if d is None else ast.literal_eval(d))
        for p, kind, d in TABLE["functions"][name]["params"]])


class AiterFromTable:
    """``aiter.dist.communication_op`` as the table records it: exact signatures, AITER's
    quant_type strings, and outputs shaped as AITER's fakes (parallel_state.py)."""

    def __init__(self, world_size=2, fp8=torch.float8_e4m3fn):
        self.calls, self.world_size, self.fp8 = [], world_size, fp8
        assert "world_size" in TABLE["attributes"]["aiter/dist/parallel_state.py:GroupCoordinator"]
        assert "get_tp_group" in TABLE["module_names"]["aiter/dist/communication_op.py"]

    def get_tp_group(self, *args, **kwargs):
        _signature("get_tp_group").bind(*args, **kwargs)
        return types.SimpleNamespace(world_size=self.world_size)

    def _bind(self, name, args, kwargs):
        b = _signature(name).bind(*args, **kwargs)
        b.apply_defaults()
        self.calls.append((name, dict(b.arguments)))
        return b.arguments

    def tensor_model_parallel_fused_allreduce_rmsnorm(self, *args, **kwargs):
        a = self._bind("tensor_model_parallel_fused_allreduce_rmsnorm", args, kwargs)
        return torch.empty_like(a["input_"]), torch.empty_like(a["residual_inp_"])

    def tensor_model_parallel_fused_allreduce_rmsnorm_quant(self, *args, **kwargs):
        a = self._bind("tensor_model_parallel_fused_allreduce_rmsnorm_quant", args, kwargs)
        return self._quant(a, TABLE["quant_type_aliases"][a["quant_type"].lower()])

    def tensor_model_parallel_fused_allreduce_rmsnorm_mxfp4_quant(self, *args, **kwargs):
        a = self._bind("tensor_model_parallel_fused_allreduce_rmsnorm_mxfp4_quant", args, kwargs)
        return self._quant({**a, "gemma_norm": False}, "mxfp4")

    def _quant(self, a, kind):
        x, k = a["input_"], a["input_"].shape[-1]
        if a["gemma_norm"] and kind != "per_token":  # communicator_cuda.py fused_allreduce_rmsnorm_quant
            raise NotImplementedError("gemma_norm fused quant currently supports per-token FP8 only")
        if kind == "mxfp4":
            q = torch.empty((*x.shape[:-1], k // 2), dtype=torch.uint8)
            scale = torch.empty((*x.shape[:-1], k // 32), dtype=torch.uint8)
        elif kind == "per_token":
            q, scale = torch.empty_like(x, dtype=self.fp8), torch.empty((*x.shape[:-1], 1))
        else:  # per_group: M = input.shape[0], 2-D only
            q, m, g = torch.empty_like(x, dtype=self.fp8), x.shape[0], k // a["group_size"]
            scale = torch.empty((g, m)).transpose(0, 1) if a["transpose_scale"] else torch.empty((m, g))
        outs = (q, torch.empty_like(a["residual_inp_"]), scale)
        return outs + (torch.empty_like(x),) if a["emit_bf16"] else outs


@pytest.fixture
def aiter(fake_pg):
    comm = AiterFromTable()
    return aiter_backend.AiterBackend(comm=comm, fp8_dtype=torch.float8_e4m3fn), comm, "c10d:" + fake_pg.group_name


def test_aiter_table_is_the_adapters_commit():
    assert TABLE["commit"] in aiter_backend.__doc__
    assert TABLE["commit"][:12] in Path(fi_backend.__file__).with_name("thresholds.py").read_text()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("variant, return_norm", cases(aiter_backend.VARIANTS))
def test_aiter_calls_bind_and_outputs_match_the_fakes(aiter, variant, return_norm, shape):
    be, comm, group = aiter
    x, r, w = _inputs(shape)
    kw = {**quant_kw(variant), **({"return_norm": True} if return_norm else {}), "residual_in_fp32": True}
    if variant == "add_rmsnorm_fp8_per_group":
        kw["column_major"] = return_norm  # both layouts
    args = bound(variant, x, r, w, group, **kw)
    outs = be.run(variant, args)
    assert_like_fake(variant, args, outs, kw)
    ((name, a),) = comm.calls
    assert a["input_"].shape == (x.numel() // x.shape[-1], x.shape[-1]) and a["eps"] == 1e-6
    assert torch.equal(a["input_"], x.reshape(a["input_"].shape)) and a["weight_"] is w
    if variant != "add_rmsnorm" and variant != "add_rmsnorm_mxfp4":
        assert a["emit_bf16"] == return_norm


def test_aiter_runs_unfused_what_it_computes_differently(aiter, monkeypatch):
    """From its source (see the adapter's docstring): the unrounded fp32 residual sum, the
    weight in the activation dtype, its platform FP8, fp32 per-group scales, no gemma on the
    per-group / MXFP4 epilogues, no scale upper bound, no Hugging Face weight order."""
    be, comm, group = aiter
    seen = []
    monkeypatch.setattr(reference.ReferenceBackend, "run", lambda self, variant, a: seen.append(variant) or "ref")
    x, r, w = _inputs((4, 256))
    calls = [
        ("add_rmsnorm", w, dict(weight_in_fp32=False, residual_in_fp32=True)),
        ("add_rmsnorm", w, dict(residual_in_fp32=False)),  # the rounded sum
        ("add_rmsnorm", w.float(), dict(residual_in_fp32=True)),
        ("add_rmsnorm_fp8_per_group", w, dict(group_size=128, ue8m0=True, residual_in_fp32=True)),
        ("add_rmsnorm_fp8_per_token", w, dict(scale_ub=torch.tensor([1.0]), residual_in_fp32=True)),
        ("add_rmsnorm_mxfp4", w, dict(gemma=True, residual_in_fp32=True)),
        ("add_rmsnorm_fp8_per_token", w, dict(fp8_dtype=torch.float8_e4m3fnuz, residual_in_fp32=True)),
    ]
    for variant, weight, kw in calls:
        assert be.run(variant, bound(variant, x, r, weight, group, **kw)) == "ref", (variant, kw)
    assert comm.calls == [] and len(seen) == len(calls)
    be.run("add_rmsnorm", bound("add_rmsnorm", x, None, w, group))  # no residual: nothing to round
    assert [c[0] for c in comm.calls] == ["tensor_model_parallel_fused_allreduce_rmsnorm"]


def test_aiter_refuses_a_group_of_another_size(fake_pg):
    be = aiter_backend.AiterBackend(comm=AiterFromTable(world_size=4), fp8_dtype=torch.float8_e4m3fn)
    with pytest.raises(RuntimeError, match="world size 4"):
        be.run("add_rmsnorm", bound("add_rmsnorm", torch.randn(2, 8), None, None, "c10d:" + fake_pg.group_name))
