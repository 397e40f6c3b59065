"""The registered backends, by name, and the order the selector tries them in.

Creating a backend is deferred to its first use (importing a vendor library is slow, and
fails on a machine without it). The policy that picks one per call is
:mod:`fusion_passes.backends.selector`'s, and only its.
"""

from __future__ import annotations

import functools
from typing import Callable

from fusion_passes.backends.contract import Backend

_REGISTRY: dict[str, Callable[[], Backend]] = {}
ORDER: list[str] = []


def add(name: str, factory: Callable[[], Backend], *, before: str | None = None) -> None:
    """Add a backend, tried before *before* (else last)."""
    _REGISTRY[name] = factory
    if name in ORDER:
        ORDER.remove(name)
    ORDER.insert(ORDER.index(before) if before in ORDER else len(ORDER), name)
    get.cache_clear()


def remove(name: str) -> None:
    """Take a backend out again (a test's stand-in, or a plugin that unloads)."""
    _REGISTRY.pop(name, None)
    if name in ORDER:
        ORDER.remove(name)
    get.cache_clear()


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
