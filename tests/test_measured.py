"""The measured table (fusion_passes.backends.measured) on CPU: its location, format, keys
and versions, the warnings for a stale / corrupt / mismatched file, the selector reading it
before the shipped table (per call, per graph site, per compile range), and the vLLM route
handing its compile range to the selector. The GPU is faked: a name and versions."""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time

import pytest
import torch

from fusion_passes import backends, compile_range
from fusion_passes.backends import Call, Slower, agree, measured
from fusion_passes.backends import triton as triton_backend

GPU = "NVIDIA H20"  # a GPU kind no shipped per-GPU table names (tests below fake an H100 for that)
VERSIONS = {"torch": "2.11.0", "triton": "3.6.0", "driver": "12080"}

BF16 = torch.bfloat16


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """A fake GPU and versions, the table file in tmp_path; everything read is forgotten after."""
    file = tmp_path / "tuned.json"
    monkeypatch.setenv(measured.ENV, str(file))
    monkeypatch.setattr(measured, "_gpu", lambda: GPU)
    monkeypatch.setattr(measured, "_versions", lambda: dict(VERSIONS))
    measured.reset()
    agree.reset()
    yield file
    measured.reset()
    agree.reset()


def entry(tokens, pick, variant="add_rmsnorm", hidden=7168, dtype="bfloat16", **kw):
    return {"variant": variant, "hidden": hidden, "dtype": dtype, "tokens": tokens, "pick": pick, "fused_us": 2.0,
            "unfused_us": 3.0 if pick == "fused" else 1.5, **kw}


# 1..16384 tokens at hidden 7168: fused up to 128, unfused at 256 and 512, fused above
STRADDLE = [entry(2**i, "unfused" if 2**i in (256, 512) else "fused", num_warps=8) for i in range(15)]


def table(entries, world_size=1, **key):
    return {"key": {"gpu": GPU, "world_size": world_size, "single_node": True, **VERSIONS, **key},
            "command": "fusion-passes tune", "entries": entries}


def cuda_call(tokens, hidden=7168, variant="add_rmsnorm", world_size=1, table_=None, token_range=None, dtype=BF16):
    return Call(variant=variant, device="cuda", dtype=dtype, hidden=hidden, world_size=world_size,
                tokens=tokens, table=table_, token_range=token_range)


