"""Registration with plain torch.compile: ``install()``, ``uninstall()``, ``enabled()``.

Inductor has ONE ``post_grad_custom_post_pass`` slot. :func:`install` puts our pass there,
chained after any pass already in it; :func:`uninstall` puts back what was there. Others
may write the slot too, so both check what they find:

* ``install()`` while our pass is installed: with the same options it returns the
  installed pass (nothing stacks: a second copy would find no all-reduce left and report
  "0/n fused"); with other options it raises, naming both (call ``uninstall()`` first).
* ``uninstall()`` after someone replaced the slot's content: it keeps what it finds
  there (never drops a pass it did not install) and warns that the slot was changed.

Threads. torch 2.14 keeps ``torch._inductor.config`` assignments per thread, while a
server compiles in worker threads. So the installation is process-wide: ``install()``
sets the slot for every thread (:func:`fusion_passes._compat.set_inductor_config_everywhere`),
and ``uninstall()`` from any thread puts back, for every thread, what the installing
thread saw. A thread that assigned the slot itself keeps its own value (torch's rule).
``enabled()`` blocks in several threads share one installation: the last block to leave
takes it off (unless ``install()`` made it), and ``uninstall()`` refuses while a block is
inside. One lock orders all of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import threading
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
    previous: object  # what the installing thread's slot held before
    explicit: bool = False  # install() made it (enabled() blocks leave it on)
    blocks: int = 0  # enabled() blocks inside, in any thread


_installed: _Installed | None = None
_lock = threading.RLock()
_SLOT = "post_grad_custom_post_pass"


def _slot():
    """What the calling thread's Inductor reads from the slot."""
    return getattr(_compat.inductor_config, _SLOT)


def install(**options) -> FusionPass:
    """Put a :class:`FusionPass` on ``torch._inductor.config.post_grad_custom_post_pass``
    for every thread of the process.

    An existing pass there is kept and runs first. Returns our pass (read its ``report``
    after compiling). Undo with :func:`uninstall`. Installing again with the same options
    returns the pass already installed; with other options it raises ``RuntimeError``.
    """
    with _lock:
        fusion = _install(FusionPass(**options))
        _installed.explicit = True
        return fusion


def _install(fusion: FusionPass) -> FusionPass:
    global _installed
    if _installed is not None:
        return _reuse(_installed, fusion)
    current = _slot()
    slot = fusion if current is None else ChainedPass(current, fusion)
    _compat.set_inductor_config_everywhere(_SLOT, slot)
    _installed = _Installed(fusion, slot, current)
    return fusion


def _reuse(installed: _Installed, fusion: FusionPass) -> FusionPass:
    """The installed pass for a second install() with *fusion*'s options, or an error."""
    if installed.fusion.options != fusion.options:
        raise RuntimeError(f"fusion_passes.install(): already installed with {installed.fusion.options}; "
                           f"call fusion_passes.uninstall() before installing with {fusion.options}")
    here = _slot()
    if here is installed.previous and here is not installed.slot:
        # this thread's own assignment is what install() chained (a config.patch of the slot
        # left it): drop it, so this thread reads the installation too
        _compat.set_inductor_config_everywhere(_SLOT, installed.slot)
    elif here is not installed.slot:
        raise RuntimeError(f"fusion_passes.install(): installed, but this thread assigned {_SLOT} itself "
                           f"({here!r}), which hides the pass here (torch keeps config assignments per "
                           f"thread); call fusion_passes.uninstall() first")
    return installed.fusion


def uninstall() -> None:
    """Restore, for every thread, the ``post_grad_custom_post_pass`` that :func:`install`
    replaced. Any thread may call it.

    If the calling thread's slot holds neither what :func:`install` put there nor what
    it replaced (a pass was set in this thread), that pass is kept and a ``UserWarning``
    says so. Raises ``RuntimeError`` while an :func:`enabled` block is inside (in any
    thread).
    """
    global _installed
    with _lock:
        if _installed is None:
            raise RuntimeError("fusion_passes.uninstall(): nothing installed")
        if _installed.blocks:
            raise RuntimeError(f"fusion_passes.uninstall(): {_installed.blocks} fusion_passes.enabled() "
                               f"block(s) still inside; the last to leave takes the pass off")
        installed, _installed = _installed, None
        here = _slot()
        _compat.set_inductor_config_everywhere(_SLOT, installed.previous)
        if here is installed.slot or here is installed.previous:
            return
        setattr(_compat.inductor_config, _SLOT, here)  # keep this thread's own assignment
    warnings.warn(f"fusion_passes.uninstall(): {_SLOT} was changed after install() (this thread now "
                  f"holds {here!r}, assigned in this thread); keeping it as it is", stacklevel=2)


@contextlib.contextmanager
def enabled(**options) -> Iterator[FusionPass]:
    """``with fusion_passes.enabled() as p: torch.compile(model)(x); print(p.report)``.

    Blocks in several threads share one installation (they must ask for the same options),
    and the last to leave takes it off. Inside an :func:`install` with the same options it
    yields the installed pass and leaves it installed on exit.
    """
    with _lock:
        fusion = _install(FusionPass(**options))
        _installed.blocks += 1
    try:
        yield fusion
    finally:
        with _lock:
            _installed.blocks -= 1
            if not _installed.blocks and not _installed.explicit:
                uninstall()
