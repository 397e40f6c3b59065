"""Symmetric-memory workspaces for the Triton backend: allocated and registered ONCE.

A fused kernel of the Triton backend reads its peers' copies of the input straight out
of their memory. That memory must be *symmetric* (``torch.distributed._symmetric_memory``:
one allocation per rank, mapped into every peer, plus a zero-filled signal pad per rank
for barriers). Allocation and ``rendezvous`` are collective and slow, and must never
happen while a CUDA graph is being captured, so:

* one workspace per ``(group, device)``, at least as large as the largest call seen so
  far; a larger call (eager, e.g. vLLM's warm-up at the maximum batch) grows it once,
  collectively, and every smaller call reuses it;
* :func:`reserve` lets a caller register the maximum size up front (before capture);
* during capture a call that does not fit raises a clear error instead of allocating.

The input is copied into the workspace *inside* the fused kernel (one read of the
input, one write of the workspace), so a call needs no extra launch. The kernel's last
barrier guarantees that no peer still reads this rank's workspace when the next call
overwrites it; the signal pad returns to all zeros after every barrier, so the
protocol needs no host-side counter and replays under CUDA graphs.

Multicast (``multimem``, ``cuMulticastCreate``) is never used: the one-shot kernel reads
peers with ordinary loads over NVLink/P2P.
"""

from __future__ import annotations

import dataclasses
import threading
import warnings

import torch

from fusion_passes import _compat, groups


@dataclasses.dataclass
class Workspace:
    """One registered symmetric buffer and what a kernel needs to reach its peers."""

    group_name: str  # the c10d group name it was rendezvoused on
    buffer: torch.Tensor  # this rank's bytes (uint8)
    handle: object  # torch's _SymmetricMemory handle (keeps the mapping alive)
    rank: int
    world_size: int
    buffer_ptrs_dev: int  # device array of world_size uint64 peer buffer pointers
    signal_pad_ptrs_dev: int  # device array of world_size uint64 peer signal-pad pointers
    signal_pad_bytes: int

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()


_LOCK = threading.Lock()
_WORKSPACES: dict[tuple[str, int], Workspace] = {}


def c10d_group_name(group: str) -> str:
    """The torch process-group name behind a fused op's ``group`` string.

    ``"c10d:<name>"`` is already one; for ``"vllm:<name>"`` it is the name of the vLLM
    coordinator's device group (NCCL), which is what symmetric memory rendezvouses on.
    """
    dialect, name = groups.split(group)
    if dialect == "c10d":
        return name
    coordinator = _compat.vllm_group(name)
    if coordinator is None:
        raise ValueError(f"fusion_passes: vLLM group {name!r} does not exist (or was destroyed)")
    return coordinator.device_group.group_name


def _round_up_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def get(group: str, nbytes: int, device: torch.device) -> Workspace:
    """A workspace of at least *nbytes* on *device* for *group*; grows eagerly, never in capture.

    Every rank of the process group must call this with the same *nbytes* (true for the fused op:
    all ranks run the same call), since growing is collective.
    """
    name = c10d_group_name(group)
    key = (name, device.index if device.index is not None else torch.cuda.current_device())
    ws = _WORKSPACES.get(key)
    if ws is not None and ws.nbytes >= nbytes:
        return ws
    if torch.cuda.is_current_stream_capturing():
        have = 0 if ws is None else ws.nbytes
        raise RuntimeError(
            f"fusion_passes: the Triton backend needs a {nbytes}-byte symmetric workspace for "
            f"group {group!r} but only {have} bytes are registered, and a CUDA graph is being "
            "captured (registration is collective and cannot be captured). Run one eager call "
            "at the largest size first, or call fusion_passes.backends.symm.reserve()."
        )
    with _LOCK:
        ws = _WORKSPACES.get(key)
        if ws is not None and ws.nbytes >= nbytes:
            return ws
        _WORKSPACES[key] = ws = _allocate(name, _round_up_pow2(nbytes), device)
    return ws


def reserve(group: str, max_tokens: int, hidden: int, dtype: torch.dtype, device=None) -> Workspace:
    """Register the workspace for calls up to ``[max_tokens, hidden]`` now (collective)."""
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return get(group, max_tokens * hidden * itemsize, device)


def _allocate(name: str, nbytes: int, device: torch.device) -> Workspace:
    symm_mem = _compat.symmetric_memory()
    enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
    if enable is not None:  # required before torch 2.9, a deprecated no-op after
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            try:
                enable(name)
            except Exception:  # noqa: BLE001 - already enabled / no longer needed
                pass
    buffer = symm_mem.empty(nbytes, dtype=torch.uint8, device=device)
    handle = symm_mem.rendezvous(buffer, name)
    return Workspace(
        group_name=name,
        buffer=buffer,
        handle=handle,
        rank=handle.rank,
        world_size=handle.world_size,
        buffer_ptrs_dev=handle.buffer_ptrs_dev,
        signal_pad_ptrs_dev=handle.signal_pad_ptrs_dev,
        signal_pad_bytes=_compat.symmetric_memory_signal_pad_bytes(),
    )


COLLECTIVES = ("nccl", "symm_one_shot", "symm_two_shot")
"""The unfused chain's collectives ``fusion-passes tune`` times at world size N (its
``best_unfused`` names one, ``COLLECTIVE+FORM``)."""


def collective_of(best_unfused: str | None) -> str | None:
    """The collective of a measured ``best_unfused`` (``"symm_one_shot+tokdyn"`` ->
    ``"symm_one_shot"``), or None where it names none of :data:`COLLECTIVES`."""
    name = (best_unfused or "").partition("+")[0]
    return name if name in COLLECTIVES else None


def all_reduce(x: torch.Tensor, group: str, collective: str | None) -> torch.Tensor:
    """Sum *x* over *group* with *collective*, the fastest one the measured table names:
    torch's symmetric-memory one-shot or two-shot (``torch.ops.symm_mem``) through this
    group's workspace, for a ``c10d`` group; else (NCCL, nothing measured, or a vLLM group,
    whose communicator already picks its own fastest) the group's own collective
    (:func:`fusion_passes.groups.all_reduce`, what the unfused graph ran). The two-shot
    reduces in place, so its result lives in the workspace until the next call on the
    group, which the caller's stream orders after every read of it.

    NOT EXECUTED at world size > 1: no machine with several GPUs was lent (the selection
    is tested on CPU, tests/test_symm_collective.py)."""
    if collective not in ("symm_one_shot", "symm_two_shot") or groups.split(group)[0] != "c10d":
        return groups.all_reduce(x, group)
    nbytes = x.numel() * x.element_size()
    ws = get(group, nbytes, x.device)
    buf = ws.buffer[:nbytes].view(x.dtype).view(x.shape)
    buf.copy_(x)
    if collective == "symm_one_shot":
        return torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", ws.group_name)
    torch.ops.symm_mem.two_shot_all_reduce_(buf, "sum", ws.group_name)
    return buf


def clear() -> None:
    """Forget every workspace (tests; before destroying a process group)."""
    with _LOCK:
        _WORKSPACES.clear()


__all__ = ["Workspace", "get", "reserve", "clear", "c10d_group_name", "COLLECTIVES", "collective_of", "all_reduce"]
