"""Backends that run the fused ops, and the ONE selector that picks one per call.

A backend says which fused-op *variants* it implements and, for one call, why it cannot
run it (``None`` when it can). The selector walks :data:`ORDER` and takes the first
backend that can run the call; the reference backend runs everything, so it is always
last. Every number a backend's limits use lives in :mod:`fusion_passes.backends.thresholds`.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from fusion_passes.backends import thresholds
from fusion_passes.backends.contract import Backend, Call, Slower


_REGISTRY: dict[str, Callable[[], Backend]] = {}
ORDER: list[str] = []


def register(name: str, factory: Callable[[], Backend], *, before: str | None = None) -> None:
    """Add a backend (created lazily: importing a vendor library is deferred to first use)."""
    _REGISTRY[name] = factory
    if name in ORDER:
        ORDER.remove(name)
    ORDER.insert(ORDER.index(before) if before in ORDER else len(ORDER), name)
    get.cache_clear()
    select.cache_clear()


@functools.lru_cache(maxsize=None)
def get(name: str) -> Backend:
    """The backend called *name*; a clear error naming the known ones otherwise."""
    if name not in _REGISTRY:
        raise ValueError(f"fusion_passes: unknown backend {name!r}; known: {', '.join(ORDER)}")
    return _REGISTRY[name]()


def check_name(name: str) -> str:
    """*name* if it is ``"auto"`` or a registered backend; a ValueError naming the known ones
    otherwise (without importing any backend)."""
    if name != "auto" and name not in _REGISTRY:
        raise ValueError(f"fusion_passes: unknown backend {name!r}; known: auto, {', '.join(ORDER)}")
    return name


def why_not(name: str, call: Call) -> str | None:
    """Why backend *name* cannot run *call* (``None`` if it can), never raising."""
    try:
        backend = get(name)
    except Exception as e:  # noqa: BLE001 - an unimportable backend is just unavailable
        return f"{name} unavailable: {e}"
    if call.variant not in backend.variants:
        return f"{name} does not implement {call.variant}"
    try:
        return backend.unsupported(call)
    except Exception as e:  # noqa: BLE001 - e.g. a device query on a machine without that device
        return f"{name} cannot tell whether it runs this call: {type(e).__name__}: {e}"


@functools.lru_cache(maxsize=4096)
def select(call: Call, prefer: str = "auto", run_time: bool = False) -> str:
    """The backend to run *call*: *prefer* if given and able, else the first able in ORDER.

    ``run_time``: the call is made inside a fused op, where the unfused chain is no longer
    an alternative, so a :class:`Slower` decline does not count (on a GPU the measured
    kernel, a few percent behind Inductor's chain at worst, beats the eager reference). At
    compile time it does: the site then stays unfused and Inductor compiles the chain.
    """

    def able(name: str) -> bool:
        reason = why_not(name, call)
        return reason is None or (run_time and isinstance(reason, Slower))

    if prefer != "auto":
        if not able(prefer):
            raise RuntimeError(f"fusion_passes: backend {prefer!r} cannot run {call}: {why_not(prefer, call)}")
        return prefer
    for name in ORDER:
        if able(name):
            return name
    raise RuntimeError(f"fusion_passes: no backend can run {call}")  # reference runs all


def table_source(name: str, call: Call) -> str | None:
    """Which crossover table decides *call* on backend *name* (``"shipped table"`` or
    ``"measured table FILE"``), or None for a backend without one."""
    try:
        source = getattr(get(name), "table_source", None)
        return None if source is None else source(call)
    except Exception:  # noqa: BLE001 - an unimportable backend has no table
        return None


def device_kind(device: torch.device) -> str:
    """``cpu``, ``cuda`` or ``rocm`` (ROCm builds report their GPUs as ``cuda``)."""
    if device.type == "cuda" and torch.version.hip is not None:
        return "rocm"
    return device.type


def _reference() -> Backend:
    from fusion_passes.backends.reference import ReferenceBackend

    return ReferenceBackend()


register("reference", _reference)


def _triton() -> Backend:
    from fusion_passes.backends.triton import TritonBackend

    return TritonBackend()


def _flashinfer() -> Backend:
    from fusion_passes.backends.flashinfer import FlashInferBackend

    return FlashInferBackend()


def _aiter() -> Backend:
    from fusion_passes.backends.aiter import AiterBackend

    return AiterBackend()


# Vendor kernels first where they run, then ours, then the oracle. Each backend's gate
# declines shapes where it was measured (or, for vendors, documented) slower than unfused.
register("triton", _triton, before="reference")
register("flashinfer", _flashinfer, before="triton")
register("aiter", _aiter, before="flashinfer")

__all__ = ["Backend", "Call", "ORDER", "Slower", "check_name", "get", "register", "select", "table_source", "why_not", "thresholds"]
