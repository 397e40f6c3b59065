"""Hoisting on real Hugging Face transformers models, tensor-parallel on 2 gloo processes.

Tiny random DeepSeek-V3 and Qwen3-MoE (fusion_passes/cli/hf_tp.py builds them from the transformers
config classes; nothing is downloaded) load with ``tp_plan="auto"``, compile with
``torch.compile(fullgraph=True)`` once without and once with the FusionPass, and must
give the same logits. The graphs hold exactly the chains the Hoisting issue names:
DeepSeek-V3 MoE reduces routed and shared experts with TWO all-reduces that meet in an
add before the residual add; Qwen3-MoE reshapes between ``wait_tensor`` and the add.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gloo

transformers = pytest.importorskip("transformers", reason="needs HF transformers (the dev extra)")
pytest.importorskip("accelerate", reason="HF tp_plan loading needs accelerate (the dev extra)")

TOKENS = 7  # odd on purpose: no divisibility the kernels could lean on


def _clear_grad_hooks(model: torch.nn.Module) -> None:
    """Qwen3-MoE's plan puts backward hooks on q_norm / k_norm ("replicated_with_grad_allreduce")
    that stop a full-graph compile; inference never runs them."""
    for m in model.modules():
        m._backward_hooks.clear()
        m._backward_pre_hooks.clear()
    for p in model.parameters():
        if getattr(p, "_backward_hooks", None):
            p._backward_hooks.clear()


def _worker(rank: int, directory: str, dtype: torch.dtype):
    """One rank: logits compiled without and with the pass, and the pass's report."""
    import os
    import tempfile

    # each rank its own Inductor cache: two ranks writing one kernel .so race ("file too short")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix=f"inductor-rank{rank}-")
    import torch._dynamo

    import fusion_passes
    from fusion_passes.cli import hf_tp

    model = hf_tp.load_tp(directory, dtype)
    _clear_grad_hooks(model)
    ids = (torch.arange(TOKENS) * 37 % model.config.vocab_size)[None]  # same on every rank
    with torch.no_grad():
        torch._dynamo.reset()
        plain = torch.compile(model, fullgraph=True)(ids).logits
        torch._dynamo.reset()
        with fusion_passes.enabled() as p:
            fused = torch.compile(model, fullgraph=True)(ids).logits
    torch._dynamo.reset()
    report = fusion_passes.FusionReport()
    for r in p.reports:
        report.merge(r)
    return {"plain": plain, "fused": fused, "report": report.to_dict(), "single_node": _single_node()}


def _single_node() -> tuple[bool, bool]:
    """groups.is_single_node over the real gloo world (both ranks on this host): decided by
    one collective, then read without one (a second collective would raise here)."""
    import torch.distributed as dist

    from fusion_passes import groups

    group = "c10d:" + dist.group.WORLD.group_name
    first = groups.is_single_node(group)
    real, dist.all_gather_object = dist.all_gather_object, None  # any further collective: TypeError
    try:
        return first, groups.is_single_node(group)
    finally:
        dist.all_gather_object = real


def run_model(name: str, dtype: torch.dtype):
    from fusion_passes.cli import hf_tp

    return hf_tp.spawn(_worker, 2, hf_tp.tiny_dir(name), dtype)


def collectives(report: dict) -> tuple[int, int]:
    """(all-reduces in the graph handed to the pass, collectives left after it): a merged
    all-reduce travels in its partner's collective."""
    sites = report["sites"]
    merged = [s for s in sites if (s["reason"] or "").startswith("merged into")]
    return len(sites), len(sites) - len(merged)


# Inductor compiles the same math with and without the pass; the fused op's reference
# backend runs the unfused chain's math in the unfused order, but Inductor fuses the
# unfused chain into its own kernels (fp32 accumulation of the norm in registers), so the
# two agree to a few fp32 ulps of the logits (|logits| < 10 here), not bit for bit.
FP32_TOL = {"atol": 1e-5, "rtol": 1e-5}


def test_deepseek_v3_moe_one_collective_per_layer():
    """Layer 0 (dense MLP): AR -> add -> norm. Layer 1 (MoE): AR(routed), AR(shared) ->
    add -> add(residual) -> final norm: merged into ONE all-reduce, then fused."""
    results = run_model("deepseek_v3", torch.float32)
    for r in results:
        report = r["report"]
        assert not report["errors"], report["errors"]
        sites = report["sites"]
        assert all(s["fused"] for s in sites), sites
        assert collectives(report) == (3, 2)  # dense 1 + MoE 2 -> dense 1 + MoE 1
        merged = [s for s in sites if (s["reason"] or "").startswith("merged into")]
        assert len(merged) == 1 and merged[0]["hoisted_over"] == ["aten.add.Tensor"]
        assert sites[1]["hoisted_over"] == ["aten.reshape.default", "aten.add.Tensor"]
        torch.testing.assert_close(r["fused"], r["plain"], **FP32_TOL)


def test_qwen3_moe_all_reduces_fuse_through_reshape():
    """Every layer: attention AR -> add -> norm; experts AR -> wait -> reshape -> add -> norm."""
    results = run_model("qwen3_moe", torch.float32)
    for r in results:
        report = r["report"]
        assert not report["errors"], report["errors"]
        sites = report["sites"]
        assert len(sites) == 4 and all(s["fused"] for s in sites), sites  # 2 layers x 2
        # per layer: attention AR adjacent; the experts' AR moved over its reshape
        assert [s["hoisted_over"] for s in sites] == [[], ["aten.reshape.default"]] * 2
        torch.testing.assert_close(r["fused"], r["plain"], **FP32_TOL)
        assert r["single_node"] == (True, True)  # both gloo ranks on this host; the second from the dict
