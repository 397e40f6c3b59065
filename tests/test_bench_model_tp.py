"""``bench model --dry-run --world-size 2``: the torchrun form (HF's own ``tp_plan``) still traces
and fuses, FP8 linears included (they must take over the forward that HF's plan wrapped).

A separate file from tests/test_bench_model.py because it needs a fresh process (a fake
world of 2 ranks; that file's dry runs make a world of 1): one subprocess, about 45 s on
2 busy cores.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("transformers", reason="needs HF transformers (the dev extra)")
pytest.importorskip("accelerate", reason="HF tp_plan loading needs accelerate (the dev extra)")

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_tp_plan_dry_run_fuses_with_fp8_linears():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    proc = subprocess.run(
        [sys.executable, "-m", "fusion_passes.cli", "bench", "model", "--dry-run", "--tiny", "--layers", "1",
         "--world-size", "2", "--model", "llama", "--precision", "fp8", "--decode", "2", "--prefill", "--json"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(proc.stdout)["rows"]
    assert row["world_size"] == 2
    assert (row["sites"]["total"], row["sites"]["fused"]) == (2, 2)
    # the post-attention norm feeds the FP8 gate/up linears: their two identical per-token
    # quants are merged (fusion_passes/dedup.py) and fused, so no bf16 norm output is left
    # for a second quant (the ``_out`` family)
    assert row["sites"]["variants"] == {"allreduce_add_rmsnorm_fp8_per_token": 1,
                                        "allreduce_add_rmsnorm_final": 1}
