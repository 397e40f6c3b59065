"""The command line as a user runs it, in real processes (not under pytest's capture):
``--help`` without torch, one-line errors from ``bench``'s own parser, and other
libraries' output hidden unless ``-v``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from cli_driver import ROOT, run_commands

CONSOLE_SCRIPT = """#!{python}
import sys
from fusion_passes.tools.cli import main
if __name__ == '__main__':
    sys.argv[0] = sys.argv[0].removesuffix('.exe')
    sys.exit(main())
"""  # what pip writes for [project.scripts] fusion-passes = "fusion_passes.tools.cli:main"


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
    assert "fusion_passes.tools.cli" in imported
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