def test_location_env_override_default_and_off(monkeypatch, tmp_path):
    monkeypatch.setenv(measured.ENV, str(tmp_path / "x.json"))
    assert measured.path() == tmp_path / "x.json"
    monkeypatch.setenv(measured.ENV, "off")
    assert measured.path() is None
    monkeypatch.delenv(measured.ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert measured.path() == tmp_path / "fusion_passes" / "tuned.json"


def test_no_file_no_table_and_nothing_written(machine):
    assert measured.local(1) is None and agree.table_id(None, 1) is None
    assert not machine.exists()  # reading never writes


def test_written_table_reads_back_keyed_and_bucketed(machine):
    measured.write(table(STRADDLE))
    t = measured.local(1)
    assert t.source == str(machine) and t.key["gpu"] == GPU and len(t.digest) == 16
    assert measured.local(2) is None  # another world size: another key
    assert t.lookup("add_rmsnorm", 7168, 200, dtype=BF16).tokens == 256  # the bucket at or above
    assert t.lookup("add_rmsnorm", 7168, 10**6, dtype=BF16).tokens == 16384  # above them all: the largest
    assert t.lookup("add_rmsnorm", 4096, 8, dtype=BF16) is None
    assert [e.tokens for e in t.in_range("add_rmsnorm", 7168, 129, 300, dtype=BF16)] == [256, 512]
    assert [e.tokens for e in t.in_range("add_rmsnorm", 7168, 20000, None, dtype=BF16)] == [16384]
    assert agree.table_id(None, 1) == t.digest and measured.by_digest(t.digest) is t


def test_a_new_tune_replaces_its_pairs_and_keeps_the_others(machine):
    measured.write(table(STRADDLE))
    measured.write(table([entry(1, "unfused", hidden=4096)]))
    measured.write(table([entry(1, "fused", hidden=4096)]))
    t = measured.local(1)
    assert t.has("add_rmsnorm", 7168, dtype=BF16) and t.lookup("add_rmsnorm", 4096, 1, dtype=BF16).pick == "fused"
    assert len(json.loads(machine.read_text())["tables"]) == 1


@pytest.mark.parametrize("content, says", [
    ("{not json", "not readable JSON"),
    (json.dumps({"format": "something else"}), "not a measured table"),
    (json.dumps({"format": measured.FORMAT, "version": 99, "tables": []}), "format version 99"),
    (json.dumps({"format": measured.FORMAT, "version": 2, "tables": [table([entry(1, "maybe")])]}), "pick must be"),
    (json.dumps({"format": measured.FORMAT, "version": 2, "tables": [table([entry(1, "fused", fused_us=float("nan"))])]}),
     "positive finite"),
    (json.dumps({"format": measured.FORMAT, "version": 2, "tables": [table([entry(1, "fused", variant="os.system")])]}),
     "unknown variant"),
    (json.dumps({"format": measured.FORMAT, "version": 2, "tables": [table([entry(1, "fused"), entry(1, "fused")])]}),
     "listed twice"),
    (json.dumps({"format": measured.FORMAT, "version": 2, "tables": [table([entry(1, "fused", rows=3)])]}),
     "rows must be one of (1, 2, 4, 8), got 3"),
    (json.dumps({"format": measured.FORMAT, "version": 2, "tables": [table([entry(1, "fused", num_stages=0)])]}),
     "num_stages must be one of"),
    (json.dumps({"format": measured.FORMAT, "version": 2, "tables": [table([entry(1, "fused", rows=True)])]}),
     "rows must be one of"),
    (json.dumps({"format": measured.FORMAT, "version": 2,
                 "tables": [table([entry(1, "fused", rows=2, path="barrier")], world_size=1)]}),
     "only the world-size-1 kernel"),
    (json.dumps({"format": measured.FORMAT, "version": 2, "tables": [table([entry(1, "fused", dtype="float64")])]}),
     "dtype must be one of ('bfloat16', 'float16'), got 'float64'"),
    (json.dumps({"format": measured.FORMAT, "version": 2, "tables": [table([entry(1, "fused", dtype=None)])]}),
     "dtype must be one of"),
    (json.dumps({"format": measured.FORMAT, "version": 2, "tables": [table([entry(1, "fused", chunk=3000)])]}),
     "chunk must be one of (256, 512, 1024, 2048, 4096), got 3000"),
    (json.dumps({"format": measured.FORMAT, "version": 2,
                 "tables": [table([entry(1, "fused", chunk=1024, path="barrier")], world_size=1)]}),
     "chunk 1024 on path 'barrier'"),
    (json.dumps({"format": measured.FORMAT, "version": 2, "tables": [table([entry(1, "fused", tile=3)])]}),
     "tile must be one of (1, 2, 4, 8), got 3"),
    (json.dumps({"format": measured.FORMAT, "version": 2,
                 "tables": [table([entry(1, "fused", tile=2, path="barrier")], world_size=1)]}),
     "tile 2 on path 'barrier'"),
    (json.dumps({"format": measured.FORMAT, "version": 2, "tables": [table([entry(1, "fused", tile=2, rows=2)])]}),
     "a launch is one of the three"),
    (json.dumps({"format": measured.FORMAT, "version": 2, "tables": [table([entry(1, "fused", evict="yes")])]}),
     "evict must be true or false"),
    (json.dumps({"format": measured.FORMAT, "version": 2,
                 "tables": [table([entry(1, "fused", evict=True, path="lamport")], world_size=1)]}),
     "true only on path 'local'"),
    (json.dumps({"format": measured.FORMAT, "version": 2, "tables": [table(STRADDLE, torch="2.10.0")]}),
     "stale: measured with other versions (torch '2.10.0' there, '2.11.0' here)"),
    (json.dumps({"format": measured.FORMAT, "version": 2, "tables": [table(STRADDLE, gpu="NVIDIA H200")]}),
     "no table for this GPU"),
])
def test_a_bad_file_gives_one_warning_and_the_shipped_table(machine, caplog, content, says):
    machine.write_text(content)
    with caplog.at_level(logging.WARNING, logger="fusion_passes"):
        for _ in range(3):
            assert measured.local(1) is None
            measured._local.cache_clear()  # read again: still one warning
            measured._LOCAL.clear()
    warnings = [r.getMessage() for r in caplog.records if "measured table" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert says in warnings[0] and str(machine) in warnings[0] and "shipped table is used" in warnings[0]


def test_a_version_1_file_reads_as_bfloat16_and_never_decides_float16(machine, caplog):
    """Before the dtype key (format version 1) tune timed bfloat16 only: such a file's entries
    are bfloat16 entries; a float16 call finds none and the shipped table decides it."""
    old = table([{k: v for k, v in e.items() if k != "dtype"} for e in STRADDLE])
    machine.write_text(json.dumps({"format": measured.FORMAT, "version": 1, "tables": [old]}))
    with caplog.at_level(logging.WARNING, logger="fusion_passes"):
        digest = measured.local(1).digest
    assert not caplog.records
    assert isinstance(triton_backend.unsupported(cuda_call(300, table_=digest)), Slower)  # the bf16 bucket: unfused
    assert triton_backend.table_source(cuda_call(300, table_=digest)) == f"measured table {machine}"
    fp16 = cuda_call(1024, table_=digest, dtype=torch.float16)  # measured fused in bf16; the shipped table: slower
    assert triton_backend.table_source(fp16) == "shipped table"
    assert "shipped table" in triton_backend.unsupported(fp16)
    measured.write(table([entry(1024, "fused", dtype="float16")]))  # a new tune in fp16 keeps the bf16 entries
    t = measured.local(1)
    assert t.lookup("add_rmsnorm", 7168, 300, dtype=BF16).pick == "unfused"
    assert t.lookup("add_rmsnorm", 7168, 300, dtype=torch.float16).pick == "fused"
    assert json.loads(machine.read_text())["version"] == measured.VERSION == 2


def test_tune_replaces_a_file_it_cannot_read(machine):
    machine.write_text("{not json")
    measured.write(table(STRADDLE))
    assert measured.local(1) is not None and machine.with_suffix(".json.bad").read_text() == "{not json"


# -- the selector reads the measured table before the shipped one ------------------------------


def test_per_call_the_measured_bucket_decides_and_is_named(machine):
    measured.write(table(STRADDLE))
    digest = measured.local(1).digest
    assert triton_backend.unsupported(cuda_call(128, table_=digest)) is None
    why = triton_backend.unsupported(cuda_call(300, table_=digest))
    assert isinstance(why, Slower) and "512-token bucket" in why and str(machine) in why
    # the shipped table says the opposite at 300 and 4096 tokens (hidden 7168: wins 1-256, 2048-)
    assert isinstance(triton_backend.unsupported(cuda_call(300)), Slower)
    assert triton_backend.unsupported(cuda_call(1024, table_=digest)) is None
    assert "shipped table" in triton_backend.unsupported(cuda_call(1024))
    assert triton_backend.table_source(cuda_call(1, table_=digest)) == f"measured table {machine}"
    assert triton_backend.table_source(cuda_call(1, hidden=4096, table_=digest)) == "shipped table"  # not measured
    assert backends.table_source("triton", cuda_call(1)) == "shipped table"
    assert backends.table_source("reference", cuda_call(1)) is None


def test_a_graph_site_and_its_compile_range(machine):
    measured.write(table(STRADDLE))
    digest = measured.local(1).digest
    site = lambda r: triton_backend.unsupported(cuda_call(None, table_=digest, token_range=r))  # noqa: E731
    assert site(None) is None  # some bucket wins: fused, each call picks at run time
    assert site((1, 8192)) is None  # straddles the crossover: left to run time
    slower = site((200, 500))  # every bucket serving 200..500 (256, 512) lost
    assert isinstance(slower, Slower) and "200-500" in slower and str(machine) in slower
    assert site((129, 129)) is not None and site((128, 129)) is None
    assert site((600, None)) is None


def test_compile_ranges_against_the_shipped_table(monkeypatch):
    from fusion_passes.backends import thresholds

    table_ = dict(thresholds.TRITON["max_tokens_faster"])
    table_[(1, "add_rmsnorm")] = {4096: ((1, 256), (1024, 8192)), None: ((1, 16),)}
    table_[(2, "add_rmsnorm")] = 512
    monkeypatch.setitem(thresholds.TRITON, "max_tokens_faster", table_)
    site = lambda r, ws=1, h=4096: triton_backend.unsupported(cuda_call(None, h, world_size=ws, token_range=r))  # noqa: E731
    assert "lies outside" in site((300, 900)) and "shipped table" in site((300, 900))
    assert site((300, 1024)) is None and site((9000, None)) is not None and site((8192, None)) is None
    assert site((17, 64), h=5120) is not None and site((16, 64), h=5120) is None
    assert "starts above 512" in site((513, 8192), ws=2) and site((512, 8192), ws=2) is None


def test_reading_the_table_costs_under_a_millisecond_per_site(machine):
    measured.write(table(STRADDLE + [entry(2**i, "fused", hidden=h) for h in (4096, 8192) for i in range(15)]))
    measured.reset()
    start = time.perf_counter()
    n = 200
    for i in range(n):  # what a graph site costs: the table's id, then the gate, caches cold each time
        backends.select.cache_clear()
        digest = agree.table_id(None, 1)
        triton_backend.unsupported(cuda_call(None, hidden=(4096, 7168, 8192)[i % 3], table_=digest,
                                             token_range=(1, 8192)))
    per_site_ms = (time.perf_counter() - start) / n * 1e3
    assert per_site_ms < 1.0, per_site_ms


# -- the vLLM route: its compile range reaches the selector and the report ----------------------


def test_vllm_compile_range_reaches_the_call_and_the_report(fake_pg):
    from torch.fx.experimental.proxy_tensor import make_fx
    from vllm.compilation.passes.inductor_pass import pass_context
    from vllm.config.utils import Range

    from fusion_passes.match import compile_time_call
    from fusion_passes.recognize import all_reduce
    from fusion_passes.vllm import VllmFusionPass
    from graphs import all_reduce as ar_fn, hf_rms_norm

    def block(x, r, w):
        return hf_rms_norm(ar_fn(x) + r, w)

    with torch.no_grad():
        gm = make_fx(torch.func.functionalize(block), tracing_mode="symbolic")(
            torch.randn(6, 64), torch.randn(6, 64), torch.randn(64))
    site = next(a for n in gm.graph.nodes if (a := all_reduce(n)) is not None)
    assert compile_time_call("add_rmsnorm", site).token_range is None
    with compile_range.serving(1, 16):
        assert compile_time_call("add_rmsnorm", site).token_range == (1, 16)
    p = VllmFusionPass(backend="reference")
    with pass_context(Range(start=1, end=16)):
        p(gm.graph)
    assert [s.token_range for s in p.report.sites] == [(1, 16)]
    assert p.report.to_dict()["sites"][0]["token_range"] == [1, 16]
    assert compile_range.current() is None  # reset after the pass


def test_explain_shows_the_table_and_the_range():
    from fusion_passes.cli.explain import GraphExplanation, render_text

    site = {"all_reduce": "ar", "fused": True, "variant": "allreduce_add_rmsnorm", "backend": "triton",
            "hoisted_over": [], "reason": None, "table": "measured table /c/tuned.json", "token_range": [1, 16],
            "source": None, "code": None}
    text = render_text([GraphExplanation("g", [site], [])])
    assert "(backend triton, measured table /c/tuned.json)" in text and "compile range: 1-16 tokens" in text


def test_the_measured_path_is_taken_unless_forced(monkeypatch):
    from fusion_passes.backends.triton import FORCE, PATH_ENV, path_for

    monkeypatch.delenv(PATH_ENV, raising=False)
    assert path_for(4, 8, 4096, 2) == "barrier"  # the shipped rule
    assert path_for(4, 8, 4096, 2, "twoshot") == "twoshot"  # the measured bucket's path
    assert path_for(4, 16384, 16384, 2, "lamport") == "barrier"  # its workspace would exceed the budget
    monkeypatch.setitem(FORCE, "path", "lamport")  # tune timing a candidate
    assert path_for(4, 8, 4096, 2, "twoshot") == "lamport"
    monkeypatch.setenv(PATH_ENV, "barrier")  # a benchmark's override wins
    assert path_for(4, 8, 4096, 2, "twoshot") == "barrier"


def test_a_world_size_1_call_reads_the_local_table_without_a_collective(machine):
    from fusion_passes.backends.triton import measured_entry

    measured.write(table(STRADDLE))
    assert measured_entry("add_rmsnorm", "c10d:never-resolved", 1, 300, 7168, BF16).tokens == 512
    assert measured_entry("add_rmsnorm", "c10d:never-resolved", 1, 300, 4096, BF16) is None
    assert measured_entry("add_rmsnorm", "c10d:never-resolved", 1, 0, 7168, BF16) is None


def _cuda_block_graph():
    """A static 6-token add + RMSNorm site on (fake) CUDA tensors: the selector judges it as
    on an NVIDIA GPU, without one."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    from graphs import all_reduce as ar_fn, hf_rms_norm

    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(6, 7168, dtype=torch.bfloat16, device="cuda")
        w = torch.empty(7168, dtype=torch.bfloat16, device="cuda")
        inputs = (x, torch.empty_like(x), w)
    with torch.no_grad():
        return make_fx(torch.func.functionalize(lambda x, r, w: hf_rms_norm(ar_fn(x) + r, w)))(*inputs)


@pytest.mark.parametrize("pick", ["fused", "unfused"])
def test_the_pass_reports_the_measured_table_once_the_group_agreed(fake_pg, machine, pick):
    from fusion_passes import FusionPass

    group = "c10d:" + fake_pg.group_name
    measured.write(table([entry(8, pick)], world_size=2))
    t = measured.local(2)
    before = FusionPass()
    before(_cuda_block_graph().graph)  # not agreed yet: the shipped table (world size 2: fused everywhere)
    assert before.report.sites[0].fused and before.report.sites[0].table == "shipped table"
    agree.settle(group, [t.digest, t.digest], t)  # what the first eager call's all_gather gives
    after = FusionPass()
    after(_cuda_block_graph().graph)
    site = after.report.sites[0]
    if pick == "fused":
        assert site.fused and site.backend == "triton" and site.table == f"measured table {machine}"
        assert site.to_dict()["table"] == f"measured table {machine}"
    else:
        assert not site.fused and "8-token bucket" in site.reason and f"measured table {machine}" in site.reason


def _token_dynamic_cuda_graph():
    """The same site with the token dimension symbolic (as vLLM compiles), on fake CUDA tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    from graphs import all_reduce as ar_fn, hf_rms_norm

    with FakeTensorMode():
        x = torch.empty(6, 7168, dtype=torch.bfloat16, device="cuda")
        w = torch.empty(7168, dtype=torch.bfloat16, device="cuda")
    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    tokens = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC, DimDynamic.STATIC])
    fx, fr = (mode.from_tensor(x, symbolic_context=tokens), mode.from_tensor(x, symbolic_context=tokens))
    fw = mode.from_tensor(w)
    with torch.no_grad(), mode:
        return make_fx(torch.func.functionalize(lambda x, r, w: hf_rms_norm(ar_fn(x) + r, w)))(fx, fr, fw)


