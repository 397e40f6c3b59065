"""Dumps from someone else cannot touch the user's terminal: control characters in any
text a dump carries (a source line, the code on it, an op name, the model name) come out
escaped in ``explain`` and ``diff`` text, and in the ``diff --html`` page."""

from __future__ import annotations

import json
import pathlib

import pytest

from fusion_passes import cli
from fusion_passes.cli import explain
from test_cli_models import MODEL, relu_block, write_dumps

CLEAR, TITLE, RED = "\x1b[2J", "\x1b]0;pwned\x07", "\x1b[31m"
FAKE_LINE = "\n5/5 all-reduces fused"


def _poison(path: pathlib.Path) -> None:
    """The relu's stack trace, source and code get escape sequences and a fake output line
    (explain prints the source line of the graph the pass rebuilt, from the stack trace;
    the diff page shows the fields as written); its target
    gets a colour code (so it becomes an unknown op that blocks hoisting: the blocker the
    text names); the model name gets markup."""
    doc = json.loads(path.read_text())
    doc["model"] = f"<script>alert(1)</script>{TITLE}"
    for n in doc["nodes"]:
        if n["name"] == "relu":
            n["target"] = f"torch.ops.aten.relu{RED}.default"
            n["meta"]["stack_trace"] = f'File "model.py{TITLE}", line 1, in forward{CLEAR}\n    y = relu(x){RED}\n'
            n["meta"]["source"] = f'File "model.py{TITLE}", line 1, in forward{CLEAR}'
            n["meta"]["code"] = f"y = relu(x){FAKE_LINE}"
    path.write_text(json.dumps(doc))


@pytest.fixture
def hostile(fake_pg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a, b = write_dumps(relu_block, MODEL, pathlib.Path("d"))
    _poison(a)
    _poison(b)
    return a, b


def _only_printable(text: str) -> None:
    for line in text.splitlines():
        assert line.isprintable(), repr(line)


@pytest.mark.parametrize("hoist", [True, False])
def test_explain_escapes_text_from_the_dump(hostile, capsys, hoist):
    argv = ["explain", str(hostile[0])] + ([] if hoist else ["--no-hoist"])
    rc = cli.main(argv)
    out = capsys.readouterr().out
    assert rc == 0
    _only_printable(out)
    assert "blocked by relu (aten.relu\\x1b[31m.default)" in out
    assert 'source: File "model.py\\x1b]0;pwned\\x07", line 1, in forward\\x1b[2J' in out
    assert "              y = relu(x)\\x1b[31m" in out.splitlines()
    assert out.splitlines()[-2:] == ["1/2 all-reduces fused", explain.SPELLING_HINT]
    rc = cli.main([*argv, "--json"])
    js = capsys.readouterr().out
    _only_printable(js)  # JSON escapes control characters itself
    assert json.loads(js)["sites"][1]["blocker_op"] == f"aten.relu{RED}.default"  # the data, unchanged


def test_diff_escapes_text_from_the_dumps(hostile, capsys):
    rc = cli.main(["diff", *map(str, hostile)])
    out = capsys.readouterr().out
    assert rc == 0
    _only_printable(out)
    assert out.splitlines()[0] == "graph_0 of <script>alert(1)</script>\\x1b]0;pwned\\x07: before -> fused"


def test_the_html_page_escapes_markup_and_control_characters(hostile, capsys):
    rc = cli.main(["diff", "--html", "page.html", *map(str, hostile)])
    assert rc == 0
    page = pathlib.Path("page.html").read_text()
    assert "\x1b" not in page and "\x07" not in page
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;\\x1b]0;pwned\\x07" in page
    assert "aten.relu\\x1b[31m.default" in page
