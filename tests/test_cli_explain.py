"""``fusion-passes explain``: every all-reduce, fused or not, and the node that blocked it."""

from __future__ import annotations

import json
import pathlib

import pytest

from fusion_passes.cli import graphio
from fusion_passes import cli
from test_cli_models import MODEL, check_golden, relu_block, write_dumps

PUBLIC = {"all_reduce", "fused", "variant", "backend", "hoisted_over", "reason"}  # FusionReport.to_dict()


@pytest.fixture
def relu_dumps(fake_pg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return write_dumps(relu_block, MODEL, pathlib.Path("relu"))


def _run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_relu_blocks_and_is_named(relu_dumps, capsys):
    rc, text, _ = _run(capsys, "explain", "relu/graph_0.before.json")
    assert rc == 0
    check_golden("explain_relu_block.txt", text)
    rc, js, _ = _run(capsys, "explain", "--json", "relu/graph_0.before.json")
    check_golden("explain_relu_block.json", js)
    d = json.loads(js)
    assert set(d) == {"sites", "errors"} and d["errors"] == []
    first, second = d["sites"]
    assert PUBLIC <= set(first) and first["fused"] and first["variant"] == "allreduce_add_rmsnorm"
    assert (second["all_reduce"], second["fused"], second["blocker"], second["blocker_op"]) == \
        ("all_reduce_1", False, "relu", "aten.relu.default")
    assert "relu" in second["reason"]


def test_without_hoisting_the_blocker_is_the_consumer_not_the_all_reduce(relu_dumps, capsys):
    rc, js, _ = _run(capsys, "explain", "--json", "--no-hoist", "relu/graph_0.before.json")
    second = json.loads(js)["sites"][1]
    # the pass names the all-reduce's own value; explain walks to the op that consumed it
    assert (second["blocker"], second["blocker_op"]) == ("relu", "aten.relu.default")
    assert second["reason"] == "all-reduce output feeds relu (aten.relu.default), not a residual add or RMSNorm"


def test_already_fused_sites_are_listed(relu_dumps, capsys):
    rc, js, _ = _run(capsys, "explain", "--json", "relu/graph_0.fused.json")
    sites = json.loads(js)["sites"]
    assert [(s["all_reduce"], s["fused"]) for s in sites] == [("allreduce_add_rmsnorm_default", True),
                                                            ("all_reduce_1", False)]
    assert sites[0]["reason"] == "already fused in this dump" and sites[1]["blocker"] == "relu"


def _vllm_deepseek_dump(path: pathlib.Path) -> None:
    """The vLLM DeepSeek-V3 fp16 shape (tests/test_hoist_vllm.py traces it): ``all_reduce -> mul(0.4) ->
    fused_add_rms_norm``, written as a dump from a machine with vLLM. vLLM is not imported
    here: its ops stay names (graphio.Opaque), which is all the recognizers compare."""
    t = {"shape": [{"sym": "s72"}, 128], "stride": [128, 1], "dtype": "float16", "device": "cuda:0"}
    w = {"shape": [128], "stride": [1], "dtype": "float16", "device": "cuda:0"}
    trace = ('File "/models/deepseek_v2.py", line 1093, in forward\n'
             '    hidden_states = self.mlp(hidden_states) * (1.0 / self.routed_scaling_factor)\n')

    def node(name, op, target, args, val, **meta):
        return {"name": name, "op": op, "target": target, "args": args, "kwargs": {}, "meta": {"val": val, **meta}}

    nodes = [
        node("x", "placeholder", "x", [], t), node("res", "placeholder", "res", [], t),
        node("w", "placeholder", "w", [], w),
        node("all_reduce", "call_function", "torch.ops.vllm.all_reduce.default", [{"node": "x"}, "tp:0"], t),
        node("mul", "call_function", "torch.ops.aten.mul.Tensor", [{"node": "all_reduce"}, 0.4], t,
             stack_trace=trace, source=graphio.source_of(trace)[0], code=graphio.source_of(trace)[1]),
        node("fused_add_rms_norm", "call_function", "torch.ops.vllm_ir.fused_add_rms_norm.default",
             [{"node": "mul"}, {"node": "res"}, {"node": "w"}, 1e-6], {"tuple": [t, t]}),
        node("getitem", "call_function", "operator.getitem", [{"node": "fused_add_rms_norm"}, 0], t),
        node("getitem_1", "call_function", "operator.getitem", [{"node": "fused_add_rms_norm"}, 1], t),
        node("output", "output", "output", [{"tuple": [{"node": "getitem"}, {"node": "getitem_1"}]}], None),
    ]
    doc = {"format": graphio.FORMAT, "version": graphio.VERSION, "model": "deepseek-v3-fp16", "graph": "graph_0",
           "stage": "before", "torch": "2.14.0", "nodes": nodes}
    path.write_text(json.dumps(doc))


def test_vllm_mul_blocks_without_hoisting_and_is_named_with_its_source(fake_pg, tmp_path, capsys):
    path = tmp_path / "ds.json"
    _vllm_deepseek_dump(path)
    rc, js, _ = _run(capsys, "explain", "--json", "--no-hoist", str(path))
    (site,) = json.loads(js)["sites"]
    assert rc == 0 and not site["fused"]
    assert (site["blocker"], site["blocker_op"]) == ("mul", "aten.mul.Tensor")
    assert site["source"] == 'File "/models/deepseek_v2.py", line 1093, in forward'
    assert site["code"].startswith("hidden_states = self.mlp(hidden_states) * (1.0 /")
    rc, text, _ = _run(capsys, "explain", "--no-hoist", str(path))
    assert "all_reduce: NOT fused, blocked by mul (aten.mul.Tensor)" in text
    assert "source: File \"/models/deepseek_v2.py\", line 1093" in text


def test_vllm_mul_is_hoisted_over_then_fuses(fake_pg, tmp_path, capsys):
    path = tmp_path / "ds.json"
    _vllm_deepseek_dump(path)
    rc, js, _ = _run(capsys, "explain", "--json", str(path))
    (site,) = json.loads(js)["sites"]
    assert site["fused"] and site["blocker"] is None, site
    assert any("mul" in h for h in site["hoisted_over"]), site


def test_spec_that_does_not_exist(capsys):
    rc, out, err = _run(capsys, "explain", "no_such_module_xyz:make")
    assert rc == 2 and "fusion-passes explain: error: spec 'no_such_module_xyz:make': no module named" in err
    rc, out, err = _run(capsys, "explain", "neither-a-file-nor-spec")
    assert rc == 2 and "is neither a file nor a module:function spec" in err


def test_an_internal_pass_error_is_reported_as_one(relu_dumps, capsys, monkeypatch):
    """The pass fails inside (injected: hoisting raises) and leaves the graph as it was:
    explain counts every all-reduce of the graph, lists each as not fused, prints the
    error, and exits 1, in text and in JSON."""
    from fusion_passes import hoist

    def broken(*args, **kwargs):
        raise RuntimeError("injected hoisting failure")

    monkeypatch.setattr(hoist, "run", broken)
    error = "fusion_passes: internal error, graph left unchanged: RuntimeError: injected hoisting failure"
    rc, text, _ = _run(capsys, "explain", "relu/graph_0.before.json")
    assert rc == 1
    lines = text.splitlines()
    assert lines[:2] == ["graph_0: 2 all-reduces", f"  internal error (graph left unchanged): {error}"]
    assert [ln for ln in lines if "NOT fused" in ln] == ["  all_reduce: NOT fused, blocked", "  all_reduce_1: NOT fused, blocked"]
    assert lines.count("      reason: pass failed: graph unchanged") == 2
    assert lines[-1] == "0/2 all-reduces fused; the pass FAILED on 1 graph(s)"
    rc, js, _ = _run(capsys, "explain", "--json", "relu/graph_0.before.json")
    d = json.loads(js)
    assert rc == 1 and d["errors"] == [error]
    assert [(s["all_reduce"], s["fused"], s["reason"]) for s in d["sites"]] == \
        [("all_reduce", False, "pass failed: graph unchanged"), ("all_reduce_1", False, "pass failed: graph unchanged")]


def test_a_bad_dump_is_one_line_with_exit_2(tmp_path, capsys):
    path = tmp_path / "evil.json"
    doc = {"format": graphio.FORMAT, "version": graphio.VERSION, "model": None, "graph": "graph_0", "stage": "before",
           "torch": "2", "nodes": [{"name": "x", "op": "placeholder", "target": "x", "args": [{"device": "evilmod:0"}]},
                                   {"name": "output", "op": "output", "target": "output", "args": []}]}
    path.write_text(json.dumps(doc))
    rc, out, err = _run(capsys, "explain", str(path))
    assert (rc, out) == (2, "") and err.count("\n") == 1
    assert err == f"fusion-passes explain: error: {path}: node x: unknown device 'evilmod:0'\n"
