"""``fusion-passes tune`` without a GPU: its options, its candidates, its bucket timings on
CPU (the reference backend for the kernel, Dynamo's eager backend for Inductor, one eager
call for a CUDA graph), and ``tune --show`` over a written table. The collective decision
runs on gloo processes in tests/test_agree.py; the GPU run is tests/gpu + results/."""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

import pytest
import torch

from fusion_passes.backends import measured
from fusion_passes.cli import bench_kernels as bk
from fusion_passes.cli import tune, tune_show
from fusion_passes.cli import main as cli_main


def test_candidates_per_world_size():
    assert [tune.option_name(o) for o in tune.fused_options(1, "add_rmsnorm", 7168)] == [
        "fused:local:4", "fused:local:8", "fused:local:16"]
    four = [tune.option_name(o) for o in tune.fused_options(4, "add_rmsnorm_fp8_per_token", 7168)]
    assert len(four) == 9 and {n.split(":")[1] for n in four} == {"barrier", "lamport", "twoshot"}


def test_command_line_names_torchrun_at_n():
    assert tune.command_line(1, ["cli.py", "tune", "--hidden", "4096"]) == "fusion-passes tune --hidden 4096"
    assert tune.command_line(4, ["cli.py", "tune"]).startswith("torchrun --standalone --nproc_per_node=4 -m ")


@pytest.mark.parametrize("argv, message", [
    (["--hidden", "7170"], "hidden % 8 == 0"),
    (["--variants", "add_rmsnorm_mxfp4", "--hidden", "4112"], "hidden % 32 == 0"),
    (["--tokens", "4", "4"], "repeats"),
])
def test_bad_arguments_exit_2_before_any_work(argv, message, capsys):
    assert cli_main(["tune", *argv]) == 2
    assert message in capsys.readouterr().err


def test_off_without_a_file_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.setenv(measured.ENV, "off")
    assert cli_main(["tune"]) == 2 and "no measured-table file" in capsys.readouterr().err


def _sweep_context(tokens: str):
    """A world-size-1 sweep over *tokens* on the CPU (eager compiles, the reference backend)."""
    from fusion_passes.cli.model_trace import fake_world

    parser = argparse.ArgumentParser()
    tune.add_arguments(parser)
    args = parser.parse_args(["--tokens", tokens])
    args.with_dynamic_true = False
    return bk.sweep_context(args, 0, 1, fake_world(1).group_name, device="cpu", compile_backend="eager",
                            fused_backend="reference")


@pytest.mark.parametrize("context", tune.CONTEXTS)
def test_bucket_times_every_candidate_and_every_unfused_chain(fake_pg, monkeypatch, context):
    from fusion_passes.backends import triton as tb

    ctx = _sweep_context("3")
    ctx.args.context = context  # after-write: real copies before real calls (eager on the CPU)
    seen = []
    monkeypatch.setattr(tb, "FORCE", _Recorder(seen))
    w, scale = torch.rand(64).bfloat16(), torch.tensor([0.02])
    torch._dynamo.reset()
    forms = bk._compile_forms(ctx, "add_rmsnorm", 64, w, scale)
    fused = bk._fused_fn("add_rmsnorm", ctx.group, "reference")
    times = tune._bucket_times(ctx, "add_rmsnorm", 64, 3, w, scale, forms, fused, tb)
    torch._dynamo.reset()
    assert set(times) == {"fused:local:1", "fused:local:4", "fused:local:8", "fused:local:16", "none+static",
                          "none+tokdyn"}  # hidden 64: its own warp count (1) is a candidate too
    assert all(v > 0 for v in times.values())
    # forced, then cleared; one row and Triton's stages forced too (a table on disk must not change them)
    assert seen[:4] == [{"num_warps": w, "rows": 1, "num_stages": None, "evict": False, "chunk": 0, "tile": 1}
                        for w in (1, 4, 8, 16)]
    # then the confirm step: the fastest of the four again, once a round
    assert len(seen) == 4 + tune.CONFIRM_ROUNDS and seen[4] in seen[:4] and seen[4:] == [seen[4]] * tune.CONFIRM_ROUNDS
    assert set(ctx.confirm_us) == {tune.option_name(tune.parse_option(f"fused:local:{seen[4]['num_warps']}")),
                                   min(("none+static", "none+tokdyn"), key=lambda k: (times[k], k))}


