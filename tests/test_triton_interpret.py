"""The triton backend's world-size-1 kernel on CPU, in Triton's interpreter
(tests/triton_interpret_cases.py, one subprocess, about 20 s): the one-pass kernel, 2 rows
per program and the looped kernel (pieces of 1024) against the reference backend, and the
looped kernel's gating (a call it does not compute runs the one-pass kernel's bytes).

The interpreter sums through numpy, not as a GPU does: this checks what the kernel computes
in CI, where no GPU is; its bits on a GPU are tests/gpu/triton_check.py's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

LOOPED = ("add_rmsnorm", "sum_stored", "gemma", "weight_in_fp32", "no_residual", "fp8_static")
ONE_PASS_ONLY = ("fp8_per_token", "residual_in_fp32")  # looped_supported declines them
TILED = (*LOOPED, "residual_in_fp32")  # tile_supported takes every residual mode, no dynamic scale
CONFIGS = ("default", "rows2", "pieces1024", "tile4")


@pytest.fixture(scope="module")
def found(tmp_path_factory):
    pytest.importorskip("triton", reason="needs triton (a torch dependency): its interpreter runs the kernel")
    out = tmp_path_factory.mktemp("interpret") / "found.json"
    script = Path(__file__).with_name("triton_interpret_cases.py")
    run = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(out.read_text())


def test_every_case_and_config_ran(found):
    want = {f"{c} {k}" for c in LOOPED + ONE_PASS_ONLY for k in CONFIGS}
    assert set(found) == want | {"move floor"}


@pytest.mark.parametrize("config", CONFIGS)
def test_the_kernel_computes_the_reference(found, config):
    """Against the reference backend, in steps of 2^-8 of the value (one bf16 step is 1-2):
    the residual within one bf16 step and the norm within four, because the interpreter
    truncates each conversion to bf16 where the reference rounds to nearest (the largest seen:
    2.0 and 5.8). A kernel that normalizes the wrong row, drops the weight or reads the wrong
    pass is thousands of steps off."""
    for case in LOOPED + ONE_PASS_ONLY:
        f = found[f"{case} {config}"]
        assert f["residual_steps"] <= 2.0, (case, config, f)
        assert f["norm_steps"] <= 8.0, (case, config, f)


def test_the_looped_kernel_is_within_two_steps_of_the_one_pass_kernel(found):
    """The same interpreter's arithmetic on both sides: the looped kernel's norm within two
    bf16 steps of the one-pass kernel's (its variance sums in another order; the Hugging Face
    form rounds twice), as tests/gpu/triton_check.py holds it on the GPU."""
    for case in LOOPED:
        assert found[f"{case} pieces1024"]["norm_steps_vs_default"] <= 4.0, case


def test_the_tile_kernel_is_within_two_steps_of_the_one_pass_kernel(found):
    """Several rows at once as one block: the variance may sum in another order (the block's
    layout is Triton's), so the same two bf16 steps; the residual is the add alone: equal."""
    for case in TILED:
        assert found[f"{case} tile4"]["norm_steps_vs_default"] <= 4.0, case
        assert found[f"{case} tile4"]["residual_steps"] <= 2.0, case


def test_rows_never_change_bytes_and_the_looped_kernel_only_runs_where_it_computes_the_call(found):
    for case in LOOPED + ONE_PASS_ONLY:
        assert found[f"{case} rows2"]["same_as_default"], case
    for case in ONE_PASS_ONLY:
        assert found[f"{case} pieces1024"]["same_as_default"], case
    assert found["fp8_per_token tile4"]["same_as_default"]  # tile_supported declines a dynamic scale


def test_the_move_floor_kernel_moves_the_rows(found):
    """``fusion-passes tune``'s move floor (bench_cuda.move_rows) times a kernel that must move
    the bucket's bytes: both rows copied, or the second written as FP8 of the same shape."""
    f = found["move floor"]
    assert f["copies"] and f["fp8"] == "torch.float8_e4m3fn (6, 3072)", f
