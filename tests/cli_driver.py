"""Run several ``fusion-passes`` commands in ONE fresh process, as the console script runs
them: stdout and stderr are the process's real file descriptors (each command's captured
at the descriptor level, so what other libraries print is seen as a user would see it),
neither is a terminal. One process pays the torch (and vLLM) import once.

    results = run_commands([["dump", "m.py:make"], ["diff", "a.json", "b.json"]], cwd=tmp)
    results[0] == {"argv": [...], "rc": 0, "stdout": "...", "stderr": "", "seconds": 12.3}

A command may also be ``{"argv": [...], "cwd": folder}`` (run there), or
``{"script": path, "cwd": folder}``: a Python file run with ``runpy`` (a documented
snippet), its output captured the same way.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent

_DRIVER = r"""
import json, os, sys, tempfile, time
sys.argv[0] = "fusion-passes"  # the console script's name: the package defers its imports
commands = json.loads(sys.argv[1])
import runpy
from fusion_passes.cli import main
home = os.getcwd()
out = []
for item in commands:
    item = item if isinstance(item, dict) else {"argv": item}
    argv = item.get("argv") or ["python", item["script"]]
    os.chdir(item.get("cwd") or home)
    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe:
        sys.stdout.flush(); sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(fo.fileno(), 1); os.dup2(fe.fileno(), 2)
        start = time.perf_counter()
        try:
            if "script" in item:
                runpy.run_path(item["script"], run_name="__main__")
                rc = 0
            else:
                rc = main(argv)
        except SystemExit as e:
            rc = e.code
        except BaseException as e:
            rc = f"raised {type(e).__name__}: {e}"
        seconds = time.perf_counter() - start
        sys.stdout.flush(); sys.stderr.flush()
        os.dup2(saved[0], 1); os.dup2(saved[1], 2)
        os.close(saved[0]); os.close(saved[1])
        fo.seek(0); fe.seek(0)
        out.append({"argv": argv, "rc": rc, "stdout": fo.read().decode("utf-8", "replace"),
                    "stderr": fe.read().decode("utf-8", "replace"), "seconds": seconds})
with open(sys.argv[2], "w") as f:
    json.dump(out, f)
"""


def run_commands(commands: list, cwd, env: dict | None = None, timeout: float = 1800) -> list[dict]:
    """Each command's ``rc``, ``stdout``, ``stderr`` and ``seconds``, run in order in one process."""
    result = pathlib.Path(cwd, ".cli_driver_results.json")
    environ = {**os.environ, **(env or {})}
    environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), environ.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(commands), str(result)], cwd=cwd,
                          env=environ, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not result.exists():
        raise RuntimeError(f"the driver process failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    try:
        return json.loads(result.read_text())
    finally:
        result.unlink()
