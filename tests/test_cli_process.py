"""The command line as a user runs it, in real processes (not under pytest's capture):
``--help`` without torch, one-line errors from ``bench``'s own parser, and other
libraries' output hidden unless ``-v``."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from cli_driver import ROOT, run_commands

CONSOLE_SCRIPT = """#!{python}
import sys
from fusion_passes.cli import main
if __name__ == '__main__':
    sys.argv[0] = sys.argv[0].removesuffix('.exe')
    sys.exit(main())
"""  # what pip writes for [project.scripts] fusion-passes = "fusion_passes.cli:main"


def test_help_is_fast_and_imports_no_torch(tmp_path):
    script = tmp_path / "fusion-passes"
    script.write_text(CONSOLE_SCRIPT.format(python=sys.executable))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-X", "importtime", str(script), "--help"], env=env,
                          capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0 and "COMMAND" in proc.stdout and "explain" in proc.stdout, proc
    imported = [line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    assert "fusion_passes.cli" in imported
    assert not [m for m in imported if m == "torch" or m.startswith("torch.")], "torch was imported"
    # measured: 0.09 s after, 12 s before (the whole library and torch were imported first),
    # on this 2-core machine under load; 5 s leaves room for a slow machine
    assert seconds < 5, seconds


NOISY_SPEC = '''
import logging, os, subprocess, sys, warnings
import torch

def make():
    os.write(2, b"W1201 torch/utils/cpp_extension.py:183] No CUDA runtime is found\\n")  # C level
    logging.getLogger("vllm.noise").warning("Error ignored in is_in_the_same_node: can't allocate memory")
    warnings.warn("a third-party warning")
    sys.stderr.write("Loading weights:  50%|#####     | 1/2 [00:01<00:01]\\r")  # a progress bar
    sys.stderr.flush()
    subprocess.run(["sh", "-c", "echo child process noise >&2"])
    return torch.nn.Linear(4, 4), (torch.ones(2, 4),)
'''
NOISE = ("No CUDA runtime", "can't allocate memory", "a third-party warning", "Loading weights", "child process noise")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """One process: bench's own parser errors, a noisy dump quiet and with -v."""
    tmp = tmp_path_factory.mktemp("process")
    (tmp / "noisy.py").write_text(NOISY_SPEC)
    commands = [["bench", "compile", "--layers", "0"], ["bench", "compile", "--layers", "8", "-1"],
                ["bench", "compile", "--tp", "0"], ["bench", "compile", "--tp", "-1"],
                ["dump", "noisy.py:make", "-o", "quiet"], ["dump", "noisy.py:make", "-o", "loud", "-v"]]
    return {" ".join(r["argv"]): r for r in run_commands(commands, tmp, env={"TORCHINDUCTOR_COMPILE_THREADS": "1"})}


@pytest.mark.parametrize("argv,message", [
    ("bench compile --layers 0", "argument --layers: must be an integer from 1 to 128, got 0"),
    ("bench compile --layers 8 -1", "argument --layers: must be an integer from 1 to 128, got -1"),
    ("bench compile --tp 0", "argument --tp: invalid choice: 0 (choose from 2, 4, 8)"),
    ("bench compile --tp -1", "argument --tp: invalid choice: -1 (choose from 2, 4, 8)"),
])
def test_bench_option_errors_are_one_line(results, argv, message):
    r = results[argv]
    assert r["rc"] == 2 and r["stdout"] == "", r
    assert r["stderr"] == f"fusion-passes bench compile: error: {message} (see fusion-passes bench compile --help)\n", r


def test_other_libraries_output_is_hidden_unless_verbose(results):
    quiet, loud = results["dump noisy.py:make -o quiet"], results["dump noisy.py:make -o loud -v"]
    assert quiet["rc"] == 0 and loud["rc"] == 0, (quiet, loud)
    assert quiet["stderr"] == "", quiet["stderr"]  # not a terminal: no progress either
    for noise in NOISE:
        assert noise in loud["stderr"], (noise, loud["stderr"])
    assert re.match(r"graph_0: 0/0 all-reduces fused\nwrote 4 files to quiet/", quiet["stdout"]), quiet["stdout"]
    assert quiet["stdout"] == loud["stdout"].replace("loud", "quiet")