@pytest.mark.parametrize("lo, hi, fused", [(200, 500, False), (1, 8192, True), (600, 16384, True)])
def test_vllm_compile_range_decides_a_token_dynamic_site(fake_pg, machine, lo, hi, fused):
    """Issue 23's compile ranges through the real vLLM pass: a range where every measured
    bucket lost stays unfused; one straddling a crossover is fused (each call picks at run time)."""
    from vllm.compilation.passes.inductor_pass import pass_context
    from vllm.config.utils import Range

    from fusion_passes.vllm import VllmFusionPass

    measured.write(table(STRADDLE, world_size=2))  # lost at 256 and 512 tokens only
    t = measured.local(2)
    agree.settle("c10d:" + fake_pg.group_name, [t.digest, t.digest], t)
    p = VllmFusionPass()
    with pass_context(Range(start=lo, end=hi)):
        p(_token_dynamic_cuda_graph().graph)
    site = p.report.sites[0]
    assert site.fused == fused and site.token_range == (lo, hi), site
    if fused:
        assert site.table == f"measured table {machine}"
    else:  # (the report then names where hoisting stopped, not the table: the matcher's Miss is replaced)
        assert not p.report.errors and site.table is None


def test_a_new_table_changes_the_pass_cache_key(machine):
    from fusion_passes import FusionPass

    before = FusionPass().uuid()
    measured.write(table(STRADDLE))
    assert FusionPass().uuid() != before


