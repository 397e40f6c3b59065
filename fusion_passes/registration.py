"""Registration with plain torch.compile: ``install()``, ``uninstall()``, ``enabled()``."""

from __future__ import annotations

import contextlib
import hashlib
from typing import Iterator

from fusion_passes import _compat
from fusion_passes.fusion_pass import FusionPass

_saved: list[object] = []  # the previous post_grad_custom_post_pass, one per install()


class ChainedPass(_compat.CustomGraphPass):
    """Runs a pass that was already installed, then ours (both stay in the cache key)."""

    def __init__(self, first, second: FusionPass):
        self.first, self.second = first, second

    def __call__(self, graph) -> None:
        self.first(graph)
        self.second(graph)

    def uuid(self):
        first = self.first.uuid() if hasattr(self.first, "uuid") else None
        if first is None:  # an uncacheable pass before us keeps the graph uncacheable
            return None
        return hashlib.sha256(f"{first}|{self.second.uuid()}".encode()).hexdigest()

    @property
    def report(self):
        return self.second.report


def install(**options) -> FusionPass:
    """Put a :class:`FusionPass` on ``torch._inductor.config.post_grad_custom_post_pass``.

    An existing pass there is kept and runs first. Returns our pass (read its
    ``report`` after compiling). Undo with :func:`uninstall`.
    """
    fusion = FusionPass(**options)
    current = _compat.inductor_config.post_grad_custom_post_pass
    _saved.append(current)
    _compat.inductor_config.post_grad_custom_post_pass = (
        fusion if current is None else ChainedPass(current, fusion)
    )
    return fusion


def uninstall() -> None:
    """Restore the ``post_grad_custom_post_pass`` that :func:`install` replaced."""
    if not _saved:
        raise RuntimeError("fusion_passes.uninstall(): nothing installed")
    _compat.inductor_config.post_grad_custom_post_pass = _saved.pop()


@contextlib.contextmanager
def enabled(**options) -> Iterator[FusionPass]:
    """``with fusion_passes.enabled() as p: torch.compile(model)(x); print(p.report)``."""
    fusion = install(**options)
    try:
        yield fusion
    finally:
        uninstall()
