"""Registration with plain torch.compile: ``install()``, ``uninstall()``, ``enabled()``.

Inductor has ONE ``post_grad_custom_post_pass`` slot. :func:`install` puts our pass there,
chained after any pass already in it; :func:`uninstall` puts back what was there. Others
may write the slot too, so both check what they find:

* ``install()`` while our pass is installed: with the same options it returns the
  installed pass (nothing stacks: a second copy would find no all-reduce left and report
  "0/n fused"); with other options it raises, naming both (call ``uninstall()`` first).
* ``uninstall()`` after someone replaced the slot's content: it keeps what it finds
  there (never drops a pass it did not install) and warns that the slot was changed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import warnings
from typing import Iterator

from fusion_passes import _compat
from fusion_passes.fusion_pass import FusionPass


class ChainedPass(_compat.CustomGraphPass):
    """Runs a pass that was already installed, then ours (both stay in the cache key)."""

    def __init__(self, first, second: FusionPass):
        self.first, self.second = first, second

    def __call__(self, graph) -> None:
        self.first(graph)
        self.second(graph)

    def uuid(self):
        """Both passes' keys; ``None`` (uncacheable) when the first pass has none."""
        first = self.first.uuid() if hasattr(self.first, "uuid") else None
        if first is None:  # an uncacheable pass before us keeps the graph uncacheable
            return None
        return hashlib.sha256(f"{first}|{self.second.uuid()}".encode()).hexdigest()

    @property
    def report(self):
        """Our pass's report of the last graph."""
        return self.second.report


@dataclasses.dataclass
class _Installed:
    fusion: FusionPass  # what install() returned
    slot: object  # what install() put in the slot: fusion, or a ChainedPass around it
    previous: object  # what the slot held before


_installed: _Installed | None = None


def _slot():
    return _compat.inductor_config.post_grad_custom_post_pass


def install(**options) -> FusionPass:
    """Put a :class:`FusionPass` on ``torch._inductor.config.post_grad_custom_post_pass``.

    An existing pass there is kept and runs first. Returns our pass (read its ``report``
    after compiling). Undo with :func:`uninstall`. Installing again with the same options
    returns the pass already installed; with other options it raises ``RuntimeError``.
    """
    global _installed
    fusion = FusionPass(**options)
    if _installed is not None and _slot() is _installed.slot:
        if _installed.fusion.options == fusion.options:
            return _installed.fusion
        raise RuntimeError(f"fusion_passes.install(): already installed with {_installed.fusion.options}; "
                           f"call fusion_passes.uninstall() before installing with {fusion.options}")
    current = _slot()
    slot = fusion if current is None else ChainedPass(current, fusion)
    _compat.inductor_config.post_grad_custom_post_pass = slot
    _installed = _Installed(fusion, slot, current)
    return fusion


def uninstall() -> None:
    """Restore the ``post_grad_custom_post_pass`` that :func:`install` replaced.

    If the slot no longer holds what :func:`install` put there (a pass was set after it),
    that pass is kept and a ``UserWarning`` says so.
    """
    global _installed
    if _installed is None:
        raise RuntimeError("fusion_passes.uninstall(): nothing installed")
    installed, _installed = _installed, None
    if _slot() is installed.slot:
        _compat.inductor_config.post_grad_custom_post_pass = installed.previous
        return
    warnings.warn(f"fusion_passes.uninstall(): post_grad_custom_post_pass was changed after install() (it now "
                  f"holds {_slot()!r}); keeping it as it is", stacklevel=2)


@contextlib.contextmanager
def enabled(**options) -> Iterator[FusionPass]:
    """``with fusion_passes.enabled() as p: torch.compile(model)(x); print(p.report)``.

    Inside an :func:`install` with the same options it yields the installed pass and
    leaves it installed on exit.
    """
    already = _installed is not None and _slot() is _installed.slot
    fusion = install(**options)
    try:
        yield fusion
    finally:
        if not already:
            uninstall()
