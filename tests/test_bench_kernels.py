"""``bench kernels`` on CPU: rows, best-of baselines, JSON, plan, argument checks, the derived
selector table, and the triton gate following that table at its edges.

The timing itself needs an NVIDIA GPU (the lead runs it); everything it is assembled from
runs here. The gate (``fusion_passes.backends.triton.unsupported``) is a pure function of
a :class:`~fusion_passes.backends.Call`, so a CUDA call is judged without a GPU.
"""

from __future__ import annotations

import ast
import json

import pytest
import torch

from fusion_passes import backends
from fusion_passes.backends import Call, thresholds
from fusion_passes.backends import triton as triton_backend
from fusion_passes.cli import bench_epilogue
from fusion_passes.cli import bench_kernels as bk
from fusion_passes.cli import bench_rows as br
from fusion_passes.cli import bench_table as bt
from fusion_passes.cli import main as cli_main


def call(tokens, hidden=7168, world_size=1, variant="add_rmsnorm"):
    return Call(variant=variant, device="cuda", dtype=torch.bfloat16, hidden=hidden, world_size=world_size,
                tokens=tokens)


# -- baselines and rows --------------------------------------------------------------------


def test_baseline_names_per_world_size():
    assert br.baseline_names(1) == (("none+static", "none+tokdyn"), ())
    counted, extra = br.baseline_names(2, with_dynamic_true=True)
    assert counted == ("nccl+static", "nccl+tokdyn", "symm_one_shot+static", "symm_one_shot+tokdyn",
                       "symm_two_shot+static", "symm_two_shot+tokdyn")
    assert extra == ("nccl+dynamic_true", "symm_one_shot+dynamic_true", "symm_two_shot+dynamic_true")


def test_best_unfused_takes_the_fastest_that_ran_and_never_an_extra_column():
    baselines = {"nccl+static": 9.0, "nccl+tokdyn": 8.5, "symm_two_shot+static": 7.25, "symm_one_shot+static": None,
                 "symm_two_shot+tokdyn": float("nan"), "nccl+dynamic_true": 1.0}
    assert br.best_unfused(baselines, extra=("nccl+dynamic_true",)) == ("symm_two_shot+static", 7.25)
    assert br.best_unfused(baselines) == ("nccl+dynamic_true", 1.0)  # counted when not declared extra
    with pytest.raises(ValueError, match="no unfused baseline ran"):
        br.best_unfused({"none+static": None, "none+tokdyn": float("inf")})


def test_make_row_derives_speedups_from_both_fused_timings():
    row = br.make_row(variant="add_rmsnorm", hidden=7168, tokens=32, calls=20, fused_us=2.5, fused_last_us=2.75,
                      baselines={"none+static": 2.6, "none+tokdyn": 3.0, "none+dynamic_true": 2.0},
                      extra=("none+dynamic_true",), errors={"x": "boom"}, floor_us=0.5,
                      selector="triton", declined=None)
    assert row["best_unfused"] == "none+static" and row["best_unfused_us"] == 2.6
    assert row["speedup"] == pytest.approx(2.6 / 2.5)
    assert row["speedup_worst"] == pytest.approx(2.6 / 2.75)
    assert row["wins"] is False  # faster in its first timing, slower in its last
    assert row["fused_spread"] == pytest.approx(0.1)
    assert row["of_floor"] == pytest.approx(0.2)
    assert row["baseline_errors"] == {"x": "boom"}
    line = br.format_row(row)
    assert "2.5/" in line and "2.8 us" in line and "SLOWER" in line and "best none+static" in line


