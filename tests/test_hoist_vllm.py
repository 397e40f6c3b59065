"""Real vLLM 0.33 DeepSeek-V3 in fp16, traced at TP=2 on CPU (fusion_passes.cli.capture):
the attention and dense-MLP all-reduces feed ``mul(1/routed_scaling_factor)`` before
``fused_add_rms_norm``. Without hoisting that mul blocks each of them (and is named);
with hoisting every all-reduce fuses across it."""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("vllm", reason="needs vLLM (the vllm extra)")

from fusion_passes import FusionPass  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.usefixtures("fake_pg")]

LAYERS = 2  # layer 0 dense, layer 1 MoE (fusion_passes/cli/capture.py's tiny DeepSeek-V3)


@pytest.fixture(scope="module")
def graph():
    from fusion_passes.cli.capture import trace_vllm

    return trace_vllm("deepseek_v3", tp=2, dtype="float16", layers=LAYERS)[0]


def run(gm, **options):
    gm = copy.deepcopy(gm)
    p = FusionPass(**options)
    p(gm.graph)
    gm.graph.lint()
    return p.report


def test_mul_blocks_without_hoisting(graph):
    report = run(graph, hoist=False)
    # embedding all-reduce -> layer 0's input norm, and the last MoE output -> final norm:
    # adjacent, they fuse; the 3 in between each feed mul(1/routed_scaling_factor)
    assert [s.fused for s in report.sites] == [True, False, False, False, True]
    for s in report.sites[1:4]:
        assert s.blocker.startswith("mul") and "aten.mul.Tensor" in s.reason, s.reason


def test_every_all_reduce_fuses_across_the_mul_with_hoisting(graph):
    report = run(graph)
    assert len(report.sites) == 2 * LAYERS + 1 and all(s.fused for s in report.sites), report.table()
    assert [s.hoisted_over for s in report.sites[1:4]] == [["aten.mul.Tensor"]] * 3
    assert [s.variant for s in report.sites] == (
        ["allreduce_rmsnorm"] + ["allreduce_add_rmsnorm"] * 3 + ["allreduce_add_rmsnorm_final"])