def test_row_configs_only_at_world_size_1_where_the_programs_fill_the_sms_or_add_no_wave():
    names = [tune.option_name(o) for o in tune.row_options(1, 16384, 132, (8,))]
    assert names == ["fused:local:8:r2:s1", "fused:local:8:r2:s3", "fused:local:8:r4:s1", "fused:local:8:r4:s3"]
    assert [tune.option_name(o) for o in tune.row_options(1, 300, 132, (4, 16))] == [
        "fused:local:4:r2:s1", "fused:local:4:r2:s3",  # 75 programs of 4 rows would leave SMs idle
        "fused:local:16:r2:s1", "fused:local:16:r2:s3"]
    # 256 tokens: 128 programs of 2 rows on 132 SMs are one wave of 2 rows, as 256 one-row programs
    # are two waves of one; 4 rows (64 programs) would double what an SM does
    assert [tune.option_name(o) for o in tune.row_options(1, 256, 132, (8,))] == ["fused:local:8:r2:s1",
                                                                              "fused:local:8:r2:s3"]
    assert tune.rows_fit(256, 2, 132) and not tune.rows_fit(256, 4, 132) and tune.rows_fit(200, 2, 132)
    assert tune.rows_fit(528, 4, 132) and not tune.rows_fit(129, 2, 132)  # 129: one wave of one row
    assert tune.row_options(1, 129, 132, (4,)) == [] and tune.row_options(2, 16384, 132, (8,)) == []
    assert tune.row_options(1, 16384, None, (8,)) == []  # off CUDA: no launch config to vary
    assert tune.parse_option("fused:local:8:r4:s1") == {"path": "local", "num_warps": 8, "rows": 4, "num_stages": 1}
    assert tune.parse_option("fused:barrier:16") == {"path": "barrier", "num_warps": 16, "rows": 1,
                                                      "num_stages": None}
    evict = {"path": "local", "num_warps": 8, "rows": 1, "num_stages": None, "evict": True}
    assert tune.option_name(evict) == "fused:local:8:evict" and tune.parse_option(tune.option_name(evict)) == evict


def test_the_looped_kernel_is_timed_in_pieces_below_the_hidden_size_where_it_computes_the_variant():
    names = [tune.option_name(o) for o in tune.chunk_options(1, "add_rmsnorm", 4096, 132, (4, 8))]
    assert names == ["fused:local:4:c1024", "fused:local:8:c1024", "fused:local:4:c2048", "fused:local:8:c2048"]
    assert [tune.option_name(o) for o in tune.chunk_options(1, "add_rmsnorm_fp8_static", 2048, 132, (8,))] == [
        "fused:local:8:c1024"]  # 2048: one piece would be the whole row
    assert tune.chunk_options(1, "add_rmsnorm_fp8_per_token", 4096, 132, (8,)) == []  # a dynamic scale: not looped
    assert tune.chunk_options(2, "add_rmsnorm", 4096, 132, (8,)) == [] and tune.chunk_options(1, "add_rmsnorm", 4096,
                                                                                                None, (8,)) == []
    for name in ("fused:local:8:c2048", "fused:local:8:c1024:evict", "fused:local:4:r2:s1:c1024"):
        assert tune.option_name(tune.parse_option(name)) == name
    assert tune.parse_option("fused:local:8:c2048:evict") == {"path": "local", "num_warps": 8, "rows": 1,
                                                               "num_stages": None, "chunk": 2048, "evict": True}
    with pytest.raises(ValueError, match="not a fused option name"):
        tune.parse_option("fused:local:8:x3")