def test_result_json_holds_machine_versions_and_rows():
    row = br.make_row(variant="add_rmsnorm", hidden=4096, tokens=1, calls=20, fused_us=2.0, fused_last_us=2.0,
                      baselines={"none+static": 3.0, "none+tokdyn": 3.5})
    res = br.result(command="fusion-passes bench kernels", world=1, machine={"gpu": "X"},
                    versions={"torch": "2.11"}, rows=[row], phases={"setup": 1.234}, plan_={"rows": 1},
                    bandwidths={"copy_bandwidth_GBps": 4000.0, "peer_read_bandwidth_GBps": None},
                    with_dynamic_true=False, selectors={"add_rmsnorm H=4096": "triton at every point"})
    back = json.loads(json.dumps(res))
    assert back["machine"] == {"gpu": "X"} and back["versions"] == {"torch": "2.11"}
    assert back["baselines"] == ["none+static", "none+tokdyn"] and back["extra_columns"] == []
    assert back["rows"][0]["speedup"] == 1.5 and back["phases_s"] == {"setup": 1.23}


def test_command_line_names_torchrun_at_world_size_n():
    argv = ["/x/cli.py", "bench", "kernels", "--tokens", "1", "2"]
    assert br.command_line("kernels", 1, argv) == "fusion-passes bench kernels --tokens 1 2"
    assert br.command_line("kernels", 2, argv).startswith("torchrun --standalone --nproc_per_node=2 -m ")


def test_max_autotune_is_a_counted_baseline_column():
    counted, extra = br.baseline_names(1, with_max_autotune=True)
    assert counted == ("none+static", "none+tokdyn", "none+max_autotune") and extra == ()
    assert br.best_unfused({"none+static": 3.0, "none+tokdyn": 3.5, "none+max_autotune": 2.5}) == ("none+max_autotune", 2.5)
    p = br.plan(["add_rmsnorm"], [7168], [], [1, 2], 1, with_max_autotune=True)
    assert p["compiles"] == {"static": 2, "tokdyn": 1, "max_autotune": 2} and p["graphs"] == 2 * 5


def test_the_sweep_times_the_max_autotune_form(fake_pg):
    import argparse

    from fusion_passes.cli.model_trace import fake_world

    parser = argparse.ArgumentParser()
    bk.add_arguments(parser)
    args = parser.parse_args(["--tokens", "2", "--with-max-autotune"])
    ctx = bk.sweep_context(args, 0, 1, fake_world(1).group_name, device="cpu", compile_backend="eager",
                           fused_backend="reference")
    torch._dynamo.reset()
    (row,) = bk._variant_hidden(ctx, "add_rmsnorm", 64, {})
    torch._dynamo.reset()
    assert set(row["baselines"]) == {"none+static", "none+tokdyn", "none+max_autotune"} and row["extra_columns"] == []
    assert ctx.phases["compile_max_autotune"] > 0


def test_default_sweep_plan_fits_one_gpu_call():
    p = br.plan(br.DEFAULT_VARIANTS, br.DEFAULT_HIDDEN, br.DEFAULT_QUANT_HIDDEN, br.DEFAULT_TOKENS, 1)
    assert p["rows"] == (3 + 5) * 15
    assert p["compiles"] == {"static": 120, "tokdyn": 8}
    assert p["graphs"] == 120 * 4  # fused twice + two baselines per row
    assert p["estimate_s"] < 5 * 60  # "well under 8 minutes" at the measured compile cost


# -- the command line ------------------------------------------------------------------------


def test_plan_flag_needs_no_gpu(capsys):
    assert cli_main(["bench", "kernels", "--plan", "--variants", "add_rmsnorm", "--hidden", "4096",
                     "--tokens", "1", "2", "4"]) == 0
    out = capsys.readouterr().out
    assert "plan: 3 rows; Inductor compiles: 3 static, 1 tokdyn" in out


