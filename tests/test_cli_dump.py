"""``fusion-passes dump``: ONE real torch.compile (Inductor, CPU) of a tiny two-block model
under the fake process group, then ``explain`` and ``diff`` on what it wrote."""

from __future__ import annotations

import json
import pathlib

import pytest

from fusion_passes import _compat
from fusion_passes.cli import graphio
from fusion_passes import cli

MODELS = pathlib.Path(__file__).parent / "test_cli_models.py"


@pytest.fixture(scope="module")
def dumped(fake_pg, tmp_path_factory):
    out = tmp_path_factory.mktemp("dump")
    # one compile worker: no subprocess pool to start for a graph this small (saves ~40 s here)
    with _compat.inductor_config.patch(compile_threads=1):
        rc = cli.main(["dump", f"{MODELS}:tiny_block", "-o", str(out)])
    assert rc == 0
    return out


def test_dump_writes_every_stage_as_text_and_json(dumped):
    names = sorted(p.name for p in dumped.iterdir())
    assert names == [f"graph_0.{s}.{e}" for s in ("before", "fused", "hoisted") for e in ("json", "txt")]
    before, fused = graphio.load(str(dumped / "graph_0.before.json")), graphio.load(str(dumped / "graph_0.fused.json"))
    count = lambda d, t: sum(n.target == t for n in d.nodes)  # noqa: E731
    ar, fop = "torch.ops._c10d_functional.all_reduce.default", "torch.ops.fusion_passes.allreduce_add_rmsnorm.default"
    assert (count(before, ar), count(before, fop)) == (2, 0)
    assert (count(fused, ar), count(fused, fop)) == (1, 1)
    assert [s["fused"] for s in fused.report["sites"]] == [True, False]
    text = (dumped / "graph_0.fused.txt").read_text()
    assert "torch.ops.fusion_passes.allreduce_add_rmsnorm.default(" in text
    assert "test_cli_models.py:" in text and "code: mlp = torch.relu(" in text  # print_readable's source comments
    assert json.loads((dumped / "graph_0.before.json").read_text())["model"].endswith("test_cli_models.py:tiny_block")


def test_explain_on_the_dump_names_the_relu_and_its_source_line(dumped, capsys):
    assert cli.main(["explain", "--json", str(dumped / "graph_0.before.json")]) == 0
    first, second = json.loads(capsys.readouterr().out)["sites"]
    assert first["fused"] and not second["fused"]
    assert (second["blocker"], second["blocker_op"]) == ("relu", "aten.relu.default")
    assert second["source"].startswith('File "') and "test_cli_models.py\", line" in second["source"]
    assert second["code"] == "mlp = torch.relu(_all_reduce(self.down_proj(h)))  # the relu blocks this all-reduce"


def test_diff_of_the_dump_shows_the_fused_site(dumped, capsys):
    assert cli.main(["diff", "--json", str(dumped / "graph_0.before.json"), str(dumped / "graph_0.fused.json")]) == 0
    d = json.loads(capsys.readouterr().out)
    (site,) = d["sites"]
    # torch.nn.RMSNorm in fp32 decomposes to pow, mean, add, rsqrt, mul, mul(weight)
    assert [r["name"] for r in site["removed"]] == ["all_reduce", "wait_tensor", "add", "pow_1", "mean", "add_1",
                                                    "rsqrt", "mul", "mul_1"]
    assert (d["a"]["collectives"], d["b"]["collectives"], d["b"]["fused_ops"]) == (2, 2, 1)
    # 2 mm + 2 all-reduces + {add, norm1} + {relu, add, norm2}  ->  2 mm + fused + all-reduce + {relu, add, norm2}
    assert (d["a"]["kernels_estimate"], d["b"]["kernels_estimate"]) == (6, 5)


@pytest.mark.parametrize("spec,message", [
    ("no_such_module_xyz:make", "spec 'no_such_module_xyz:make': no module named 'no_such_module_xyz'"),
    (f"{MODELS}:nothing_here", "has no callable 'nothing_here'"),
    ("missing_file.py:make", "no such file missing_file.py"),
    ("no-colon", "is not module:function or file.py:function"),
])
def test_bad_spec_exits_2(fake_pg, capsys, spec, message):
    assert cli.main(["dump", spec, "-o", "unused"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fusion-passes dump: error: ") and message in err, err