# -- calibration on first use: opt-in only -------------------------------------------------


@pytest.fixture
def tune_calls(monkeypatch):
    from fusion_passes.backends import calibrate

    calls = []

    def fake_tune(variant, hidden, dtype):  # what the child `fusion-passes tune` would write
        calls.append((variant, hidden, dtype))
        measured.write(table([entry(2**i, "fused", variant=variant, hidden=hidden, dtype=dtype) for i in range(15)]))

    monkeypatch.setattr(calibrate, "run_tune", fake_tune)
    monkeypatch.delenv(calibrate.ENV, raising=False)
    calibrate.reset()
    yield calls
    calibrate.reset()


def test_no_calibration_unless_asked(machine, tune_calls):
    from fusion_passes.backends import calibrate

    assert calibrate.table_for_site(None, 1, "add_rmsnorm", 7168, "cuda", BF16) is None
    assert tune_calls == [] and not machine.exists()


def test_calibration_when_asked_measures_the_missing_pair_once(machine, tune_calls, monkeypatch, caplog):
    from fusion_passes.backends import calibrate

    with caplog.at_level(logging.WARNING, logger="fusion_passes"), calibrate.enabled(calibrate.requested(True)):
        digest = calibrate.table_for_site(None, 1, "add_rmsnorm", 7168, "cuda", BF16)
        assert calibrate.table_for_site(None, 1, "add_rmsnorm", 7168, "cuda", BF16) == digest  # measured now: no rerun
        assert calibrate.table_for_site(None, 1, "add_rmsnorm", 4096, "cpu", BF16) == digest  # not a GPU site
        assert calibrate.table_for_site("c10d:0", 2, "add_rmsnorm", 7168, "cuda", BF16) is None  # never at N
    assert tune_calls == [("add_rmsnorm", 7168, "bfloat16")]
    assert measured.by_digest(digest).has("add_rmsnorm", 7168, dtype=BF16)
    assert any("calibrating add_rmsnorm at hidden 7168 in bfloat16" in r.getMessage() for r in caplog.records)
    # the same pair in float16 was never timed: calibrated on its own, and the bfloat16 entries are kept
    assert not measured.by_digest(digest).has("add_rmsnorm", 7168, dtype=torch.float16)
    with calibrate.enabled(calibrate.requested(True)):
        fp16 = calibrate.table_for_site(None, 1, "add_rmsnorm", 7168, "cuda", torch.float16)
    assert tune_calls[-1] == ("add_rmsnorm", 7168, "float16") and len(tune_calls) == 2
    both = measured.by_digest(fp16)
    assert both.has("add_rmsnorm", 7168, dtype=torch.float16) and both.has("add_rmsnorm", 7168, dtype=BF16)
    assert any("torchrun --nproc_per_node=2" in r.getMessage() for r in caplog.records)
    monkeypatch.setenv(calibrate.ENV, "1")
    assert calibrate.requested(False)