@pytest.mark.parametrize("argv, message", [
    (["--variants", "add_rmsnorm_mxfp4", "--quant-hidden", "4112"], "hidden % 32 == 0"),
    (["--hidden", "32768"], "cannot run it"),
    (["--tokens", "4", "4"], "repeats"),
    (["--out", "/nonexistent-folder/x.json"], "does not exist"),
    (["--margin", "-0.1"], "--margin"),
])
def test_bad_arguments_exit_2_naming_the_problem(argv, message, capsys):
    assert cli_main(["bench", "kernels", "--plan", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["0", "-5", "x"])
def test_non_positive_counts_are_rejected_by_argparse(bad, capsys):
    assert cli_main(["bench", "kernels", "--plan", "--tokens", bad]) == 2  # one line, exit 2, no traceback
    err = capsys.readouterr().err
    assert "must be an integer from 1 to 131072" in err and len(err.strip().splitlines()) == 1


def test_derive_table_rejects_files_that_are_not_results(tmp_path, capsys):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"world_size": 1, "rows": [{"variant": "add_rmsnorm", "hidden": 1, "tokens": 1,
                                                          "vs_unfused": 2.0}]}))
    assert bk.main(["--derive-table", str(old)]) == 2
    assert "speedup_worst" in capsys.readouterr().err
    assert bk.main(["--derive-table", str(tmp_path / "missing.json")]) == 2
    good = tmp_path / "ws1.json"
    good.write_text(json.dumps(_result(1, {4096: {1: True, 2: False}})))
    assert bk.main(["--derive-table", str(good), str(good)]) == 2
    assert "measured twice" in capsys.readouterr().err


# -- compiled epilogue forms (Dynamo with the eager backend: no C++ compile) -------------------


def test_token_dynamic_form_compiles_once_and_never_serves_the_static_form():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    fn = bench_epilogue.epilogue_fn("add_rmsnorm_fp8_per_token", 1e-6)
    forms = bench_epilogue.compile_forms(fn, with_dynamic_true=False, backend="eager")
    w, s = torch.rand(64).bfloat16(), torch.tensor([0.02])

    def xr(t):
        return torch.randn(t, 64).bfloat16(), torch.randn(t, 64).bfloat16()

    x, r = xr(bk.TOKDYN_COMPILE_TOKENS)
    torch._dynamo.mark_dynamic(x, 0)
    torch._dynamo.mark_dynamic(r, 0)
    forms["tokdyn"](x, r, w, s)
    for t in (1, 3, 5):
        forms["tokdyn"](*xr(t), w, s)
    assert counters["stats"]["unique_graphs"] == 1
    for t in (1, 2, 3):
        forms["static"](*xr(t), w, s)
    assert counters["stats"]["unique_graphs"] == 4  # one per token count, none served by tokdyn
    torch._dynamo.reset()


@pytest.mark.parametrize("variant", br.VARIANTS)
def test_the_unfused_baseline_computes_what_the_fused_op_returns(variant, fake_pg):
    """The epilogue the baselines compile, with the quant arguments the fused op defaults
    to, against the public op on the reference backend (one-rank group): bit for bit."""
    from fusion_passes.cli.model_trace import fake_world

    group = "c10d:" + fake_world(1).group_name
    torch.manual_seed(0)
    x, res = torch.randn(5, 256).bfloat16(), torch.randn(5, 256).bfloat16()
    w = (torch.rand(256) + 0.5).bfloat16()
    scale = torch.tensor([bk.NVFP4_GLOBAL_SCALE if variant.endswith("nvfp4") else bk.FP8_STATIC_SCALE])
    unfused = bench_epilogue.epilogue_fn(variant, bk.EPS)(x, res, w, scale)
    fused = bk._fused_fn(variant, group, "reference")(x, res, w, scale)
    if variant == "add_rmsnorm":
        want, got = list(unfused), list(fused)  # (norm_out, residual_out)
    else:
        (q, scales), r = unfused
        want = [q, r] if scales is None else [q, scales, r]
        got = [fused[0], fused[1]] if scales is None else [fused[0], fused[1], fused[2]]
    for a, b in zip(want, got):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.view(torch.uint8) if a.element_size() == 1 else a, b.view(torch.uint8)
                           if b.element_size() == 1 else b)


