"""Two gloo processes: a real HF Llama with tp_plan="auto", Inductor-compiled with and
without the pass. The README's demo, asserted: every all-reduce that feeds a norm fuses
(2 per decoder layer), the fused op is in Inductor's generated code, logits match."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", reason="needs transformers (the dev extra)")
pytest.importorskip("accelerate", reason="needs accelerate (HF tp_plan loading)")

from fusion_passes.tools import demo as demo_cmd, hf_tp  # noqa: E402

pytestmark = pytest.mark.gloo


@pytest.fixture(scope="module")
def result():
    return demo_cmd.demo("llama", tp=2, dtype="bfloat16", tokens=13)


def test_every_norm_all_reduce_fuses(result):
    layers = hf_tp.MODELS["llama"]().num_hidden_layers
    assert result["sites_total"] == 2 * layers, result["sites"]
    assert result["sites_fused"] == 2 * layers, result["sites"]
    variants = [s["variant"] for s in result["sites"]]
    # each layer: attention -> post-attention norm, MLP -> next layer's input norm;
    # the last MLP feeds the final norm, whose sum nobody reads afterwards
    assert variants == ["allreduce_add_rmsnorm"] * (2 * layers - 1) + ["allreduce_add_rmsnorm_final"]
    assert all(s["backend"] == "reference" for s in result["sites"])
    assert result["ranks_agree"] and not result["errors"]


def test_fused_op_is_in_inductors_code(result):
    assert result["fused_op_in_code"]


def test_logits_match_unfused(result):
    # tolerance and its reason: fusion_passes/tools/demo.py TOLERANCE
    assert result["max_abs_diff"] <= demo_cmd.TOLERANCE[torch.bfloat16], result["max_abs_diff"]
    assert result["parity"]