def test_a_failed_calibration_warns_and_leaves_the_shipped_table(machine, monkeypatch, caplog):
    from fusion_passes.backends import calibrate

    def broken(variant, hidden, dtype):
        raise RuntimeError("`tune --variants add_rmsnorm --hidden 7168` exited 2: no GPU")

    monkeypatch.setattr(calibrate, "run_tune", broken)
    calibrate.reset()
    with caplog.at_level(logging.WARNING, logger="fusion_passes"), calibrate.enabled(True):
        assert calibrate.table_for_site(None, 1, "add_rmsnorm", 7168, "cuda", BF16) is None
    calibrate.reset()
    assert any("failed" in r.getMessage() and "shipped table decides" in r.getMessage() for r in caplog.records)


def test_the_child_tune_runs_and_its_failure_is_named(machine):
    """The real child process (this machine has no GPU: `tune` exits 2 saying so)."""
    from fusion_passes.backends import calibrate

    with pytest.raises(RuntimeError, match="exited 2: fusion-passes tune: needs an NVIDIA CUDA GPU"):
        calibrate.run_tune("add_rmsnorm", 7168, "bfloat16")
    assert not machine.exists()


def test_each_call_takes_its_buckets_rows_and_stages(machine, fake_pg):
    """World size 1: the bucket's rows per program set the grid (ceil(tokens / rows)) and
    its num_stages the launch; no entry, or an entry without them: one row per program and
    Triton's default stages; ``tune``'s forced config overrides the table while it times."""
    from fusion_passes.backends.triton import FORCE, TritonBackend
    from fusion_passes.cli.model_trace import fake_world

    one = "c10d:" + fake_world(1).group_name
    measured.write(table(STRADDLE[:10] + [entry(1024, "fused", num_warps=16, rows=4, num_stages=1)] + STRADDLE[11:]))
    plan = TritonBackend()._plan
    p = plan(*_bound(one, 1000), False, "add_rmsnorm")
    assert (p.grid, p.rows, p.num_warps, p.launch()) == (250, 4, 16, {"num_warps": 16, "num_stages": 1})
    p = plan(*_bound(one, 1023), False, "add_rmsnorm")
    assert (p.grid, p.rows) == (256, 4)  # the last program takes 3 rows
    p = plan(*_bound(one, 2048), False, "add_rmsnorm")  # its bucket names neither
    assert (p.grid, p.rows, p.launch()) == (2048, 1, {"num_warps": 8})
    p = plan(*_bound(one, 1000, hidden=4096), False, "add_rmsnorm")  # no entry: the shipped rule
    assert (p.grid, p.rows, p.num_stages) == (1000, 1, None)
    FORCE.update(rows=2, num_stages=3)
    try:
        p = plan(*_bound(one, 1000), False, "add_rmsnorm")
        assert (p.grid, p.rows, p.num_stages) == (500, 2, 3)
    finally:
        FORCE.clear()