def test_the_sweep_on_cpu(fake_pg):
    """The sweep's rows end to end on CPU: the reference backend stands in for triton,
    Dynamo's eager backend for Inductor, one eager call for the CUDA graph (a one-rank
    group of the session's fake world)."""
    import argparse

    from fusion_passes.cli.model_trace import fake_world

    group = fake_world(1)
    parser = argparse.ArgumentParser()
    bk.add_arguments(parser)
    args = parser.parse_args(["--tokens", "1", "3", "--with-dynamic-true"])
    ctx = bk.sweep_context(args, 0, 1, group.group_name, device="cpu", compile_backend="eager",
                           fused_backend="reference")
    selectors = {}
    torch._dynamo.reset()
    rows = bk._variant_hidden(ctx, "add_rmsnorm_fp8_per_token", 64, selectors)
    torch._dynamo.reset()
    assert [r["tokens"] for r in rows] == [1, 3]
    for r in rows:
        assert set(r["baselines"]) == {"none+static", "none+tokdyn", "none+dynamic_true"}
        assert r["best_unfused"] in ("none+static", "none+tokdyn") and r["extra_columns"] == ["none+dynamic_true"]
        assert r["selector"] == "triton" and r["triton_declined"] is None and "baseline_errors" not in r
    assert selectors == {"add_rmsnorm_fp8_per_token H=64": "triton at every point"}
    assert ctx.phases["compile_tokdyn"] > 0 and ctx.phases["compile_static"] > 0


def test_the_sweep_times_and_asks_the_selector_in_the_dtype_asked(fake_pg, monkeypatch):
    """``--dtype float16``: the weight, input and residual in float16 (the forms compile at the
    weight's dtype), and the selector asked about float16 calls, whose table entries differ."""
    import argparse

    from fusion_passes.cli.model_trace import fake_world

    parser = argparse.ArgumentParser()
    bk.add_arguments(parser)
    args = parser.parse_args(["--tokens", "2", "--dtype", "float16", "--json"])
    ctx = bk.sweep_context(args, 0, 1, fake_world(1).group_name, device="cpu", compile_backend="eager",
                           fused_backend="reference")
    asked, seen = [], []
    monkeypatch.setattr(bk, "_selector", lambda *a: asked.append(a) or ("triton", None))
    monkeypatch.setattr(bk, "_row", lambda ctx, v, h, t, w, *rest: seen.append(w.dtype) or {"tokens": t})
    torch._dynamo.reset()
    assert bk._variant_hidden(ctx, "add_rmsnorm", 64, {}) == [{"tokens": 2}]
    torch._dynamo.reset()
    assert asked == [("add_rmsnorm", 64, 2, 1, "float16")] and seen == [torch.float16]
    assert br.result(command="c", world=1, machine={}, versions={}, rows=[], phases={}, plan_={}, bandwidths={},
                     with_dynamic_true=False, selectors={}, dtype=args.dtype)["dtype"] == "float16"


# -- the selector and its table ----------------------------------------------------------------


def test_selector_verdict_per_row():
    assert bk._selector("add_rmsnorm", 7168, 64, 1) == ("triton", None)
    pick, why = bk._selector("add_rmsnorm", 7168, 64, 4)
    assert pick == "reference" and "no measured crossover" in why


def test_measuring_opens_the_crossover_gate_and_restores_it():
    assert "no measured crossover" in triton_backend.unsupported(call(64, world_size=4))
    with bk._triton_admitted(4, "add_rmsnorm"):
        assert triton_backend.unsupported(call(64, world_size=4)) is None
        assert backends.select(call(64, world_size=4)) == "triton"
        assert "fit in registers" in triton_backend.unsupported(call(64, hidden=32768, world_size=4))
    assert "no measured crossover" in triton_backend.unsupported(call(64, world_size=4))
    assert backends.select(call(64, world_size=4)) == "reference"


