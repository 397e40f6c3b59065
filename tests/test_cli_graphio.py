"""graphio: the JSON form of FX graphs round-trips, and hostile files are refused as data."""

from __future__ import annotations

import json
import pickle
import re

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from fusion_passes import FusionPass
from fusion_passes.cli import graphio
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


def _nested(depth: int):
    value = 1
    for _ in range(depth):
        value = [value]
    return value


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
    (b"[" * 100_000 + b"]" * 100_000, "JSON nested deeper than the parser's recursion limit"),
    (json.dumps(_doc([{**X, "args": [_nested(34)]}, OUT])).encode(), "values nested deeper than 32"),
    # absurd shapes: validated on load (the pass used to fail inside, and explain misreported)
    (json.dumps(_doc([{**X, "meta": {"val": {"shape": [10**12, 10**12], "dtype": "float32"}}}, OUT])).encode(),
     "is larger than any device holds"),
    # a symbolic size counts as the stand-in the pass sees (2**14): it cannot hide the other sizes
    (json.dumps(_doc([{**X, "meta": {"val": {"shape": [2**40, {"sym": "s0"}, 64], "dtype": "float32"}}}, OUT])
     ).encode(), "is larger than any device holds (limit 2**48 elements, a symbolic size counted as 2**14)"),
    (json.dumps(_doc([{**X, "meta": {"val": {"shape": [8, -1], "dtype": "float32"}}}, OUT])).encode(),
     "has a negative entry"),
    (json.dumps(_doc([{**X, "meta": {"val": {"shape": [8, 4], "stride": [4], "dtype": "float32"}}}, OUT])).encode(),
     "tensor stride has 1 entries for a shape of 2"),
    (json.dumps(_doc([{**X, "meta": {"val": {"shape": [True], "dtype": "float32"}}}, OUT])).encode(),
     "tensor shape must be a list of ints"),
    # tagged values that do not parse: a one-line error, never a traceback
    (json.dumps(_doc([{**X, "args": [{"device": "evilmod:0"}]}, OUT])).encode(), "unknown device 'evilmod:0'"),
    (json.dumps(_doc([{**X, "meta": {"val": {"shape": [2], "dtype": "float32", "device": "evilmod"}}}, OUT])).encode(),
     "unknown device 'evilmod'"),
    (json.dumps(_doc([{**X, "args": [{"device": 7}]}, OUT])).encode(), "device must be a short string"),
    (json.dumps(_doc([{**X, "args": [{"dtype": "__class__"}]}, OUT])).encode(), "unknown dtype '__class__'"),
    (json.dumps(_doc([{**X, "args": [{"float": "1e999"}]}, OUT])).encode(), "bad float '1e999'"),
]


@pytest.mark.parametrize("content,message", BAD, ids=[m for _, m in BAD])
def test_malformed_or_hostile_file_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(graphio.DumpError, match=re.escape(message)):
        graphio.load(str(path))


def test_real_symbolic_shapes_load(tmp_path):
    """A token count symbolic next to a vocabulary-sized dimension (Llama 3's 128,256) and a
    second symbol: well under the bound."""
    val = {"shape": [{"sym": "s0"}, {"sym": "s1"}, 128_256], "dtype": "bfloat16"}
    path = tmp_path / "g.json"
    path.write_text(json.dumps(_doc([{**X, "meta": {"val": val}}, OUT])))
    assert graphio.load(str(path)).nodes[0].val == val


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


# --------------------------------------------------------------------- size and depth bombs
# Each is refused within 5 s and 500 MB (issue 14's target), before a graph is built, with
# a message that says why. Time is measured under tracemalloc, which slows Python code
# down: the real cost is lower.

BUDGET_SECONDS, BUDGET_BYTES = 5.0, 500 * 2**20


def _refused(path) -> tuple[float, int, str]:
    """Seconds and peak Python memory of loading *path*, which must raise; the message."""
    import time
    import tracemalloc

    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(graphio.DumpError) as e:
            graphio.load(str(path))
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return seconds, peak, str(e.value)


def _node_line(i: int) -> str:
    """A node as big as a vLLM node with its stack trace (about 1.6 KB)."""
    trace = 'File "/models/llama.py", line 412, in forward\n    hidden = self.mlp(hidden)\n' * 16
    return json.dumps({"name": f"n{i}", "op": "placeholder", "target": f"n{i}", "args": [], "kwargs": {},
                       "meta": {"val": {"shape": [8, 64], "stride": [64, 1], "dtype": "float32", "device": "cpu"},
                                "stack_trace": trace}})


def _write_dump(path, node_lines) -> None:
    head = json.dumps(_doc([]))[:-len("]}")]
    with open(path, "w") as f:
        f.write(head)
        for i, line in enumerate(node_lines):
            f.write(("," if i else "") + line + "\n")
        f.write(", " + json.dumps(OUT) + "]}")


def test_a_200_mb_valid_dump_is_refused_by_its_size(tmp_path):
    path = tmp_path / "big.json"
    line = _node_line(0)
    _write_dump(path, (line.replace('"n0"', f'"n{i}"') for i in range(200 * 2**20 // len(line))))
    assert path.stat().st_size > 200 * 2**20
    seconds, peak, message = _refused(path)
    assert seconds < BUDGET_SECONDS and peak < BUDGET_BYTES, (seconds, peak)
    assert f"a dump is read up to {graphio.MAX_BYTES >> 20} MiB" in message and "bounds the time and memory" in message


def test_too_many_values_are_refused_before_parsing(tmp_path):
    # 60 MB (under the size limit) of zeros: 31 million values in one node's arguments
    path = tmp_path / "values.json"
    _write_dump(path, ['{"name": "x", "op": "placeholder", "target": "x", "args": [' + "0," * 31_000_000 + "0]}"])
    seconds, peak, message = _refused(path)
    assert seconds < BUDGET_SECONDS and peak < BUDGET_BYTES, (seconds, peak)
    assert f"a dump is read up to {graphio.MAX_VALUES} (" in message


def test_too_many_nodes_are_refused_before_validating_them(tmp_path):
    path = tmp_path / "nodes.json"
    _write_dump(path, (json.dumps({"name": f"n{i}", "op": "placeholder", "target": f"n{i}"})
                       for i in range(graphio.MAX_NODES)))  # and the output node
    seconds, peak, message = _refused(path)
    assert seconds < BUDGET_SECONDS and peak < BUDGET_BYTES, (seconds, peak)
    assert f"{graphio.MAX_NODES + 1} nodes; a dump is read up to {graphio.MAX_NODES} nodes" in message


def test_a_depth_bomb_is_refused(tmp_path):
    path = tmp_path / "deep.json"
    _write_dump(path, ['{"name": "x", "op": "placeholder", "target": "x", "args": ' + "[" * 10**6 + "]" * 10**6 + "}"])
    seconds, peak, message = _refused(path)
    assert seconds < BUDGET_SECONDS and peak < BUDGET_BYTES, (seconds, peak)
    assert "nested deeper than the parser's recursion limit" in message


def test_a_dump_at_the_node_limit_still_loads(tmp_path):
    """The limits refuse bombs, not big graphs: MAX_NODES real-sized nodes fit MAX_BYTES
    and MAX_VALUES."""
    path = tmp_path / "limit.json"
    line = _node_line(0)
    _write_dump(path, (line.replace('"n0"', f'"n{i}"') for i in range(graphio.MAX_NODES - 1)))
    assert len(graphio.load(str(path)).nodes) == graphio.MAX_NODES
