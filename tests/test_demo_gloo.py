"""Two gloo processes: a real HF Llama with tp_plan="auto", Inductor-compiled with and
without the pass. The README's demo, run as a user runs it (``fusion-passes demo --json``
in a process of its own) and asserted: every all-reduce that feeds a norm fuses (2 per
decoder layer), the fused op is in Inductor's generated code, logits match; the output
is one JSON object on one line and nothing else (other libraries' output hidden), and
the demo leaves no temporary folder behind."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers", reason="needs transformers (the dev extra)")
pytest.importorskip("accelerate", reason="needs accelerate (HF tp_plan loading)")

from cli_driver import run_commands  # noqa: E402
from fusion_passes.cli import demo as demo_cmd, hf_tp  # noqa: E402

pytestmark = pytest.mark.gloo


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """``fusion-passes demo --json`` with its temporary folders in a folder of our own."""
    tmp = tmp_path_factory.mktemp("demo")
    (tmp / "tmpdir").mkdir()
    (r,) = run_commands([["demo", "--json"]], tmp, env={"TMPDIR": str(tmp / "tmpdir")})
    return r, tmp


@pytest.fixture(scope="module")
def result(run):
    r, _ = run
    assert r["rc"] == 0, r
    return json.loads(r["stdout"])


def test_json_is_one_line_and_nothing_else_is_printed(run):
    r, _ = run
    assert r["stdout"].count("\n") == 1 and r["stdout"].startswith("{") and r["stdout"].endswith("}\n"), r["stdout"]
    assert r["stderr"] == "", r["stderr"]  # not a terminal: no progress; HF's progress bars hidden


def test_no_temporary_folder_is_left(run):
    """Nothing of this run is left. Two folders stay by their libraries' design, each at
    one fixed path that every later run reuses (never one per run): Inductor's
    precompiled-header cache, ``torchinductor_USER/precompiled_headers`` (global on
    purpose, torch/_inductor/codecache.py ``_HEADER_DIR``), and the CUTLASS DSL's
    ``USER/cutlass_python_cache`` (``get_reusable_temp_dir``), which a library of this
    environment creates while the ranks compile."""
    import getpass

    _, tmp = run
    user = getpass.getuser()
    left = {p.name: sorted(c.name for c in p.iterdir()) for p in (tmp / "tmpdir").iterdir()}
    assert set(left) <= {f"torchinductor_{user}", user}, left
    assert left.get(f"torchinductor_{user}", ["precompiled_headers"]) == ["precompiled_headers"], left
    assert left.get(user, ["cutlass_python_cache"]) == ["cutlass_python_cache"], left


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
    # tolerance and its reason: fusion_passes/cli/demo.py TOLERANCE
    assert result["max_abs_diff"] <= demo_cmd.TOLERANCE[torch.bfloat16], result["max_abs_diff"]
    assert result["parity"]