def test_the_tile_kernel_is_timed_where_its_block_fits_and_it_computes_the_variant():
    names = [tune.option_name(o) for o in tune.tile_options(1, "add_rmsnorm", 4096, 1024, 132, (8, 16))]
    assert names == ["fused:local:8:t2", "fused:local:16:t2", "fused:local:8:t4", "fused:local:16:t4"]
    # 7168 (a block of 8192): 2 rows at once fit 16384 elements, 4 do not; static FP8 is computed
    assert [tune.option_name(o) for o in tune.tile_options(1, "add_rmsnorm_fp8_static", 7168, 1024, 132, (8,))] == [
        "fused:local:8:t2"]
    assert tune.tile_options(1, "add_rmsnorm", 4096, 129, 132, (8,)) == []  # 129 tokens: one wave of one row
    assert tune.tile_options(1, "add_rmsnorm_fp8_per_token", 4096, 1024, 132, (8,)) == []  # a dynamic scale
    assert tune.tile_options(1, "add_rmsnorm_nvfp4", 4096, 1024, 132, (8,)) == []
    assert tune.tile_options(2, "add_rmsnorm", 4096, 1024, 132, (8,)) == []
    assert tune.tile_options(1, "add_rmsnorm", 4096, 1024, None, (8,)) == []
    for name in ("fused:local:16:t2", "fused:local:16:t2:evict"):
        assert tune.option_name(tune.parse_option(name)) == name
    assert tune.parse_option("fused:local:16:t2:evict") == {"path": "local", "num_warps": 16, "rows": 1,
                                                             "num_stages": None, "tile": 2, "evict": True}
    # evict_first's one-row candidate is a one-row program, not a tile; the fastest tile is one too
    times = {"fused:local:8": 3.0, "fused:local:16:t2": 2.0, "none+static": 1.0}
    assert [tune.option_name(o) for o in tune.evict_options(times)] == ["fused:local:16:t2:evict",
                                                                       "fused:local:8:evict"]
    times.update({"fused:local:8:r2:s1": 1.5})
    assert [tune.option_name(o) for o in tune.evict_options(times)] == [
        "fused:local:8:r2:s1:evict", "fused:local:8:evict", "fused:local:16:t2:evict"]


def test_evict_first_is_tried_on_the_fastest_and_the_fastest_one_row_config():
    times = {"fused:local:4": 3.0, "fused:local:8": 2.5, "fused:local:8:r2:s1": 2.0, "fused:local:16": None,
             "none+static": 1.0}
    assert [tune.option_name(o) for o in tune.evict_options(times)] == [
        "fused:local:8:r2:s1:evict", "fused:local:8:evict"]
    times["fused:local:8:r2:s1"] = 2.6  # one row is fastest: one candidate
    assert [tune.option_name(o) for o in tune.evict_options(times)] == ["fused:local:8:evict"]
    assert tune.evict_options({"none+static": 1.0}) == []