def test_win_ranges_can_be_non_contiguous():
    counts = [2**i for i in range(15)]
    won = {t: t <= 16 or t >= 2048 for t in counts}
    assert bt.win_ranges([(t, won[t]) for t in counts]) == ((1, 16), (2048, None))
    assert bt.win_ranges([(t, True) for t in counts]) == ((1, None),)
    assert bt.win_ranges([(t, False) for t in counts]) == ()
    assert bt.win_ranges([(1, False), (2, True), (4, False), (8, True), (16, False)]) == ((2, 2), (8, 8))
    with pytest.raises(ValueError, match="twice"):
        bt.win_ranges([(1, True), (1, False)])


def test_intersection_of_range_sets():
    assert bt.intersect(((1, 16), (2048, None)), ((1, 64), (4096, None))) == ((1, 16), (4096, None))
    assert bt.intersect(((1, 16),), ((32, None),)) == ()


def _result(world, hidden_wins: dict[int, dict[int, bool]], variant="add_rmsnorm") -> dict:
    rows = []
    for hidden, wins in hidden_wins.items():
        for tokens, won in wins.items():
            rows.append(br.make_row(variant=variant, hidden=hidden, tokens=tokens, calls=1,
                                    fused_us=2.0, fused_last_us=2.0 if won else 3.0,
                                    baselines={"none+static": 2.5, "none+tokdyn": 2.6}))
    return {"world_size": world, "machine": {"gpu": "NVIDIA H200", "host": "h"}, "versions": {"torch": "2.11"},
            "command": "fusion-passes bench kernels", "rows": rows}


COUNTS = [2**i for i in range(15)]
WINS = {4096: {t: t <= 16 or t >= 2048 for t in COUNTS}, 7168: {t: t <= 64 or t >= 4096 for t in COUNTS}}


def test_derive_and_render_round_trip(tmp_path, capsys):
    path = tmp_path / "ws1.json"
    path.write_text(json.dumps(_result(1, WINS)))
    assert bk.main(["--derive-table", str(path)]) == 0
    text = capsys.readouterr().out
    assert f"# Derived by `fusion-passes bench kernels --derive-table {path}`" in text
    assert "1x NVIDIA H200" in text
    body = text[text.index('"max_tokens_faster"'):].rstrip().rstrip(",")
    table = ast.literal_eval("{" + body + "}")["max_tokens_faster"]
    assert table == {(1, "add_rmsnorm"): {4096: ((1, 16), (2048, None)), 7168: ((1, 64), (4096, None)),
                                          None: ((1, 16), (4096, None))}}


def test_gate_follows_a_derived_table_at_every_measured_point_and_between(monkeypatch):
    table = dict(thresholds.TRITON["max_tokens_faster"])
    table.update(bt.derive([_result(1, WINS)]))
    monkeypatch.setitem(thresholds.TRITON, "max_tokens_faster", table)
    backends.select.cache_clear()
    for hidden, wins in WINS.items():
        for tokens, won in wins.items():
            assert (triton_backend.unsupported(call(tokens, hidden)) is None) == won, (hidden, tokens)
    assert triton_backend.unsupported(call(17, 4096)) is not None  # between a win (16) and a loss (32)
    assert triton_backend.unsupported(call(2047, 4096)) is not None  # between a loss and a win
    assert triton_backend.unsupported(call(3000, 4096)) is None  # between two wins
    assert triton_backend.unsupported(call(10**6, 4096)) is None  # open range past the largest measured
    assert triton_backend.unsupported(call(64, 5120)) is not None  # other hidden: the intersection
    assert triton_backend.unsupported(call(16, 5120)) is None
    assert triton_backend.unsupported(call(None, 4096)) is None  # a graph site: some range won
    backends.select.cache_clear()


def test_gate_declines_a_hidden_size_that_never_won_or_was_not_measured(monkeypatch):
    table = dict(thresholds.TRITON["max_tokens_faster"])
    table[(1, "add_rmsnorm")] = {4096: (), 7168: ((1, None),)}
    monkeypatch.setitem(thresholds.TRITON, "max_tokens_faster", table)
    assert "every measured token count" in triton_backend.unsupported(call(None, 4096))
    assert "every measured token count" in triton_backend.unsupported(call(8, 4096))
    assert "not measured" in triton_backend.unsupported(call(8, 8192))
    assert triton_backend.unsupported(call(8, 7168)) is None


