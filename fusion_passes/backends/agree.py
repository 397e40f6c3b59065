"""Every rank decides the same: which table a group uses, and collective calibration.

If one rank ran the fused kernel where another ran a plain collective, both would hang.
So at world size > 1 a measured table (:mod:`fusion_passes.backends.measured`) is used
only once every rank of the group has shown the same one:

* :func:`for_group` (run time, inside a fused op): at the group's FIRST eager call, one
  ``all_gather_object`` of each rank's table digest over the group (as
  :func:`fusion_passes.groups.is_single_node` asks its question). Same digest everywhere:
  that table. Different digests (or a rank without one): the shipped table on every rank,
  with ONE warning naming the digests. Never under CUDA-graph capture: a call captured
  before any eager call uses the shipped table, for that call only. Decided once per group.
* :func:`table_id` (compile time, no collective): the table agreed for the group in this
  process so far, else the shipped one. At world size 1 there is nothing to agree on.
* :func:`decide` (calibration): every rank times every option, the slowest rank's time
  counts, rank 0 picks the fastest and broadcasts it.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from fusion_passes import groups
from fusion_passes.backends import measured

_log = logging.getLogger("fusion_passes")
_AGREED: dict[str, str | None] = {}  # group -> the agreed digest, or None (the shipped table)


def table_id(group: str | None, world_size: int) -> str | None:
    """The table a compile-time decision may use: the digest of this machine's measured table
    at world size 1, the group's agreed one above, else None (shipped). No collective."""
    if world_size == 1:
        table = measured.local(1)
        return None if table is None else table.digest
    return _AGREED.get(group) if group else None


def for_group(group: str, world_size: int) -> str | None:
    """The table a run-time decision uses: agreed across *group* at its first eager call."""
    if world_size <= 1:
        return table_id(group, world_size)
    if group in _AGREED:
        return _AGREED[group]
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return None  # no collective under capture; the next eager call agrees
    table = measured.local(world_size, groups.is_single_node(group))
    digests = gather(group, table.digest if table is not None else "none")
    return settle(group, digests, table)


def settle(group: str, digests: list[str], table) -> str | None:
    """Record the group's answer from every rank's digest (in rank order)."""
    agreed = table.digest if table is not None and all(d == table.digest for d in digests) else None
    if agreed is None and len(set(digests)) > 1:
        _log.warning("fusion_passes: group %r: the ranks hold different measured tables (digests %s); every "
                     "rank uses the shipped table", group, ", ".join(digests))
    _AGREED[group] = agreed  # the selector's cache needs no clearing: a Call names its table's digest
    return agreed


def reset() -> None:
    """Forget every group's answer (tests; after ``tune`` wrote a new table)."""
    _AGREED.clear()


def process_group(group: str):
    """The torch process group behind a qualified group name (vLLM: its CPU group)."""
    dialect, name = groups.split(group)
    if dialect == "vllm":
        return groups._vllm_coordinator(name).cpu_group
    return groups._resolve_c10d(name)


def gather(group: str, value) -> list:
    """Every rank's *value*, in rank order (one ``all_gather_object``)."""
    pg = process_group(group)
    out: list = [None] * dist.get_world_size(pg)
    dist.all_gather_object(out, value, group=pg)
    return out


def slowest(group: str, times: dict[str, float]) -> dict[str, float]:
    """Every rank's *times* (us per option, same options on every rank) gathered: the slowest
    rank's time per option, the same on every rank."""
    every = gather(group, dict(times))
    names = sorted(every[0])
    if any(sorted(t) != names for t in every):
        raise RuntimeError(f"fusion_passes: ranks timed different options: {[sorted(t) for t in every]}")
    return {k: max(float(t[k]) for t in every) for k in names}


def decide(group: str, times: dict[str, float]) -> tuple[str, dict[str, float]]:
    """The option every rank runs: each rank's *times* (us per option, same options on every
    rank) gathered, the slowest rank's time per option kept, rank 0 picks the fastest and
    broadcasts its pick. Returns ``(pick, slowest times)``."""
    worst = slowest(group, times)
    pg = process_group(group)
    pick = [min(sorted(worst), key=lambda k: (worst[k], k)) if dist.get_rank(pg) == 0 else None]
    dist.broadcast_object_list(pick, src=dist.get_global_rank(pg, 0), group=pg)
    return pick[0], worst