@pytest.mark.parametrize("evict_gain", [-0.5, 0.5])
def test_the_second_pass_times_rows_at_every_warp_count_and_the_entry_keeps_the_fastest(fake_pg, monkeypatch, evict_gain):
    """A fake timer: the fused time is a function of the forced config (8 warps fastest, then
    4 rows at 1 stage); the second pass times rows at each of the first pass's warp counts,
    and the bucket's entry names the warps, rows and stages that won."""
    from fusion_passes.backends import triton as tb

    ctx = _sweep_context("4096")
    ctx.args.context = "alone"  # the fake timer's times are the options' own
    seen = []
    monkeypatch.setattr(tb, "FORCE", _Recorder(seen))
    monkeypatch.setattr(tune, "programs_to_fill", lambda device: 132)
    cost = {4: 10.0, 8: 9.0, 16: 11.0}

    def fake_time(fn, inputs, calls, replays):
        f = dict(tb.FORCE)
        if not f:
            return 9.5  # an unfused chain
        return cost.get(f["num_warps"], 12.0) - {None: 0, 1: 0, 2: 0.5, 4: 1.0}[f.get("rows")] \
            - (0.25 if f.get("num_stages") == 1 else 0.0) - (evict_gain if f.get("evict") else 0.0)
    monkeypatch.setattr(ctx, "time_graph", fake_time)
    w, scale = torch.rand(64).bfloat16(), torch.tensor([0.02])
    forms = {"static": lambda *a: None, "tokdyn": lambda *a: None}
    monkeypatch.setattr(bk, "_timed", lambda *a, **k: None)
    monkeypatch.setattr(bk, "_collectives", lambda ctx, x: {"none": lambda t: t})
    times = tune._bucket_times(ctx, "add_rmsnorm", 64, 4096, w, scale, forms, lambda *a: None, tb)
    assert seen[4:20] == [{"num_warps": w, "rows": r, "num_stages": s, "evict": False, "chunk": 0, "tile": 1}
                          for w in (1, 4, 8, 16) for r in (2, 4) for s in (1, 3)]  # hidden 64: 1 warp too
    # no pieces below 64; then 2 and 4 rows at once at each warp count (the fake timer: no faster)
    assert seen[20:28] == [{"num_warps": w, "rows": 1, "num_stages": None, "evict": False, "chunk": 0, "tile": t}
                           for t in (2, 4) for w in (1, 4, 8, 16)]
    # then evict_first on the fastest so far (8 warps, 4 rows, 1 stage), the fastest one-row (8 warps)
    # and the fastest tile (8 warps, 2 rows at once: tied with 4, the first name)
    assert seen[28:31] == [{"num_warps": 8, "rows": 4, "num_stages": 1, "evict": True, "chunk": 0, "tile": 1},
                           {"num_warps": 8, "rows": 1, "num_stages": None, "evict": True, "chunk": 0, "tile": 1},
                           {"num_warps": 8, "rows": 1, "num_stages": None, "evict": True, "chunk": 0, "tile": 2}]
    # then the confirm step times the fastest (8 warps, 4 rows, 1 stage; evict_first where it gained) again
    assert seen[31:] == [{"num_warps": 8, "rows": 4, "num_stages": 1, "evict": evict_gain > 0, "chunk": 0,
                          "tile": 1}] * tune.CONFIRM_ROUNDS
    entry, row = tune.decide_bucket(ctx.group, "add_rmsnorm", 64, 4096, times, "bfloat16", ctx.confirm_us)
    assert (entry["pick"], entry["num_warps"], entry["rows"], entry["num_stages"]) == ("fused", 8, 4, 1)
    assert entry.get("evict", False) is (evict_gain > 0)
    assert entry["fused_us"] == 7.75 - max(evict_gain, 0) and entry["best_unfused"] in ("none+static", "none+tokdyn")
    (e,) = measured.parse_table({"key": {}, "entries": [entry]}, "test").buckets[("add_rmsnorm", 64, "bfloat16")]  # read back
    assert bool(e.evict) is (evict_gain > 0)


class _Recorder(dict):
    def __init__(self, seen):
        super().__init__()
        self.seen = seen

    def update(self, other):
        self.seen.append(dict(other))
        super().update(other)


def test_show_prints_each_entry_and_its_source(monkeypatch, tmp_path):
    file = tmp_path / "tuned.json"
    monkeypatch.setattr(measured, "_gpu", lambda: "NVIDIA H200")
    monkeypatch.setattr(measured, "_versions", lambda: {"torch": "2.11", "triton": "3.6", "driver": "580"})
    key = measured.machine_key(1)
    measured.write({"key": key, "command": "fusion-passes tune --hidden 7168", "written": "2026-12-06T20:35:00Z",
                    "entries": [{"variant": "add_rmsnorm", "hidden": 7168, "dtype": "bfloat16", "tokens": 1024, "pick": "unfused",
                                 "path": "local", "num_warps": 8, "fused_us": 16.71, "unfused_us": 16.13,
                                 "best_unfused": "none+static"},
                                {"variant": "add_rmsnorm", "hidden": 7168, "dtype": "float16", "tokens": 2048, "pick": "fused",
                                 "path": "local", "num_warps": 4, "rows": 2, "num_stages": 1, "evict": True,
                                 "fused_us": 40.1, "unfused_us": 43.2, "best_unfused": "none+static"},
                                {"variant": "add_rmsnorm", "hidden": 7168, "dtype": "float16", "tokens": 4096, "pick": "fused",
                                 "path": "local", "num_warps": 16, "tile": 2, "fused_us": 80.5, "unfused_us": 84.0,
                                 "best_unfused": "none+static"}]}, file)
    text = tune_show.render(str(file))
    measured.reset()
    assert f"measured tables in {file}:" in text and "NVIDIA H200, world size 1" in text and "[used here]" in text
    assert "from `fusion-passes tune --hidden 7168` at 2026-12-06T20:35:00Z" in text
    assert "add_rmsnorm                  7168  bfloat16    1024  unfused  local        8     16.71       16.13  none+static\n" in text
    assert "7168  float16     2048  fused    local        4     40.10       43.20  none+static  (2 rows, stages 1, evict_first)" in text
    assert "7168  float16     4096  fused    local       16     80.50       84.00  none+static  (2 rows at once)" in text
    assert "the shipped table" in text.splitlines()[-1]
    monkeypatch.setenv("WORLD_SIZE", "abc")  # a bad WORLD_SIZE is a usage error naming it (exit 2), not a crash
    assert cli_main(["tune", "--show", "--file", str(file)]) == 2
    monkeypatch.delenv("WORLD_SIZE")
    measured.reset()
    file.write_text("{")
    assert "unreadable" in tune_show.render(str(file))


