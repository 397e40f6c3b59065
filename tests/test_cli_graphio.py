"""graphio: the JSON form of FX graphs round-trips, and hostile files are refused as data."""

from __future__ import annotations

import json
import pickle
import re

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from fusion_passes import FusionPass, graphio
from test_cli_models import check_golden, example_args, normalise, relu_block, two_sites


def _trace(fn):
    with torch.no_grad():
        return make_fx(fn, tracing_mode="fake")(*example_args())


def test_roundtrip_same_graph_and_same_report(fake_pg, tmp_path):
    gm = _trace(relu_block)
    doc = graphio.graph_to_dict(gm.graph, stage="before", model="m:f")
    path = tmp_path / "g.json"
    path.write_text(graphio.dumps(doc))
    rebuilt = graphio.to_fx(graphio.load(str(path)))
    # every node, target, argument and tensor metadata comes back exactly
    assert graphio.graph_to_dict(rebuilt, stage="before", model="m:f") == doc
    rebuilt.lint()
    # and our pass decides the same on the rebuilt graph as on the traced one
    p1, p2 = FusionPass(), FusionPass()
    p1(gm.graph)
    p2(rebuilt)
    assert p2.report.to_dict() == p1.report.to_dict()
    assert [s.fused for s in p1.report.sites] == [True, False]


def test_dump_json_golden(fake_pg):
    doc = graphio.graph_to_dict(_trace(two_sites).graph, stage="before", model="test_cli_models:two_sites")
    check_golden("two_sites.before.json", normalise(graphio.dumps(doc)))


def _doc(nodes, **top):
    base = {"format": graphio.FORMAT, "version": graphio.VERSION, "model": None, "graph": "graph_0",
            "stage": "before", "torch": "2", "nodes": nodes}
    base.update(top)
    return base


OUT = {"name": "output", "op": "output", "target": "output", "args": [{"tuple": []}], "kwargs": {}, "meta": {}}
X = {"name": "x", "op": "placeholder", "target": "x", "args": [], "kwargs": {}, "meta": {}}

BAD = [
    (b"\x80\x04\x95", "not JSON"),
    (b"def f(): pass\n", "not JSON"),
    (b'{"nodes": []}', "not a fusion-passes graph dump"),
    (json.dumps(_doc([OUT], version=99)).encode(), "format version 99"),
    (json.dumps(_doc([OUT], stage="weird")).encode(), "stage 'weird'"),
    (json.dumps(_doc([X, X, OUT])).encode(), "node x: defined twice"),
    (json.dumps(_doc([{**X, "name": "x; import os"}, OUT])).encode(), "bad node name"),
    (json.dumps(_doc([{**X, "op": "exec"}, OUT])).encode(), "unknown op 'exec'"),
    (json.dumps(_doc([{**OUT, "args": [{"node": "later"}]}])).encode(), "not defined before it"),
    (json.dumps(_doc([{**X, "meta": {"val": {"shape": [2], "dtype": "os"}}}, OUT])).encode(), "unknown dtype 'os'"),
    (json.dumps(_doc([{**X, "args": [{"__reduce__": "os.system"}]}, OUT])).encode(), "unknown value object"),
    (json.dumps(_doc([X])).encode(), "exactly one output node"),
    (b'{"format": "fusion-passes-graph", "version": NaN}', "not JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "not JSON"),
]


@pytest.mark.parametrize("content,message", BAD, ids=[m for _, m in BAD])
def test_malformed_or_hostile_file_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(graphio.DumpError, match=re.escape(message)):
        graphio.load(str(path))


def test_a_pickle_is_never_unpickled(tmp_path):
    marker = tmp_path / "PWNED"

    class Boom:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "graph.json"
    path.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(graphio.DumpError, match="not JSON"):
        graphio.load(str(path))
    assert not marker.exists()


def test_unknown_targets_become_inert_names(tmp_path):
    nodes = [X,
             {"name": "a", "op": "call_function", "target": "os.system", "args": [{"node": "x"}], "kwargs": {},
              "meta": {}},
             {"name": "b", "op": "call_function", "target": "torch.ops.__class__.__init__.x", "args": [],
              "kwargs": {}, "meta": {}},
             {"name": "c", "op": "call_function", "target": "torch.ops.not_loaded_ns_xyz.op.default",
              "args": [{"node": "a"}], "kwargs": {}, "meta": {}},
             {**OUT, "args": [{"tuple": [{"node": "b"}, {"node": "c"}]}]}]
    path = tmp_path / "g.json"
    path.write_text(json.dumps(_doc(nodes)))
    graph = graphio.to_fx(graphio.load(str(path)))
    targets = {n.name: n.target for n in graph.nodes}
    for name in ("a", "b", "c"):
        assert isinstance(targets[name], graphio.Opaque), name
        with pytest.raises(RuntimeError, match="cannot run"):
            targets[name]()
    assert targets["c"].__name__ == "not_loaded_ns_xyz.op.default"  # what recognizers compare
    # real ops and Python operators are found by name
    assert graphio.resolve_target("torch.ops.aten.add.Tensor") is torch.ops.aten.add.Tensor
    import operator

    assert graphio.resolve_target("operator.getitem") is operator.getitem


def test_write_api_infers_the_stage(fake_pg, tmp_path):
    gm = _trace(relu_block)
    graphio.write(gm, tmp_path / "a.json", model="m:f")
    FusionPass()(gm.graph)
    graphio.write(gm, tmp_path / "b.json", model="m:f")
    a, b = graphio.load(str(tmp_path / "a.json")), graphio.load(str(tmp_path / "b.json"))
    assert (a.stage, b.stage) == ("before", "fused")
    assert sum(n.target.startswith("torch.ops.fusion_passes.") for n in b.nodes) == 1
