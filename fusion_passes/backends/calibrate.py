"""Opt-in calibration on first use: a graph site the measured table does not cover is measured first.

OFF unless asked for, with ``FusionPass(calibrate=True)`` (``VllmFusionPass(calibrate=True)``)
or ``FUSION_PASSES_CALIBRATE=1`` in the environment; compiling never slows down silently.
When on, a graph site on an NVIDIA GPU at world size 1 whose (variant, hidden) the
measured table (:mod:`fusion_passes.backends.measured`) does not hold is calibrated
before it is decided: ``fusion-passes tune --variants V --hidden H`` runs in a process of
its own on the same GPU (about 15-20 s per pair on an H200, once per machine: it writes
the table), with one log line saying so, and the site is decided from the new table. A
failure (or a timeout) is one warning and the shipped table decides, as without the
option; a pair is tried once per process.

At world size > 1 it is not done while compiling: the ranks would have to time together
(:func:`fusion_passes.backends.agree.decide`) in the middle of a compile that each rank
may or may not run (a compile cache hit skips it). The pass logs once that
``torchrun --nproc_per_node=N -m fusion_passes.cli tune`` calibrates there.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import subprocess
import sys
from typing import Iterator

from fusion_passes.backends import agree, measured

ENV = "FUSION_PASSES_CALIBRATE"
# one pair (15 buckets, no max-autotune) took 14-21 s on 1x H200 and 22.5 s on 1x H100 with the
# looped and rows options (results/README.md); room for a slow first JIT
TIMEOUT_S = 300
_TRUE = ("1", "true", "yes", "on")
_log = logging.getLogger("fusion_passes")
_ON: contextvars.ContextVar[bool] = contextvars.ContextVar("fusion_passes_calibrate", default=False)
_TRIED: set[tuple] = set()


def requested(option: bool) -> bool:
    """Whether calibration is on: the pass option or :data:`ENV`."""
    return bool(option) or os.environ.get(ENV, "").strip().lower() in _TRUE


@contextlib.contextmanager
def enabled(on: bool) -> Iterator[None]:
    """Inside, graph sites may be calibrated (the pass sets it from its option)."""
    token = _ON.set(on)
    try:
        yield
    finally:
        _ON.reset(token)


def table_for_site(group: str | None, world: int, variant: str, hidden: int, device: str, dtype) -> str | None:
    """The table a graph site is decided by (:func:`agree.table_id`), after calibrating its
    (variant, hidden, activation dtype) first when that was asked for and can be done here."""
    if _ON.get() and device == "cuda" and world >= 1:
        table = measured.local(world) if world == 1 else None
        if table is None or not table.measured_here(variant, hidden, dtype=dtype):  # shipped: not this machine
            _calibrate(world, variant, hidden, measured.dtype_name(dtype))
    return agree.table_id(group, world)


def _calibrate(world: int, variant: str, hidden: int, dtype: str) -> None:
    key = (world, variant, hidden, dtype)
    if key in _TRIED:
        return
    _TRIED.add(key)
    if world > 1:
        _log.warning("fusion_passes: calibration was asked for, but at world size %d it runs only collectively: "
                     "torchrun --nproc_per_node=%d -m fusion_passes.cli tune --variants %s --hidden %d --dtypes %s",
                     world, world, variant, hidden, dtype)
        return
    if measured.path() is None:
        _log.warning("fusion_passes: calibration was asked for, but $%s=off; the shipped table decides", measured.ENV)
        return
    _log.warning("fusion_passes: calibrating %s at hidden %d in %s on this GPU (%s; once per machine, about 25 s)",
                 variant, hidden, dtype, ENV if os.environ.get(ENV) else "calibrate=True")
    try:
        run_tune(variant, hidden, dtype)
    except Exception as e:  # noqa: BLE001 - never breaks the compile: the shipped table decides
        _log.warning("fusion_passes: calibrating %s at hidden %d in %s failed (%s: %s); the shipped table decides",
                     variant, hidden, dtype, type(e).__name__, str(e)[:300])
        return
    measured.reset()


def run_tune(variant: str, hidden: int, dtype: str) -> None:
    """``fusion-passes tune`` for one pair in a child process at world size 1 (its own CUDA
    context and process group; the distributed variables of this process are not passed on)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env[measured.ENV] = str(measured.path())
    env.pop(ENV, None)
    import socket

    with socket.socket() as s:  # the child's one-rank group on a free port, not the parent's
        s.bind(("127.0.0.1", 0))
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))
    cmd = [sys.executable, "-m", "fusion_passes.cli", "tune", "--variants", variant, "--hidden", str(hidden),
           "--dtypes", dtype, "--no-move-floor"]  # the floor decides nothing; calibration skips it
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise RuntimeError(f"`{' '.join(cmd[2:])}` exited {done.returncode}: {lines[-1] if lines else ''}")


def reset() -> None:
    """Forget which pairs were tried (tests)."""
    _TRIED.clear()