def test_the_kernel_compiles_twice_per_launch_config_over_the_token_buckets():
    """Cold calibration compiles every launch config it times. Triton specializes an int argument
    on ``== 1`` and on ``% 16 == 0``; the row count T only bounds loops and masks, so the
    alignment split would only add binaries: over tune's buckets each config compiles for 1
    token and once for all the rest (Triton's own specialization function decides)."""
    native = getattr(pytest.importorskip("triton._C.libtriton", reason="needs Triton's compiled module"),
                     "native_specialize_impl", None)
    if native is None:
        pytest.skip("needs Triton's native_specialize_impl, which this Triton lacks")
    cuda = pytest.importorskip("triton.backends.nvidia.compiler", reason="needs Triton's NVIDIA backend").CUDABackend
    from fusion_passes.backends import triton_kernels

    (t,) = [p for p in triton_kernels.fused_allreduce_add_rmsnorm_kernel.params if p.name == "T"]
    keys = {native(cuda, n, False, not t.do_not_specialize, not t.do_not_specialize_on_alignment)
            for n in tune.DEFAULT_TOKENS}
    assert keys == {("constexpr", 1), ("i32", "")}, keys
    assert native(cuda, 1024, False, True, True) == ("i32", "D")  # what the default would do


def test_after_write_times_each_option_right_after_its_input_is_written_less_the_write(fake_pg, monkeypatch):
    """--context after-write: the write alone is timed once per bucket; every fused config and
    every unfused chain runs with a write of its input right before it, and counts the pair
    less the write (a fake timer that adds up what each captured call ran, each call 1 us
    cheaper right after a write, as with its input in L2)."""
    from fusion_passes.backends import triton as tb

    ctx = _sweep_context("8")
    assert ctx.args.context == "after-write"  # the default (tune.CONTEXTS: the model step measured faster)
    log = []
    monkeypatch.setattr(tune, "write_input", lambda dst, src: log.append("write") or dst)
    monkeypatch.setattr(tune, "programs_to_fill", lambda device: None)  # the first pass only
    cost = {"write": 3.0, "static": 5.0, "tokdyn": 6.0}

    def fake_time(fn, inputs, calls, replays):
        log.clear()
        fn(*inputs)
        return sum((cost[e] if isinstance(e, str) else 1.0 + e) - (i > 0 and log[i - 1] == "write")
                   for i, e in enumerate(log))

    def fused(x, r, w, s):
        log.append(tb.FORCE["num_warps"])  # costs 1 + warps
    monkeypatch.setattr(ctx, "time_graph", fake_time)
    monkeypatch.setattr(bk, "_timed", lambda *a, **k: None)
    forms = {k: (lambda *a, k=k: log.append(k)) for k in ("static", "tokdyn")}
    w, scale = torch.rand(64).bfloat16(), torch.tensor([0.02])
    times = tune._bucket_times(ctx, "add_rmsnorm", 64, 8, w, scale, forms, fused, tb)
    assert times == {"fused:local:1": 1.0, "fused:local:4": 4.0, "fused:local:8": 8.0, "fused:local:16": 16.0,
                     "none+static": 4.0, "none+tokdyn": 5.0}
    assert ctx.write_us == 3.0
    ctx.args.context = "alone"  # no write anywhere
    times = tune._bucket_times(ctx, "add_rmsnorm", 64, 8, w, scale, forms, fused, tb)
    assert times["fused:local:8"] == 9.0 and times["none+static"] == 5.0 and ctx.write_us is None


