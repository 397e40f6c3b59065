"""Backends that run the fused ops, and the ONE selector that picks one per call.

A backend says which fused-op *variants* it implements and, for one call, why it cannot
run it (``None`` when it can). Every policy that picks a backend is
:mod:`fusion_passes.backends.selector`'s (:func:`choose`: the backend and the rule that
decided); the backends are registered in :mod:`fusion_passes.backends.registry`, tried in
:data:`ORDER`; the reference backend runs everything, so it is always last. Every number
a backend's limits use lives in :mod:`fusion_passes.backends.thresholds`.
"""

from __future__ import annotations

from typing import Callable

from fusion_passes.backends import registry, selector, thresholds
from fusion_passes.backends.contract import Backend, Call, Slower
from fusion_passes.backends.registry import ORDER, check_name, get
from fusion_passes.backends.selector import Choice, choose, device_kind, select, table_source, why_not


def register(name: str, factory: Callable[[], Backend], *, before: str | None = None) -> None:
    """Add a backend (created lazily: importing a vendor library is deferred to first use)."""
    registry.add(name, factory, before=before)
    select.cache_clear()


def unregister(name: str) -> None:
    """Take a backend :func:`register` added out again."""
    registry.remove(name)
    select.cache_clear()


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

__all__ = ["Backend", "Call", "Choice", "ORDER", "Slower", "check_name", "choose", "device_kind", "get", "register", "unregister",
           "select", "table_source", "why_not", "thresholds"]