def _admitted(entry, tokens: int) -> bool:
    if entry is None:
        return True
    if isinstance(entry, int):
        return tokens <= entry
    return any(lo <= tokens and (hi is None or tokens <= hi) for lo, hi in entry)


def _edges(entry) -> list[int]:
    if entry is None:
        return [1, 16384, 32768]  # (32768 x 7168 bf16 still fits the TP symmetric workspace)
    if isinstance(entry, int):
        return [max(1, entry - 1), entry, entry + 1]
    out = []
    for lo, hi in entry:
        out += [lo - 1, lo] + ([] if hi is None else [hi, hi + 1])
    return [t for t in out if t >= 1]


def test_gate_follows_todays_table_at_its_edges():
    """Whatever thresholds.py holds: every entry's token limit or range ends, one inside and
    one outside, at each listed hidden size and at one that is not listed."""
    _check_edges(thresholds.TRITON["max_tokens_faster"])


def test_gate_follows_a_per_hidden_table_at_its_edges(monkeypatch):
    table = {(1, "add_rmsnorm"): {4096: ((1, 16), (2048, None)), 7168: (), None: ((1, 16),)},
             (1, "add_rmsnorm_fp8_per_token"): {7168: ((4, 256), (1024, 1024))},
             (2, "add_rmsnorm"): 512, (2, "add_rmsnorm_nvfp4"): None}
    monkeypatch.setitem(thresholds.TRITON, "max_tokens_faster", table)
    _check_edges(table)


def _check_edges(measured: dict) -> None:
    assert measured, "thresholds.TRITON['max_tokens_faster'] is empty"
    checked = 0
    for (ws, variant), entry in measured.items():
        per_hidden = {7168: entry, 5120: entry} if not isinstance(entry, dict) else dict(entry)
        unlisted = next(h for h in (5120, 6144, 3072, 2048) if h not in per_hidden)
        if isinstance(entry, dict) and None not in entry:  # a dict without a default: unlisted hidden sizes are declined
            c = Call(variant=variant, device="cuda", dtype=torch.bfloat16, hidden=unlisted, world_size=ws, tokens=1)
            assert "not measured" in triton_backend.unsupported(c)
        for hidden, ranges in per_hidden.items():
            hidden = unlisted if hidden is None else hidden
            for tokens in _edges(ranges):
                c = Call(variant=variant, device="cuda", dtype=torch.bfloat16, hidden=hidden, world_size=ws,
                         tokens=tokens, group_size=128 if variant.endswith("per_group") else None)
                assert (triton_backend.unsupported(c) is None) == _admitted(ranges, tokens), (ws, variant, hidden, tokens)
                checked += 1
    assert checked >= 3 * len(measured)


@pytest.mark.parametrize("ws", [4, 8])
def test_gate_declines_unmeasured_world_sizes(ws):
    measured = {w for w, _ in thresholds.TRITON["max_tokens_faster"]}
    if ws in measured:
        pytest.skip(f"world size {ws} is measured in thresholds.py now; the edges test covers it")
    for tokens in (1, 64, None):
        assert "no measured crossover" in triton_backend.unsupported(call(tokens, world_size=ws))


def test_integer_limit_edges(monkeypatch):
    table = dict(thresholds.TRITON["max_tokens_faster"])
    table[(2, "add_rmsnorm")] = 512
    monkeypatch.setitem(thresholds.TRITON, "max_tokens_faster", table)
    assert triton_backend.unsupported(call(512, world_size=2)) is None
    assert "512" in triton_backend.unsupported(call(513, world_size=2))
    assert triton_backend.unsupported(call(513, world_size=2, variant="add_rmsnorm_fp8_per_token")) is None