def test_precompile_makes_in_threads_every_binary_the_timed_launches_look_up(tmp_path):
    """tests/triton_precompile_case.py (its own process, about 10 s): tune's precompile for add +
    RMSNorm at hidden 4096 over 1, 4 and 512 tokens, for an sm_90 target through a stand-in
    driver, then every (bucket, option) call again one at a time: the second pass compiles
    nothing, and the first compiled every binary in the pool's threads, none in the caller's."""
    pytest.importorskip("triton", reason="needs triton (a torch dependency) to compile the kernel for sm_90")
    out = tmp_path / "found.json"
    script = pathlib.Path(__file__).with_name("triton_precompile_case.py")
    run = subprocess.run([sys.executable, str(script), str(out), str(tmp_path / "cache")], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(out.read_text())
    # 1 token: the 3 warp counts, the looped kernel at 2 piece sizes x 3 warps (no rows, no tile: one
    # program); 4 tokens: the same (4 rows on 132 SMs fill nothing more); 512: + 2 and 4 rows x 2 stages
    # and 2 and 4 rows at once, each x 3 warps
    assert found["calls"] == 9 + 9 + 9 + 12 + 6
    # 1 token is its own binary (Triton specializes T == 1); 4 and 512 tokens share theirs
    assert found["binaries"] == found["compiles_first"] == 9 + 9 + 12 + 6
    assert found["compiles_again"] == 0
    assert found["main_thread_compiles"] == 0 and found["threads_first"] == 2
    assert found["phases"] == ["precompile"]


def test_the_confirm_step_times_the_two_fastest_again_and_their_medians_decide(fake_pg, monkeypatch):
    """The first pass keeps the luckiest draw of a dozen configs: a fake timer whose first timing
    of 8 warps is 2 us low (a lucky draw) and every later one its true 10 us, against an unfused
    chain at 9.5. The first pass alone would pick fused at 8.0; the confirm step times 8 warps and
    the static chain again, three rounds in turns, and picks unfused on their medians."""
    from fusion_passes.backends import triton as tb

    ctx = _sweep_context("8")
    ctx.args.context = "alone"
    monkeypatch.setattr(tune, "programs_to_fill", lambda device: None)  # the first pass only
    order, draws = [], {}

    def fake_time(fn, inputs, calls, replays):
        name = f"fused:{tb.FORCE['num_warps']}" if tb.FORCE else fn(*inputs)
        order.append(name)
        draws[name] = draws.get(name, 0) + 1
        if name == "fused:8":
            return 8.0 if draws[name] == 1 else 10.0
        return {"static": 9.5, "tokdyn": 11.0}.get(name, 12.0)
    monkeypatch.setattr(ctx, "time_graph", fake_time)
    monkeypatch.setattr(bk, "_timed", lambda *a, **k: None)
    monkeypatch.setattr(bk, "_collectives", lambda ctx, x: {"none": lambda t: t})
    forms = {"static": lambda *a: "static", "tokdyn": lambda *a: "tokdyn"}
    w, scale = torch.rand(64).bfloat16(), torch.tensor([0.02])
    times = tune._bucket_times(ctx, "add_rmsnorm", 64, 8, w, scale, forms, lambda *a: None, tb)
    assert times["fused:local:8"] == 8.0 and ctx.confirm_us == {"fused:local:8": 10.0, "none+static": 9.5}
    # the first pass, then 8 warps and the static chain in turns, the order swapped each round
    assert order[-tune.CONFIRM_ROUNDS * 2:] == ["fused:8", "static", "static", "fused:8", "fused:8", "static"]
    entry, row = tune.decide_bucket(ctx.group, "add_rmsnorm", 64, 8, times, "bfloat16", ctx.confirm_us)
    assert (entry["pick"], entry["num_warps"], entry["fused_us"], entry["unfused_us"]) == ("unfused", 8, 10.0, 9.5)
    assert row["times_us"]["fused:local:8"] == 8.0 and row["confirm_us"] == {"fused:local:8": 10.0, "none+static": 9.5}
    assert row["speedup"] == 0.95
    first, _ = tune.decide_bucket(ctx.group, "add_rmsnorm", 64, 8, times, "bfloat16")  # the first pass alone
    assert first["pick"] == "fused"
    times = {k: None for k in times if k.startswith("fused:")} | {"none+static": 1.0}  # no fused time: nothing to confirm
    assert tune.confirm(ctx, tb, times, None, {}, None) == {}