def _bound(group, tokens, hidden=7168):
    from fusion_passes import arguments, variants

    spec = variants.get("add_rmsnorm")
    x = torch.randn(tokens, hidden).bfloat16()
    bound = arguments.bind(spec, (x, torch.randn_like(x), torch.rand(hidden).bfloat16(), 1e-6, group), {})
    return arguments.fused_args(spec, bound, arguments.resolve(spec, bound)), x


def test_each_call_takes_its_buckets_launch(machine, fake_pg):
    """The triton backend's launch plan per call from the measured bucket (no kernel runs):
    warps at world size 1; at N, once agreed, the bucket's path or the unfused chain."""
    from fusion_passes.backends.triton import TritonBackend
    from fusion_passes.cli.model_trace import fake_world

    one = "c10d:" + fake_world(1).group_name
    measured.write(table(STRADDLE[:3] + [entry(8, "fused", num_warps=4)] + STRADDLE[4:]))
    plan = TritonBackend()._plan
    assert plan(*_bound(one, 6), False, "add_rmsnorm").num_warps == 4  # the 8-token bucket's warps
    assert plan(*_bound(one, 2), False, "add_rmsnorm").num_warps == 8
    assert plan(*_bound(one, 2, hidden=4096), False, "add_rmsnorm").num_warps == 8  # no entry: the shipped rule
    two = "c10d:" + fake_pg.group_name
    measured.write(table(STRADDLE, world_size=2))
    t = measured.local(2)
    agree.settle(two, [t.digest, t.digest], t)
    assert plan(*_bound(two, 300), False, "add_rmsnorm").path == "unfused"  # the group's collective + the epilogue
    assert plan(*_bound(two, 300), False, "add_rmsnorm").world == 1


def test_an_unfused_bucket_runs_the_fastest_collective_it_measured(machine, fake_pg):
    """The ``unfused`` pick at world size N runs the collective its bucket measured fastest
    (``best_unfused``); a bucket that names none (or NCCL) runs the group's own."""
    from fusion_passes.backends.triton import TritonBackend

    two = "c10d:" + fake_pg.group_name
    entries = [dict(e) for e in STRADDLE]
    entries[8]["best_unfused"] = "symm_two_shot+static"  # 256 tokens
    entries[9]["best_unfused"] = "nccl+tokdyn"  # 512 tokens
    measured.write(table(entries, world_size=2))
    t = measured.local(2)
    agree.settle(two, [t.digest, t.digest], t)
    plan = TritonBackend()._plan
    assert plan(*_bound(two, 200), False, "add_rmsnorm").collective == "symm_two_shot"
    assert plan(*_bound(two, 300), False, "add_rmsnorm").collective == "nccl"
    entries[9].pop("best_unfused")
    measured.write(table(entries, world_size=2))
    t = measured.local(2)
    agree.settle(two, [t.digest, t.digest], t)
    assert plan(*_bound(two, 300), False, "add_rmsnorm").collective is None  # the group's own


def test_a_bucket_measured_faster_with_evict_first_launches_with_it(machine, fake_pg):
    from fusion_passes.backends.triton import FORCE, TritonBackend
    from fusion_passes.cli.model_trace import fake_world

    one = "c10d:" + fake_world(1).group_name
    measured.write(table([entry(8, "fused", num_warps=4, evict=True), entry(64, "fused", num_warps=4)]))
    plan = TritonBackend()._plan
    assert plan(*_bound(one, 6), False, "add_rmsnorm").evict is True
    assert plan(*_bound(one, 40), False, "add_rmsnorm").evict is False
    FORCE["evict"] = False  # tune times the config without it
    try:
        assert plan(*_bound(one, 6), False, "add_rmsnorm").evict is False
    finally:
        FORCE.clear()