EXITS_SPEC = '''
import sys

def make():
    sys.exit("this model needs --flag")
'''


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """One process: inputs that are not regular files, names longer than a file system
    takes, a spec that exits with a message. A FIFO used to hang the command forever
    (the driver's timeout fails the test then)."""
    tmp = tmp_path_factory.mktemp("paths")
    os.mkfifo(tmp / "fifo.json")
    os.mkfifo(tmp / "fifo.py")
    (tmp / "exits.py").write_text(EXITS_SPEC)
    (tmp / "model.py").write_text("from test_cli_models import tiny_block as make\n")
    long_name, long_spec = "o" * 300, "m" * 100_000 + ".py:make"
    commands = [["explain", "fifo.json"], ["diff", "fifo.json", "fifo.json"], ["dump", "fifo.py:make", "-o", "a"],
                ["dump", "model.py:make", "-o", long_name], ["dump", "model.py:make", "-o", f"d/{'p' * 5000}"],
                ["diff", "--html", long_name + ".html", "fifo.json", "fifo.json"],
                ["dump", long_spec, "-o", "b"], ["dump", "exits.py:make", "-o", "c"]]  # (one argument: under 128 KiB)
    results = run_commands(commands, tmp, timeout=600)
    return tmp, [(r["rc"], r["stdout"], r["stderr"]) for r in results]


def test_paths_that_are_not_regular_files_or_too_long_are_one_line_rc_2(paths):
    tmp, results = paths
    long_shown = f"{'o' * 120}... (300 characters)"
    spec_shown = f"{'m' * 120}... (100008 characters)"
    assert results == [
        (2, "", "fusion-passes explain: error: fifo.json is not a regular file (a graph dump is a file "
                "`fusion-passes dump` wrote)\n"),
        (2, "", "fusion-passes diff: error: fifo.json is not a regular file (a graph dump is a file "
                "`fusion-passes dump` wrote)\n"),
        (2, "", "fusion-passes dump: error: spec 'fifo.py:make': fifo.py is not a regular file\n"),
        (2, "", f"fusion-passes dump: error: cannot write {long_shown}: a name in it is 300 bytes; file systems "
                "take 255, and the staging name adds 14\n"),
        (2, "", f"fusion-passes dump: error: cannot write d/{'p' * 118}... (5002 characters): the path is longer "
                "than 4096 bytes\n"),
        (2, "", f"fusion-passes diff: error: cannot write {'o' * 120}... (305 characters): a name in it is 305 "
                "bytes; file systems take 255, and the staging name adds 14\n"),
        (2, "", f"fusion-passes dump: error: spec '{spec_shown}': cannot read {'m' * 120}... (100003 characters): "
                "File name too long\n"),
        (2, "", "fusion-passes dump: error: this model needs --flag\n"),
    ]
    assert sorted(p.name for p in tmp.iterdir()) == ["exits.py", "fifo.json", "fifo.py", "model.py"]


SLOW_SPEC = '''
import pathlib, time

def make():
    pathlib.Path("STARTED").touch()
    time.sleep(120)
'''


def test_sigterm_during_dump_cleans_up_like_ctrl_c(tmp_path):
    """What `timeout`, a CI cancel and `docker stop` send: the staging folder goes, the
    exit status is 128 + 15 and one line says so."""
    (tmp_path / "slow.py").write_text(SLOW_SPEC)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = "import sys; from fusion_passes.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, "dump", "slow.py:make", "-o", "out"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (tmp_path / "STARTED").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert (tmp_path / "STARTED").exists(), proc.communicate()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # the staging folder, while it works
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert (proc.returncode, out, err) == (143, "", "fusion-passes dump: terminated\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["STARTED", "slow.py"]


def test_a_closed_pipe_stops_quietly():
    """`fusion-passes patterns | head -1`: the reader has gone away; the command stops with
    128 + SIGPIPE and prints nothing (it printed 'failed: BrokenPipeError'). The pipe's read
    end is closed before the command starts, so its first write fails whatever the timing."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r, w = os.pipe()
    os.close(r)  # no reader at all
    try:
        p = subprocess.Popen([sys.executable, "-m", "fusion_passes.cli", "patterns"], cwd=ROOT, env=env,
                             stdout=w, stderr=subprocess.PIPE)
    finally:
        os.close(w)
    err = p.communicate(timeout=60)[1].decode()
    assert p.returncode == 128 + signal.SIGPIPE, err
    assert err == ""
