"""The vLLM dialect: ``vllm.all_reduce`` + ``vllm_ir`` norms, recognized and fused.

Small graphs built from vLLM's REAL ops (``torch.ops.vllm.all_reduce``,
``torch.ops.vllm_ir.rms_norm`` / ``fused_add_rms_norm``, whose CPU implementation is
vLLM's ``native`` one), traced with make_fx under the fake process group, in the exact
call shapes vLLM 0.33 traces (see tests/test_vllm_corpus.py for the real models).
Numerics run the unfused and the fused graph across simulated ranks (tests/ranks.py).
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

pytest.importorskip("vllm", reason="needs vLLM 0.33 installed (pip install -e .[vllm])")
pytestmark = pytest.mark.vllm

from fusion_passes.cli.vllm_cpu import prepare_process as _prepare_process  # noqa: E402

_prepare_process()  # VLLM_TARGET_DEVICE=cpu before vLLM resolves its platform (see capture.py)

import vllm.distributed.parallel_state  # noqa: E402,F401  (registers torch.ops.vllm.all_reduce)
import vllm.ir  # noqa: E402,F401  (registers torch.ops.vllm_ir.*)

from fusion_passes import FusionPass  # noqa: E402
from graphs import count, trace  # noqa: E402
from ranks import run_ranks  # noqa: E402

AR = torch.ops.vllm.all_reduce.default
RMS = torch.ops.vllm_ir.rms_norm.default
ADD_RMS = torch.ops.vllm_ir.fused_add_rms_norm.default
GROUP = "tp:0"  # a vLLM group name; tracing never resolves it
EPS = 1e-6
H = 64


def decoder(emb, attn, mlp, w0, w1, w2):
    """vLLM's decoder structure: embedding all-reduce -> rms_norm; then per block
    all_reduce -> fused_add_rms_norm (getitem 0 = normed, 1 = new residual); the final
    norm drops the residual (no getitem 1), as in the traced Llama graph."""
    res = AR(emb, GROUP)
    h = RMS(res, w0, EPS)
    out, res = ADD_RMS(AR(attn * h, GROUP), res, w1, EPS)
    final, _ = ADD_RMS(AR(mlp * out, GROUP), res, w2, EPS)
    return (final,)


def _inputs(dtype, wdtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    acts = [torch.randn(5, H, generator=g).to(dtype) for _ in range(3)]
    ws = [(1 + 0.1 * torch.randn(H, generator=g)).to(wdtype) for _ in range(3)]
    return acts + ws


def _ranks(args, world=2):
    # different partial sums per rank, replicated weights
    return [[a + 0.25 * r if i < 3 else a for i, a in enumerate(args)] for r in range(world)]


def _fuse(gm, **options):
    p = FusionPass(**options)
    p(gm.graph)
    gm.recompile()
    return p.report


@pytest.mark.parametrize("dtype,wdtype", [
    (torch.bfloat16, torch.bfloat16),  # vLLM's default: weight in the activation dtype
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32),  # fp32 weight: vLLM multiplies in fp32
])
def test_vllm_decoder_fuses_every_all_reduce(fake_pg, dtype, wdtype):
    args = _inputs(dtype, wdtype)
    gm = trace(decoder, *args)
    assert count(gm, "vllm.all_reduce") == 3
    report = _fuse(gm)
    assert not report.errors
    assert [s.fused for s in report.sites] == [True, True, True], report.table()
    assert [s.variant for s in report.sites] == [
        "allreduce_rmsnorm", "allreduce_add_rmsnorm", "allreduce_add_rmsnorm_final"]
    assert count(gm, "vllm.all_reduce") == 0
    assert count(gm, "vllm_ir.rms_norm") == 0 and count(gm, "vllm_ir.fused_add_rms_norm") == 0
    assert count(gm, "fusion_passes.allreduce_add_rmsnorm") == 3
    gm.graph.lint()


def _fused_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and "fusion_passes" in str(n.target)]


@pytest.mark.parametrize("wdtype,expect", [(torch.bfloat16, False), (torch.float32, True)])
def test_weight_order_follows_vllm_native(fake_pg, wdtype, expect):
    """vllm/ir/ops/layernorm.py: ``x.to(weight.dtype) * weight``: the multiply runs in the
    weight's dtype, so a bf16 weight means weight_in_fp32=False (arg 6 of the fused op)."""
    gm = trace(decoder, *_inputs(torch.bfloat16, wdtype))
    _fuse(gm)
    flags = {n.args[6] for n in _fused_nodes(gm)}
    assert flags == {expect}


