"""``bench model --token-dynamic`` on CPU, end to end: each form is compiled ONCE per step
kind with the token dimension dynamic (as vLLM compiles) and serves every point of that kind,
the pass fuses every site of that one graph, and the fused model is no further from the fp32
reference than the unfused compile (``ratio`` at most 1.02), compared on the unfused and
fused compiles made again under Inductor's deterministic mode (``--numerics deterministic``,
the GPU default).

A subprocess (``--device cpu`` starts its own one-rank gloo group, which the fake process
group of this session's other tests would collide with): 10 compiles of a 2-layer toy Llama,
about 90 s on 2 busy cores. The times on CPU say nothing about GPUs and are not checked.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("transformers", reason="needs HF transformers (the dev extra)")

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_token_dynamic_forms_compile_once_per_kind_and_keep_parity(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "MASTER_PORT": "29617"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    out = tmp_path / "dyn.json"
    proc = subprocess.run(
        [sys.executable, "-m", "fusion_passes.cli", "bench", "model", "--device", "cpu", "--tiny", "--layers", "2",
         "--token-dynamic", "--model", "llama", "--precision", "bf16", "--decode", "1", "4", "--prefill", "8", "16",
         "--context", "8", "--replays", "1", "--rounds", "2", "--numerics", "deterministic", "--out", str(out)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    # 3 timed forms and 2 untimed deterministic ones, per step kind
    assert result["token_dynamic"] is True and result["plan"]["compiles"] == 10
    assert result["numerics"] == "deterministic"
    rows = result["rows"]
    assert [(r["kind"], r["tokens"], r["compiled_at"]) for r in rows] == [
        ("decode", 1, 4), ("decode", 4, 4), ("prefill", 8, 16), ("prefill", 16, 16)]
    # prefill points share the largest prefill's cache (one graph needs one cache shape)
    assert [r["cache_slots"] for r in rows] == [9, 9, 16, 16]
    for r in rows:
        assert r["graphs"] == {"nocoll": 1, "unfused": 1, "fused": 1}, r["graphs"]
        assert (r["sites"]["total"], r["sites"]["fused"]) == (4, 4)
        n = r["numerics"]
        assert n["ratio_ok"] and n["fused_no_further"], n
        # the deterministic compiles decide; on CPU Inductor's C++ kernels time nothing, so
        # they compute what the timed compiles compute, and the pass fuses the same sites
        assert n["decided_by"] == "deterministic compiles" and n["sites_fused_deterministic"] == 4
        assert n["deterministic_mode_on"] is True
        assert set(r["compile_s"]) == {"nocoll", "unfused", "fused", "unfused_deterministic", "fused_deterministic"}
        for form in ("unfused", "fused"):
            assert n[f"{form}_deterministic"] == n[form], (form, n)
        assert n["ratio_timed"] == n["ratio"] and n["unfused_spread"] == 1.0
        # two rounds per form; the step time is their median, the speedup's range theirs
        assert {f: len(ts) for f, ts in r["rounds_us"].items()} == {"nocoll": 2, "unfused": 2, "fused": 2}
        lo, hi = r["speedup_range"]
        assert lo <= r["speedup"] <= hi
        assert r["speed"] in ("faster", "within noise", "slower") and r["p_noise"] == 0.25
    assert sum(result["speed"].values()) == len(rows)
    assert result["numerics_failed"] == 0
