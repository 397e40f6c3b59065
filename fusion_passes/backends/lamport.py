"""Workspaces of the wait-free one-shot and two-shot kernel (:mod:`fusion_passes.backends.lamport_kernels`).

A :class:`LamportWorkspace` holds what one rank's kernel needs: the addresses of every
rank's three-slot buffer (a device ``int64[WS]``), this rank's ``state`` words (parity and
counters, zero at the start) and the slot size. It is built either from torch symmetric
memory (:func:`from_symmetric_memory`, the production path: one allocation per rank,
mapped into every peer) or from buffers the caller already shares between processes
(:func:`from_peer_buffers`: CUDA IPC through ``torch.multiprocessing``, which is how the
kernel logic is tested at world sizes 2, 4 and 8 on ONE GPU, where symmetric memory
refuses several ranks). Either way every buffer must be filled with the sentinel
(:func:`arm`) before any rank's first call.
"""

from __future__ import annotations

import dataclasses
import threading

import torch

from fusion_passes import _compat

SLOTS = 3  # triple buffering: a slot is re-armed one call after its use, rewritten two calls later
STATE_WORDS = 4  # int32 words of a rank's ``state``: arrived programs, parity 0..2, elements to re-arm, unused


@dataclasses.dataclass
class LamportWorkspace:
    """One rank's view of the Lamport buffers of a group."""

    rank: int
    world_size: int
    dtype: torch.dtype
    hidden: int
    max_tokens: int
    peers: torch.Tensor | int  # device int64[world_size] of each rank's buffer address (a tensor, or its address)
    state: torch.Tensor  # int32[STATE_WORDS] on the device, zeros at the start
    keep: object = None  # what keeps the buffers mapped (symmetric-memory handle, IPC tensors)

    @property
    def slot_elems(self) -> int:
        """A slot: ``world_size`` input regions + one gather region (two-shot) of ``[max_tokens, hidden]``."""
        return (self.world_size + 1) * self.max_tokens * self.hidden

    def fits(self, tokens: int, hidden: int, dtype: torch.dtype) -> bool:
        return dtype == self.dtype and hidden == self.hidden and tokens <= self.max_tokens


def sentinel(dtype: torch.dtype) -> tuple[torch.dtype, int]:
    """``(integer view dtype, bits of -0.0)`` for an activation dtype."""
    if dtype in (torch.bfloat16, torch.float16):
        return torch.int16, -(1 << 15)
    if dtype == torch.float32:
        return torch.int32, -(1 << 31)
    raise TypeError(f"fusion_passes: the Lamport one-shot takes bf16, fp16 or fp32, got {dtype}")


def buffer_elems(world_size: int, max_tokens: int, hidden: int) -> int:
    """Elements of one rank's buffer: three slots of ``[world_size + 1, max_tokens, hidden]``."""
    return SLOTS * (world_size + 1) * max_tokens * hidden


def arm(buffer: torch.Tensor) -> torch.Tensor:
    """Fill *buffer* (the activation dtype) with the sentinel -0.0; returns it."""
    view, bits = sentinel(buffer.dtype)
    buffer.view(view).fill_(bits)
    return buffer


def from_peer_buffers(buffers: list[torch.Tensor], rank: int, max_tokens: int, hidden: int) -> LamportWorkspace:
    """A workspace over buffers already mapped in this process, one per rank in rank order
    (this rank's own and its peers', e.g. received through ``torch.multiprocessing``)."""
    world = len(buffers)
    dtype = buffers[rank].dtype
    need = buffer_elems(world, max_tokens, hidden)
    for r, b in enumerate(buffers):
        if b.dtype != dtype or b.numel() < need or not b.is_contiguous() or b.device != buffers[rank].device:
            raise ValueError(f"fusion_passes: Lamport buffer of rank {r} must be a contiguous {dtype} tensor of at "
                             f"least {need} elements on {buffers[rank].device}, got {b.dtype} {tuple(b.shape)}")
    device = buffers[rank].device
    peers = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.int64, device=device)
    state = torch.zeros(STATE_WORDS, dtype=torch.int32, device=device)
    return LamportWorkspace(rank, world, dtype, hidden, max_tokens, peers, state, keep=buffers)


def from_symmetric_memory(group_name: str, max_tokens: int, hidden: int, dtype: torch.dtype,
                          device: torch.device) -> LamportWorkspace:
    """Allocate, arm and rendezvous one symmetric buffer per rank of *group_name* (collective)."""
    symm_mem = _compat.symmetric_memory()
    world = torch.distributed.get_world_size(_resolve(group_name))
    buffer = arm(symm_mem.empty(buffer_elems(world, max_tokens, hidden), dtype=dtype, device=device))
    torch.cuda.synchronize(device)  # armed before any peer can write into it
    handle = symm_mem.rendezvous(buffer, group_name)
    state = torch.zeros(STATE_WORDS, dtype=torch.int32, device=device)
    return LamportWorkspace(handle.rank, world, dtype, hidden, max_tokens, handle.buffer_ptrs_dev, state,
                            keep=(buffer, handle))


_LOCK = threading.Lock()
_WORKSPACES: dict[tuple, LamportWorkspace] = {}


def get(group: str, tokens: int, hidden: int, dtype: torch.dtype, device: torch.device) -> LamportWorkspace:
    """The group's workspace for calls of up to *tokens* rows (grown eagerly and collectively,
    to a power of two of tokens; never while a CUDA graph is being captured)."""
    from fusion_passes.backends.symm import c10d_group_name

    name = c10d_group_name(group)
    key = (name, device.index if device.index is not None else torch.cuda.current_device(), dtype, hidden)
    ws = _WORKSPACES.get(key)
    if ws is not None and ws.max_tokens >= tokens:
        return ws
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"fusion_passes: the wait-free path needs a workspace for {tokens} tokens of group {group!r} "
            f"but {0 if ws is None else ws.max_tokens} are registered while a CUDA graph is being captured "
            "(allocation is collective). Run one eager call at the largest size first.")
    with _LOCK:
        ws = _WORKSPACES.get(key)
        if ws is None or ws.max_tokens < tokens:
            _WORKSPACES[key] = ws = from_symmetric_memory(name, 1 << max(0, (tokens - 1).bit_length()), hidden,
                                                          dtype, device)
    return ws


def install(group: str, ws: LamportWorkspace, device: torch.device) -> None:
    """Use *ws* for *group* on *device* from now on (tests: a workspace over IPC-shared
    buffers, so the backend's wait-free paths run with several ranks on ONE GPU, where
    symmetric memory refuses them)."""
    from fusion_passes.backends.symm import c10d_group_name

    key = (c10d_group_name(group), device.index if device.index is not None else torch.cuda.current_device(),
           ws.dtype, ws.hidden)
    with _LOCK:
        _WORKSPACES[key] = ws


def clear() -> None:
    """Forget every workspace (tests; before destroying a process group)."""
    with _LOCK:
        _WORKSPACES.clear()


def _resolve(group_name: str):
    return _compat.resolve_process_group(group_name)


__all__ = ["LamportWorkspace", "SLOTS", "arm", "buffer_elems", "clear", "from_peer_buffers",
           "from_symmetric_memory", "get", "install", "sentinel"]
