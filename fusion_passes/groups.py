"""Process-group names, as the fused ops carry them, and how they resolve.

A fused op carries the all-reduce's group as one string qualified by its dialect:
``"c10d:<name>"`` for ``_c10d_functional`` group names (resolved by torch) and
``"vllm:<name>"`` for vLLM's group names such as ``tp:0`` (resolved by vLLM). Resolution
happens at run time, once per process, never while tracing.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

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
    if dialect == "c10d":
        out = torch.ops._c10d_functional.all_reduce.default(x, "sum", name)
        return torch.ops._c10d_functional.wait_tensor.default(out)
    # vLLM's CPU communicator reduces IN PLACE (dist.all_reduce) and returns its input, and
    # other communicators may too; a fused op may neither mutate nor alias its inputs.
    return torch.ops.vllm.all_reduce.default(x.clone(), name)


@functools.lru_cache(maxsize=None)
def world_size(group: str) -> int:
    """Number of ranks in *group* (resolved once per process)."""
    dialect, name = split(group)
    if dialect == "c10d":
        return dist.get_world_size(_resolve_c10d(name))
    return _vllm_coordinator(name).world_size


@functools.lru_cache(maxsize=None)
def is_single_node(group: str) -> bool:
    """Whether every rank of *group* lives on this host (IPC / symmetric memory possible).

    Kernel backends that read peers' memory need this; the reference path does not.
    Where it cannot be decided, the answer is False (the safe side: NCCL path).
    """
    dialect, name = split(group)
    try:
        if dialect == "vllm":
            # vLLM counts the nodes of its world once, at init (``_NODE_COUNT``); asking
            # again (``in_the_same_node_as``) is a collective, unsafe inside a fused op
            # that may run under CUDA-graph capture. One node: every group is local. More:
            # a TP group may still be local, but we cannot tell without a collective.
            from vllm.distributed import parallel_state

            _vllm_coordinator(name)  # the group must exist
            return parallel_state.get_node_count() == 1
        pg = _resolve_c10d(name)
        local = int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
        return 0 < dist.get_world_size(pg) <= local and _same_host(pg)
    except Exception:  # noqa: BLE001 - unknown means "not single node"
        return False


def _vllm_coordinator(name: str):
    """vLLM's ``GroupCoordinator`` called *name* (``tp:0``), as ``torch.ops.vllm.all_reduce``
    resolves it (vllm/distributed/parallel_state.py ``_groups``, weak references)."""
    from vllm.distributed import parallel_state

    ref = parallel_state._groups.get(name)
    coordinator = ref() if ref is not None else None
    if coordinator is None:
        raise ValueError(f"fusion_passes: vLLM group {name!r} does not exist (or was destroyed)")
    return coordinator


def _resolve_c10d(name: str) -> dist.ProcessGroup:
    from torch._C._distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


def _same_host(pg: dist.ProcessGroup) -> bool:
    import socket

    names: list[str | None] = [None] * dist.get_world_size(pg)
    dist.all_gather_object(names, socket.gethostname(), group=pg)
    return len(set(names)) == 1