def test_a_bucket_measured_faster_in_pieces_runs_the_looped_kernel_where_it_computes_the_call(machine, fake_pg):
    from fusion_passes.backends import triton_kernels as k
    from fusion_passes.backends.triton import FORCE, TritonBackend, world1_form
    from fusion_passes.cli.model_trace import fake_world

    one = "c10d:" + fake_world(1).group_name
    pieces = [entry(8, "fused", num_warps=4, chunk=2048), entry(64, "fused", num_warps=4)]
    measured.write(table(pieces + [dict(e, variant="add_rmsnorm_fp8_per_token") for e in pieces]))
    plan = TritonBackend()._plan
    p = plan(*_bound(one, 6), False, "add_rmsnorm")
    assert (p.chunk, p.grid) == (2048, 6) and plan(*_bound(one, 40), False, "add_rmsnorm").chunk == 0
    # the plan is what runs: a dynamic scale or the norm of the unrounded fp32 sum runs one pass
    assert plan(*_bound(one, 6), False, "add_rmsnorm_fp8_per_token").chunk == 0
    a, x = _bound(one, 6)
    fp32_sum = dataclasses.replace(a, flags=dataclasses.replace(a.flags, residual_in_fp32=True))
    assert plan(fp32_sum, x, False, "add_rmsnorm").chunk == 0
    assert world1_form(2048, 1, 7168, k.QUANT_NONE, 0) == (2048, 1)
    assert world1_form(2048, 1, 7168, k.QUANT_FP8_STATIC, 2) == (2048, 1)
    assert world1_form(2048, 1, 7168, k.QUANT_FP8_PER_TOKEN, 0) == (0, 1)  # a dynamic scale: the one-pass kernel
    assert world1_form(2048, 1, 7168, k.QUANT_NONE, 1) == (0, 1)  # the norm of the unrounded fp32 sum: one pass
    assert world1_form(2048, 1, 2048, k.QUANT_NONE, 0) == (0, 1)  # one piece would be the whole row
    FORCE["chunk"] = 0  # tune times the one-pass kernel whatever the table says
    try:
        assert plan(*_bound(one, 6), False, "add_rmsnorm").chunk == 0
    finally:
        FORCE.clear()


def test_a_bucket_measured_faster_as_a_tile_runs_the_tile_kernel_where_it_computes_the_call(machine, fake_pg):
    from fusion_passes.backends import triton_kernels as k
    from fusion_passes.backends.triton import FORCE, TritonBackend, world1_form
    from fusion_passes.cli.model_trace import fake_world

    one = "c10d:" + fake_world(1).group_name
    tiles = [entry(8, "fused", num_warps=16, tile=2, evict=True), entry(64, "fused", num_warps=4)]
    measured.write(table(tiles + [dict(e, variant="add_rmsnorm_fp8_per_token") for e in tiles]))
    plan = TritonBackend()._plan
    p = plan(*_bound(one, 7), False, "add_rmsnorm")
    assert (p.tile, p.grid, p.evict, p.num_warps) == (2, 4, True, 16)  # 7 rows: 4 programs of 2 at once
    assert plan(*_bound(one, 40), False, "add_rmsnorm").tile == 1
    q = plan(*_bound(one, 7), False, "add_rmsnorm_fp8_per_token")  # a dynamic scale: one row per program
    assert (q.tile, q.grid) == (1, 7)
    assert world1_form(0, 2, 7168, k.QUANT_NONE, 0) == (0, 2) and world1_form(0, 2, 7168, k.QUANT_FP8_STATIC, 1) == (0, 2)
    assert world1_form(0, 2, 7168, k.QUANT_FP8_PER_TOKEN, 0) == (0, 1) and world1_form(0, 2, 7168, k.QUANT_NVFP4, 0) == (0, 1)
    FORCE["tile"] = 1  # tune times one row per program whatever the table says
    try:
        assert plan(*_bound(one, 7), False, "add_rmsnorm").tile == 1
    finally:
        FORCE.clear()


def test_bench_kernels_says_what_the_measured_table_picks(machine):
    """`bench kernels`' selector line reads this machine's table, as a compiled site does
    (it had printed the shipped table's verdict beside timings taken at the tuned configs)."""
    from fusion_passes.cli import bench_kernels

    assert bench_kernels._selector("add_rmsnorm", 7168, 256, 1) == ("triton", None)  # shipped: fused at 256
    measured.write(table(STRADDLE))
    pick, why = bench_kernels._selector("add_rmsnorm", 7168, 256, 1)
    assert pick == "reference" and "measured" in why, why
    assert bench_kernels._selector("add_rmsnorm", 7168, 128, 1) == ("triton", None)


# -- the shipped per-GPU tables (fusion_passes/backends/tables) ----------------------------------

H100 = "NVIDIA H100 80GB HBM3"


@pytest.fixture
def h100(machine, monkeypatch):
    """The fake machine as an H100 (the GPU kind of the shipped table), other versions than
    the shipped table's: its versions are where it was measured, not a condition."""
    monkeypatch.setattr(measured, "_gpu", lambda: H100)
    measured.reset()
    return machine


def test_every_shipped_table_parses_and_names_its_runs():
    files = sorted(measured.SHIPPED_DIR.glob("*.json"))
    assert [f.name for f in files] == ["nvidia_h100_80gb_hbm3_ws1.json"]
    for f in files:
        (raw,) = measured.read_file(f)
        table = measured.parse_table(raw, f.name)
        assert table.key["gpu"] == H100 and table.key["world_size"] == 1
        assert raw["command"].startswith("python -m tools.merge_tuned results/") and len(raw["sources"]) == 2
        assert raw["context"] == "after-write"  # tune's default since session 13
        assert all(s["command"].startswith("fusion-passes tune") for s in raw["sources"])
        assert set(table.buckets) == {("add_rmsnorm", h, "bfloat16") for h in (4096, 7168, 8192)}


