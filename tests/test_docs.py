"""Every command in README.md and docs/ runs, and prints what the page says it prints.

The fenced blocks of each page are read in order:

* a ``console`` block (or a plain one whose lines start with ``$``): each ``$`` line is a
  ``fusion-passes`` command; the lines after it, up to the next ``$``, are its output
  (stdout then stderr), ``[rc N]`` its exit status (0 when absent). ``...`` on a line of
  its own stands for any number of lines, inside a line for any text;
* a ``bash`` block: each line is a command; ``make TARGET`` is checked with ``make -n``;
* a block under ``<!-- test: file NAME -->`` is written to NAME before the page's
  commands run; one under ``<!-- test: excerpt PATH -->`` must appear in PATH, a file the
  commands above it wrote; one under ``<!-- test: with model, inputs from MODULE:FUNCTION -->``
  is a Python snippet run with those two names set;
* a block under ``<!-- test: not run, REASON -->`` is not run (REASON says what it needs:
  a GPU, the network). Any other ``python`` or shell block fails the test.

Cost: every command of every page runs in ONE process (tests/cli_driver.py: the torch
and vLLM imports are paid once), under torch's fake process group, pages in the order of
:data:`PAGES` (the vLLM traces last). Each page runs in its own temporary folder; the
path of that folder reads as the one the page shows (``/tmp/cli_doc`` for docs/cli.md).
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import shlex
import subprocess

import pytest

from cli_driver import ROOT, run_commands

PAGES = {"docs/cli.md": "/tmp/cli_doc", "patterns/README.md": "/tmp/patterns_doc", "README.md": "/tmp/readme",
         "docs/vllm.md": "/tmp/vllm_doc"}
"""Each page and the folder its outputs show as the working directory."""
MARKER = re.compile(r"<!--\s*test:\s*(.*?)\s*-->")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.S | re.M)


@dataclasses.dataclass
class Block:
    """One fenced block: where it is, its language, its text, its ``<!-- test: ... -->`` marker."""

    page: str
    line: int
    lang: str
    text: str
    marker: str | None


@dataclasses.dataclass
class Command:
    """One command of a page: how it is written, and the output and status it should have."""

    page: str
    line: int
    text: str
    expected: str | None = None
    rc: int = 0

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.text, comments=True)


def blocks(page: str) -> list[Block]:
    source = (ROOT / page).read_text()
    out = []
    for m in FENCE.finditer(source):
        before = source[:m.start()].rstrip().rsplit("\n", 1)[-1]
        marker = MARKER.fullmatch(before.strip())
        out.append(Block(page, source[:m.start()].count("\n") + 1, m.group(1), m.group(2),
                         marker.group(1) if marker else None))
    return out


def _console(b: Block) -> list[Command]:
    cmds: list[Command] = []
    for i, line in enumerate(b.text.splitlines()):
        if line.startswith("$ "):
            cmds.append(Command(b.page, b.line + 1 + i, line[2:], expected=""))
        elif cmds and (m := re.fullmatch(r"\[rc (\d+)\]", line.strip())):
            cmds[-1].rc = int(m.group(1))
        elif cmds:
            cmds[-1].expected += line + "\n"
    return cmds


def commands(page: str) -> tuple[list[Command], list[Block]]:
    """The page's commands to run, and its blocks that are not (marked, or plain text)."""
    cmds, other = [], []
    for b in blocks(page):
        if b.marker and b.marker.startswith("not run"):
            other.append(b)
        elif b.lang == "console" or (b.lang == "" and b.text.startswith("$ ")):
            cmds += _console(b)
        elif b.lang in ("bash", "sh"):
            cmds += [Command(page, b.line + 1 + i, ln.strip()) for i, ln in enumerate(b.text.splitlines())
                     if ln.strip() and not ln.strip().startswith("#")]
        else:
            other.append(b)
    return cmds, other


def _matches(expected: str, actual: str) -> bool:
    parts = []
    for line in expected.rstrip("\n").split("\n"):
        if line.strip() == "...":
            parts.append(r"(?:.*\n)*?")
        else:
            parts.append(".*?".join(re.escape(p) for p in line.rstrip().split("...")) + r"[ \t]*\n")
    return re.fullmatch("".join(parts), actual.rstrip("\n") + "\n") is not None


# ---------------------------------------------------------------------------- running


SETUP = """import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore
if not dist.is_initialized():
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
model, inputs = {make}()
inputs = inputs[0] if len(inputs) == 1 else inputs
"""


