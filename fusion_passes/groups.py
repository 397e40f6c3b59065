"""Process-group names, as the fused ops carry them, and how they resolve.

A fused op carries the all-reduce's process group (its ``group`` argument; never a quant
group, which is ``group_size``) as one string qualified by its dialect:
``"c10d:<name>"`` for ``_c10d_functional`` group names (resolved by torch) and
``"vllm:<name>"`` for vLLM's group names such as ``tp:0`` (resolved by vLLM). Resolution
happens at run time, once per process, never while tracing.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Iterator

import torch
import torch.distributed as dist

from fusion_passes import _compat

C10D_PREFIX = "c10d:"
VLLM_PREFIX = "vllm:"


def qualify(dialect: str, name: str) -> str:
    """``qualify("c10d", "0") == "c10d:0"``."""
    return f"{dialect}:{name}"


def split(group: str) -> tuple[str, str]:
    """``"vllm:tp:0" -> ("vllm", "tp:0")``; a clear error for anything else."""
    dialect, sep, name = group.partition(":")
    if not sep or dialect not in ("c10d", "vllm") or not name:
        raise ValueError(
            f"fusion_passes: bad group {group!r}: expected 'c10d:<group name>' or 'vllm:<group name>'"
        )
    return dialect, name


def all_reduce(x: torch.Tensor, group: str) -> torch.Tensor:
    """Sum *x* over *group* with the SAME op the unfused graph used (out of place).

    Calling the dialect's own collective keeps the reference bit-identical to the
    unfused chain: same algorithm, same reduction order, same transport.
    """
    dialect, name = split(group)
    if _simulated is not None:
        return _simulated.reduce(x, group)
    if dialect == "c10d":
        out = torch.ops._c10d_functional.all_reduce.default(x, "sum", name)
        return torch.ops._c10d_functional.wait_tensor.default(out)
    # vLLM's CPU communicator reduces IN PLACE (dist.all_reduce) and returns its input, and
    # other communicators may too; a fused op may neither mutate nor alias its inputs.
    return torch.ops.vllm.all_reduce.default(x.clone(), name)


def world_size(group: str) -> int:
    """Number of ranks in *group* (resolved once per process)."""
    if _simulated is not None:
        split(group)
        return _simulated.world_size
    return _world_size(group)


@functools.lru_cache(maxsize=None)
def _world_size(group: str) -> int:
    dialect, name = split(group)
    if dialect == "c10d":
        return dist.get_world_size(_resolve_c10d(name))
    return _vllm_coordinator(name).world_size


# Decided answers of is_single_node, per group. A failure is never stored: it is logged
# (naming the group) and the question asked again at the group's next eager call.
_SINGLE_NODE: dict[str, bool] = {}
_log = logging.getLogger("fusion_passes")
_warned: set[tuple[str, str]] = set()


def is_single_node(group: str) -> bool:
    """Whether every rank of *group* lives on this host (IPC / symmetric memory possible).

    Kernel backends that read peers' memory need this; the reference path does not. It is
    decided ONCE per group, at the group's first eager call (c10d: one ``all_gather_object``
    of host names over the group; vLLM: its node count, counted at init), and then read
    from a dict. Never during CUDA-graph capture: a call captured before any eager call
    answers False (the NCCL path) for that call only. A question that fails (the group
    cannot be resolved, the collective raises) answers False for that call, logs a warning
    naming the group and the error, and is asked again at the next eager call.
    """
    known = _SINGLE_NODE.get(group)
    if known is not None:
        return known
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        _warn(group, "asked first under CUDA-graph capture, where no collective may run; "
              "this call takes the path for several nodes, the next eager call decides")
        return False
    try:
        answer = _decide_single_node(group)
    except Exception as e:  # noqa: BLE001 - reported and retried, never cached
        _warn(group, f"cannot tell whether it spans one node ({type(e).__name__}: {e}); this call "
              "takes the path for several nodes, the next eager call asks again")
        return False
    _SINGLE_NODE[group] = answer
    return answer


def _warn(group: str, why: str) -> None:
    if (group, why) not in _warned:
        _warned.add((group, why))
        _log.warning("fusion_passes: group %r: %s", group, why)


def _decide_single_node(group: str) -> bool:
    dialect, name = split(group)
    if dialect == "vllm":
        # vLLM counts the nodes of its world once, at init (``_NODE_COUNT``); asking again
        # (``in_the_same_node_as``) is a collective. One node: every group is local. More: a
        # TP group may still be local, but we cannot tell without a collective of our own.
        from vllm.distributed import parallel_state

        _vllm_coordinator(name)  # the group must exist
        return parallel_state.get_node_count() == 1
    pg = _resolve_c10d(name)
    if torch.cuda.is_available() and dist.get_world_size(pg) > torch.cuda.device_count():
        return False  # more ranks than this host has GPUs: not one GPU per rank on one host
    return _same_host(pg)


def _vllm_coordinator(name: str):
    """vLLM's ``GroupCoordinator`` called *name* (``tp:0``), as ``torch.ops.vllm.all_reduce``
    resolves it (:func:`fusion_passes._compat.vllm_group`)."""
    coordinator = _compat.vllm_group(name)
    if coordinator is None:
        raise ValueError(f"fusion_passes: vLLM group {name!r} does not exist (or was destroyed)")
    return coordinator


def _resolve_c10d(name: str) -> dist.ProcessGroup:
    return _compat.resolve_process_group(name)


def _same_host(pg: dist.ProcessGroup) -> bool:
    import socket

    names: list[str | None] = [None] * dist.get_world_size(pg)
    dist.all_gather_object(names, socket.gethostname(), group=pg)
    return len(set(names)) == 1


# ---------------------------------------------------------------------------------------
# Test hook: simulated ranks in one process
# ---------------------------------------------------------------------------------------


class _Simulation:
    """The precomputed cross-rank sum that :func:`all_reduce` returns while simulating."""

    def __init__(self, total: torch.Tensor, world_size: int):
        self.total, self.world_size = total, world_size

    def reduce(self, x: torch.Tensor, group: str) -> torch.Tensor:
        if x.shape != self.total.shape or x.dtype != self.total.dtype:
            raise ValueError(
                f"fusion_passes: simulated all-reduce over {group!r} got {tuple(x.shape)}/{x.dtype}, "
                f"but the ranks' sum is {tuple(self.total.shape)}/{self.total.dtype}"
            )
        return self.total.clone()  # a fresh tensor per call, as a collective returns


_simulated: _Simulation | None = None


@contextlib.contextmanager
def simulated_sum(total: torch.Tensor, world_size: int) -> Iterator[None]:
    """TEST HOOK, not for production: inside, :func:`all_reduce` returns a copy of *total*
    (the sum of every simulated rank's input, computed by the caller in rank order) and
    :func:`world_size` says *world_size*, for any group name. The real fused ops then run
    eagerly, one simulated rank at a time, in one process without a process group
    (tests/ranks.py). Outside it the two functions pay one ``is None`` check."""
    global _simulated
    if _simulated is not None:
        raise RuntimeError("fusion_passes: simulated_sum does not nest")
    _simulated = _Simulation(total, world_size)
    try:
        yield
    finally:
        _simulated = None