def test_fused_numerics_equal_unfused_vllm_chain(fake_pg):
    """vLLM's fused_add_rms_norm normalizes the UNROUNDED fp32 sum (vllm/ir/ops/layernorm.py):
    the fused op carries residual_in_fp32=True and reproduces it bit for bit."""
    args = _inputs(torch.bfloat16, torch.bfloat16, seed=3)
    gm = trace(decoder, *args)
    ref = copy.deepcopy(gm)
    _fuse(gm)
    ranks = _ranks(args)
    want, got = run_ranks(ref, ranks), run_ranks(gm, ranks)
    for w, g in zip(want, got):
        # same ops in the same order: bit-identical, no tolerance
        torch.testing.assert_close(g[0], w[0], rtol=0, atol=0)


def test_fp32_numerics_close(fake_pg):
    """In fp32 the sum's rounding question vanishes: fused == unfused up to fp32 reassociation
    of the rank sum (same order here, so 1e-6 covers the mean's reduction order only)."""
    args = _inputs(torch.float32, torch.float32, seed=5)
    gm = trace(decoder, *args)
    ref = copy.deepcopy(gm)
    _fuse(gm)
    ranks = _ranks(args)
    for w, g in zip(run_ranks(ref, ranks), run_ranks(gm, ranks)):
        torch.testing.assert_close(g[0], w[0], rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ must not fire


def _unchanged(fn, *args):
    """Sites of a graph that must come out unchanged, with and without hoisting; the
    reasons returned are the recognizer's own (hoisting off: nothing to hoist over here,
    and the hoisting pass words its own stop reasons)."""
    for hoist in (True, False):
        gm = trace(fn, *args)
        before = gm.code
        report = _fuse(gm, hoist=hoist)
        assert gm.code == before, "graph must come out unchanged"
        assert report.sites and not any(s.fused for s in report.sites)
        assert all(s.reason and s.blocker for s in report.sites), report.table()
    return report.sites


def _recognized(fn, *args):
    """The vLLM recognizer's verdict on the first all-reduce of *fn*'s graph. (The report
    words a single-user non-match itself: match.py's ``_why_no_norm``.)"""
    from fusion_passes.recognize.roles import Miss
    from fusion_passes.recognize.vllm_ir import vllm_rms_norm

    gm = trace(fn, *args)
    (ar,) = [n for n in gm.graph.nodes if n.target is AR]
    found = vllm_rms_norm(ar)
    assert isinstance(found, Miss)
    return found


def test_variance_size_blocks(fake_pg):
    x, r, w = torch.randn(4, H, dtype=torch.bfloat16), torch.randn(4, H, dtype=torch.bfloat16), torch.ones(H, dtype=torch.bfloat16)

    def f(x, r, w):
        return ADD_RMS(AR(x, GROUP), r, w, EPS, 32)

    (site,) = _unchanged(f, x, r, w)
    assert "fused_add_rms_norm" in site.reason and site.blocker == "fused_add_rms_norm"
    miss = _recognized(f, x, r, w)
    assert "variance_size" in miss.reason and miss.node.name == "fused_add_rms_norm"


def test_foreign_weight_dtype_blocks(fake_pg):
    x, r = torch.randn(4, H, dtype=torch.bfloat16), torch.randn(4, H, dtype=torch.bfloat16)
    w = torch.ones(H, dtype=torch.float16)

    def f(x, r, w):
        return ADD_RMS(AR(x, GROUP), r, w, EPS)

    (site,) = _unchanged(f, x, r, w)
    assert "fused_add_rms_norm" in site.reason and site.blocker == "fused_add_rms_norm"
    miss = _recognized(f, x, r, w)
    assert "weight dtype torch.float16" in miss.reason and miss.node.name == "fused_add_rms_norm"


def test_second_user_of_reduced_value_blocks(fake_pg):
    x, r, w = torch.randn(4, H, dtype=torch.bfloat16), torch.randn(4, H, dtype=torch.bfloat16), torch.ones(H, dtype=torch.bfloat16)

    def f(x, r, w):
        y = AR(x, GROUP)
        out, res = ADD_RMS(y, r, w, EPS)
        return out, res, y * 2  # e.g. an EAGLE hidden-state tap

    (site,) = _unchanged(f, x, r, w)
    assert "second user" in site.reason and site.blocker is not None


def test_all_reduce_into_non_norm_is_left_alone(fake_pg):
    x = torch.randn(4, H, dtype=torch.bfloat16)
    (site,) = _unchanged(lambda x: (torch.relu(AR(x, GROUP)),), x)
    assert "relu" in site.reason


def test_residual_in_either_position(fake_pg):
    """fused_add_rms_norm sums in fp32, symmetric in its first two operands."""
    x, r, w = torch.randn(4, H, dtype=torch.bfloat16), torch.randn(4, H, dtype=torch.bfloat16), torch.ones(H, dtype=torch.bfloat16)

    def f(x, r, w):
        out, res = ADD_RMS(r, AR(x, GROUP), w, EPS)
        return out, res

    gm = trace(f, x, r, w)
    report = _fuse(gm)
    assert [s.fused for s in report.sites] == [True], report.table()


# ------------------------------------------------------------- the vLLM pass object


def test_vllm_fusion_pass_is_picklable_and_keyed():
    from fusion_passes.vllm import VllmFusionPass

    p = VllmFusionPass(backend="reference", max_tokens=256)
    q = pickle.loads(pickle.dumps(p))
    assert q.uuid() == p.uuid() and q.options == {"backend": "reference"} and q.max_tokens == 256
    assert VllmFusionPass().uuid() != p.uuid()
    assert VllmFusionPass(backend="reference").uuid() != p.uuid()  # max_tokens is in the key
    with pytest.raises(ValueError):
        VllmFusionPass(backend="")
    with pytest.raises(ValueError):
        VllmFusionPass(max_tokens=0)


def test_is_applicable_for_range():
    from vllm.config.utils import Range

    from fusion_passes.vllm import VllmFusionPass

    assert VllmFusionPass().is_applicable_for_range(Range(start=1, end=8192))
    p = VllmFusionPass(max_tokens=512)
    assert p.is_applicable_for_range(Range(start=1, end=512))
    assert p.is_applicable_for_range(Range(start=512, end=8192))
    assert not p.is_applicable_for_range(Range(start=513, end=8192))


def test_vllm_fusion_pass_runs_fusion_pass(fake_pg):
    from fusion_passes.vllm import VllmFusionPass

    gm = trace(decoder, *_inputs(torch.bfloat16, torch.bfloat16))
    p = VllmFusionPass()
    p(gm.graph)
    assert len(p.report.fused) == 3 and len(p.reports) == 1


def test_env_switch():
    from fusion_passes.vllm import enabled_by_env

    assert enabled_by_env({"FUSION_PASSES_VLLM": "1"}) and enabled_by_env({"FUSION_PASSES_VLLM": "True"})
    assert not enabled_by_env({}) and not enabled_by_env({"FUSION_PASSES_VLLM": "0"})


def test_env_switch_warns_once_on_a_value_it_does_not_know(caplog):
    from fusion_passes.vllm import enabled_by_env

    with caplog.at_level("WARNING", logger="fusion_passes"):
        assert not enabled_by_env({"FUSION_PASSES_VLLM": "enable"})
        assert not enabled_by_env({"FUSION_PASSES_VLLM": "enable"})  # vLLM asks again: no second warning
        assert not enabled_by_env({"FUSION_PASSES_VLLM": "off"}) and not enabled_by_env({})
    (record,) = caplog.records
    assert record.getMessage() == ("fusion_passes: FUSION_PASSES_VLLM='enable' is not understood, so the plugin "
                                   "stays off; on: 1, true, yes, on; off: '', '0', 'false', 'no', 'off'")


def test_plugin_inserts_after_noop_elimination(monkeypatch):
    """The entry point, with the switch on, puts our pass right after vLLM's
    NoOpEliminationPass in a really configured PostGradPassManager; off, it does nothing."""
    from vllm.compilation.passes.pass_manager import PostGradPassManager
    from vllm.compilation.passes.utility.noop_elimination import NoOpEliminationPass
    from vllm.config import PassConfig, VllmConfig

    from fusion_passes import vllm as fp_vllm

    original = PostGradPassManager.configure
    monkeypatch.setattr(PostGradPassManager, "configure", original)  # undone after the test
    cfg = VllmConfig()
    cfg.compilation_config.pass_config = PassConfig(eliminate_noops=True)

    monkeypatch.delenv(fp_vllm.ENV, raising=False)
    fp_vllm.register()
    assert PostGradPassManager.configure is original

    monkeypatch.setenv(fp_vllm.ENV, "1")
    fp_vllm.register()
    fp_vllm.register()  # vLLM may load plugins more than once per process
    manager = PostGradPassManager()
    manager.configure(cfg)
    kinds = [type(p) for p in manager.passes]
    assert kinds[:2] == [NoOpEliminationPass, fp_vllm.VllmFusionPass], kinds
    assert kinds.count(fp_vllm.VllmFusionPass) == 1
    manager.configure(cfg)  # configuring again must not add a second copy
    assert [type(p) for p in manager.passes].count(fp_vllm.VllmFusionPass) == 1
    from vllm.compilation.passes.inductor_pass import pass_context
    from vllm.config.utils import Range

    with pass_context(Range(start=1, end=8192)):
        assert isinstance(manager.uuid(), str)  # our uuid joins the manager's cache key
