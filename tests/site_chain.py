"""Dumps of a residual stream of N fused sites, written directly (no tracing), for
``diff``'s cost at the loader's node cap:

    python tests/site_chain.py 4400 out/   # out/before.json, out/fused.json

Each site of ``before`` is what make_fx writes for ``res = all_reduce(h) + res;
h = res * rsqrt(mean(res**2) + eps) * w`` in fp32 (9 nodes: all_reduce, wait_tensor,
add, pow, mean, add, rsqrt, mul, mul), the next site reading ``h``; ``fused`` is what
FusionPass makes of it (the fused op and its getitems). 4,400 sites is 39,604 nodes,
the most under :data:`fusion_passes.cli.graphio.format.MAX_NODES`.
``tests/test_cli_diff.py`` checks the generator against the traced and fused graph.
"""

from __future__ import annotations

import json
import pathlib
import sys

ROW = {"device": "cpu", "dtype": "float32", "shape": [8, 64], "stride": [64, 1]}
COL = {"device": "cpu", "dtype": "float32", "shape": [8, 1], "stride": [1, 1]}
AT = "torch.ops.aten."
C10D = "torch.ops._c10d_functional."
FUSED = "torch.ops.fusion_passes.allreduce_add_rmsnorm.default"


def _name(base: str, i: int) -> str:
    return base if i == 0 else f"{base}_{i}"


def _node(name: str, target: str, args: list, val) -> dict:
    op = "call_function" if "." in target else ("output" if name == "output" else "placeholder")
    return {"args": args, "kwargs": {}, "meta": {"val": val}, "name": name, "op": op, "target": target}


def _ref(name: str) -> dict:
    return {"node": name}


def _inputs() -> list[dict]:
    w = {"device": "cpu", "dtype": "float32", "shape": [64], "stride": [1]}
    return [_node("x_1", "x_1", [], ROW), _node("res_1", "res_1", [], ROW), _node("w_1", "w_1", [], w)]


def _doc(stage: str, nodes: list[dict]) -> dict:
    return {"format": "fusion-passes-graph", "graph": "graph_0", "model": "chain", "stage": stage,
            "torch": "2.14.0", "version": 1, "nodes": nodes}


def before(n: int) -> dict:
    """The unfused graph of *n* sites."""
    nodes, h, res = _inputs(), "x_1", "res_1"
    for i in range(n):
        add, eps, mul, out = _name("add", 2 * i), _name("add", 2 * i + 1), _name("mul", 2 * i), _name("mul", 2 * i + 1)
        nodes += [_node(_name("all_reduce", i), C10D + "all_reduce.default", [_ref(h), "sum", "0"], ROW),
                  _node(_name("wait_tensor", i), C10D + "wait_tensor.default", [_ref(_name("all_reduce", i))], ROW),
                  _node(add, AT + "add.Tensor", [_ref(_name("wait_tensor", i)), _ref(res)], ROW),
                  _node(f"pow_{i + 1}", AT + "pow.Tensor_Scalar", [_ref(add), 2], ROW),
                  _node(_name("mean", i), AT + "mean.dim", [_ref(f"pow_{i + 1}"), [-1], True], COL),
                  _node(eps, AT + "add.Tensor", [_ref(_name("mean", i)), 1e-06], COL),
                  _node(_name("rsqrt", i), AT + "rsqrt.default", [_ref(eps)], COL),
                  _node(mul, AT + "mul.Tensor", [_ref(add), _ref(_name("rsqrt", i))], ROW),
                  _node(out, AT + "mul.Tensor", [_ref(mul), _ref("w_1")], ROW)]
        h, res = out, add
    return _doc("before", [*nodes, _node("output", "output", [{"tuple": [_ref(h)]}], None)])


def fused(n: int) -> dict:
    """What FusionPass makes of :func:`before`: one fused op per site."""
    nodes, h, res = _inputs(), "x_1", "res_1"
    for i in range(n):
        op = _name("allreduce_add_rmsnorm_default", i)
        nodes.append(_node(op, FUSED, [_ref(h), _ref(res), _ref("w_1"), 1e-06, "c10d:0", False, True, "auto"],
                           {"tuple": [ROW, ROW]}))
        h, res = _name("getitem", 2 * i), _name("getitem", 2 * i + 1)
        nodes.append(_node(h, "operator.getitem", [_ref(op), 0], ROW))
        if i < n - 1:  # the last site's residual sum has no user
            nodes.append(_node(res, "operator.getitem", [_ref(op), 1], ROW))
    return _doc("fused", [*nodes, _node("output", "output", [{"tuple": [_ref(h)]}], None)])


def write(n: int, folder: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """``folder/before.json`` and ``folder/fused.json`` for *n* sites."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "before.json", folder / "fused.json"
    for path, doc in zip(paths, (before(n), fused(n))):
        path.write_text(json.dumps(doc))
    return paths


if __name__ == "__main__":
    write(int(sys.argv[1]), pathlib.Path(sys.argv[2]))