def _python_snippet(b: Block, folder: pathlib.Path) -> dict:
    m = re.fullmatch(r"with model, inputs from (\w+):(\w+)", b.marker or "")
    assert m, f"{b.page}:{b.line}: a python block needs a <!-- test: ... --> marker"
    path = folder / f"snippet_{b.line}.py"
    path.write_text(f"from {m.group(1)} import {m.group(2)}\n" + SETUP.format(make=m.group(2)) + b.text)
    return {"script": str(path), "cwd": str(folder)}


def _prepare(page: str, folder: pathlib.Path) -> list[dict]:
    """Write the page's files; its commands as driver items (``make`` ones are dry runs here)."""
    items = []
    cmds, other = commands(page)
    for b in other:
        if b.marker and b.marker.startswith("file "):
            (folder / b.marker.removeprefix("file ")).write_text(b.text)
        elif b.lang == "python" and not (b.marker or "").startswith("not run"):
            items.append(_python_snippet(b, folder))
    for c in cmds:
        assert c.argv[0] in ("fusion-passes", "make"), f"{page}:{c.line}: {c.text!r} is neither run nor marked"
        if c.argv[0] == "fusion-passes":
            items.append({"argv": c.argv[1:], "cwd": str(folder)})
    return items


@pytest.fixture(scope="module")
def ran(tmp_path_factory) -> dict:
    """Every page's commands, run once: ``(page, line) -> driver result``, and the folders."""
    items, keys, folders = [], [], {}
    for page in PAGES:
        folders[page] = tmp_path_factory.mktemp(page.replace("/", "_").replace(".", "_"))
        for item in _prepare(page, folders[page]):
            items.append(item)
            keys.append(page)
    # one compile worker (no pool to start for these small graphs); no FX-graph cache: a
    # cache hit skips the post-grad passes, and the README snippet's report would be empty
    env = {"TORCHINDUCTOR_COMPILE_THREADS": "1", "TORCHINDUCTOR_FX_GRAPH_CACHE": "0"}
    results = run_commands(items, ROOT, env=env)
    by_page: dict = {p: [] for p in PAGES}
    for page, r in zip(keys, results):
        by_page[page].append(r)
    return {"results": by_page, "folders": folders}


def _normalise(text: str, folder: pathlib.Path, shown: str) -> str:
    return text.replace(str(folder), shown)


CASES = [(page, c) for page in PAGES for c in commands(page)[0]]


@pytest.mark.parametrize("page,cmd", CASES, ids=[f"{p}:{c.line}" for p, c in CASES])
def test_command(ran, page, cmd):
    if cmd.argv[0] == "make":
        dry = subprocess.run(["make", "-n", *cmd.argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert dry.returncode == 0, dry.stderr  # the demo itself: tests/test_demo_gloo.py
        return
    runs = [r for r in ran["results"][page] if r["argv"] == cmd.argv[1:]]
    assert runs, f"{page}:{cmd.line} did not run"
    r = runs[0]
    shown = _normalise(r["stdout"] + r["stderr"], ran["folders"][page], PAGES[page])
    assert r["rc"] == cmd.rc, f"{page}:{cmd.line}: {cmd.text}\nexit {r['rc']}, expected {cmd.rc}\n{shown}"
    if cmd.expected:
        assert _matches(cmd.expected, shown), f"{page}:{cmd.line}: {cmd.text}\n--- page says:\n{cmd.expected}" \
                                              f"--- it printed:\n{shown}"


def test_snippets_and_excerpts(ran):
    """Python snippets ran without error; excerpts appear in the files the commands wrote."""
    for page in PAGES:
        for r in ran["results"][page]:
            if r["argv"][0] == "python":  # README: one_input_block's first all-reduce fuses, the relu blocks
                assert r["rc"] == 0, r
                rows = [ln.split()[:3] for ln in r["stdout"].splitlines()[1:]]
                assert rows == [["all_reduce", "yes", "allreduce_add_rmsnorm"], ["all_reduce_1", "no", "hoisting"]], r
        for b in commands(page)[1]:
            if b.marker and b.marker.startswith("excerpt "):
                written = (ran["folders"][page] / b.marker.removeprefix("excerpt ")).read_text()
                assert _normalise(written, ran["folders"][page], PAGES[page]).count(b.text) == 1, b


def test_every_block_is_run_or_says_why_not():
    for page in PAGES:
        for b in commands(page)[1]:
            if b.lang in ("python", "bash", "sh", "console"):
                assert b.marker, f"{page}:{b.line}: a {b.lang} block that is neither run nor marked"
            if b.marker and b.marker.startswith("not run"):
                assert b.marker.removeprefix("not run").strip(" ,"), f"{page}:{b.line}: say why it is not run"