def test_an_h100_without_a_file_is_decided_by_the_shipped_h100_table(h100):
    table = measured.local(1)
    assert table is not None and table.shipped and table.key["gpu"] == H100
    want = f"shipped table for {H100} (fusion_passes/backends/tables/nvidia_h100_80gb_hbm3_ws1.json)"
    assert table.label("add_rmsnorm", 7168, dtype=BF16) == want
    digest = agree.table_id(None, 1)
    assert digest == table.digest
    # 7168 x 1024: the generic (H200) table declines it, both H100 runs picked the fused call (2 rows at once)
    call = cuda_call(1024, table_=digest)
    assert triton_backend.unsupported(call) is None and backends.table_source("triton", call) == want
    assert "1024 tokens outside" in str(triton_backend.unsupported(cuda_call(1024)))  # the generic table
    # 4096 x 512: one H100 run lost (0.986x), the other won (1.011x): not fused in every run, so declined,
    # naming the shipped table
    why = triton_backend.unsupported(cuda_call(512, hidden=4096, table_=digest))
    assert isinstance(why, Slower) and "512-token bucket" in why and want in why
    assert measured.local(2) is None  # world size 2: no shipped table
    assert not table.measured_here("add_rmsnorm", 7168, dtype=BF16)


def test_this_machines_file_takes_precedence_per_pair(h100):
    measured.write({"key": measured.machine_key(1), "command": "fusion-passes tune --hidden 7168",
                    "entries": [entry(1, "unfused", hidden=7168)]})
    table = measured.local(1)
    assert not table.shipped and table.lookup("add_rmsnorm", 7168, 512, dtype=BF16).pick == "unfused"  # this machine's
    assert table.label("add_rmsnorm", 7168, dtype=BF16) == f"measured table {h100}"
    assert table.label("add_rmsnorm", 4096, dtype=BF16).startswith(f"shipped table for {H100}")
    assert table.lookup("add_rmsnorm", 4096, 512, dtype=BF16).pick == "unfused"
    assert table.lookup("add_rmsnorm", 4096, 2048, dtype=BF16).tile == 2
    assert table.measured_here("add_rmsnorm", 7168, dtype=BF16)
    assert not table.measured_here("add_rmsnorm", 4096, dtype=BF16)
    assert agree.table_id(None, 1) == table.digest and measured.by_digest(table.digest) is table


def test_off_turns_off_this_machines_file_only(h100, monkeypatch):
    monkeypatch.setenv(measured.ENV, "off")
    measured.reset()
    assert measured.local(1).shipped


def test_calibration_measures_a_pair_the_shipped_table_holds(h100, monkeypatch):
    """The user asked to measure this machine: a shipped table is not that."""
    from fusion_passes.backends import calibrate

    asked = []
    monkeypatch.setattr(calibrate, "_calibrate", lambda *a: asked.append(a))
    with calibrate.enabled(True):
        calibrate.table_for_site(None, 1, "add_rmsnorm", 7168, "cuda", BF16)
    assert asked == [(1, "add_rmsnorm", 7168, "bfloat16")]


def test_merging_runs_ships_a_fused_pick_only_where_every_run_made_it(tmp_path):
    from tools import merge_tuned

    def run(picks):
        return table([entry(t, p, fused_us=f, unfused_us=u, num_warps=w) for t, p, f, u, w in picks])

    a = run([(1, "fused", 2.0, 3.0, 8), (256, "fused", 4.0, 4.1, 8), (512, "unfused", 5.0, 4.9, 16)])
    b = run([(1, "fused", 1.9, 3.1, 16), (256, "unfused", 4.2, 4.0, 4), (512, "fused", 4.8, 5.0, 8)])
    merged = merge_tuned.merge([("a.json", a), ("b.json", b)])
    got = {e["tokens"]: (e["pick"], e["num_warps"], e["fused_us"], e["unfused_us"]) for e in merged["entries"]}
    assert got == {1: ("fused", 16, 1.9, 3.1), 256: ("unfused", 4, 4.2, 4.0), 512: ("unfused", 16, 5.0, 4.9)}
    assert merged["command"] == "python -m tools.merge_tuned a.json b.json" and len(merged["sources"]) == 2
    measured.parse_table(merged, "merged")  # a table the library reads
    with pytest.raises(ValueError, match="different machines"):
        merge_tuned.merge([("a.json", a), ("c.json", table(a["entries"], world_size=2))])
    with pytest.raises(ValueError, match="different"):
        merge_tuned.merge([("a.json", a), ("d.json", run([(1, "fused", 2.0, 3.0, 8)]))])
    c = {**b, "context": "after-write"}  # tune --context: runs timed otherwise are not merged
    with pytest.raises(ValueError, match="different contexts"):
        merge_tuned.merge([("a.json", a), ("c.json", c)])
    assert merge_tuned.merge([("c.json", c), ("c2.json", c)])["context"] == "after-write"
    # the shipped H100 file is what the tool makes of the two runs it names
    shipped = measured.SHIPPED_DIR / "nvidia_h100_80gb_hbm3_ws1.json"
    (raw,) = measured.read_file(shipped)
    runs = [(s["file"], measured.read_file(pathlib.Path(__file__).parents[1] / s["file"])[0]) for s in raw["sources"]]
    assert merge_tuned.merge(runs) == raw
