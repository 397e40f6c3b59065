"""What a backend does with a call its kernel would compute differently (the selector's
``<backend> declined`` rule: answered unfused), and the shape the vendor adapters share
(:class:`VendorBackend`)."""

from __future__ import annotations

import functools
import importlib.util
import logging

from fusion_passes.variants import FusedArgs, FusedOutputs

_log = logging.getLogger("fusion_passes")
_LOGGED: set[tuple[str, str]] = set()


def run_on_reference(backend: str, why: str, variant: str, args: FusedArgs) -> FusedOutputs:
    """Answer one call with the unfused chain (correct, just not fused), logging why once."""
    from fusion_passes.backends.reference import ReferenceBackend

    if (backend, str(why)) not in _LOGGED:
        _LOGGED.add((backend, str(why)))
        _log.warning("fusion_passes: %s runs %s unfused: %s", backend, variant, why)
    return ReferenceBackend().run(variant, args)


def not_installed(module: str, reason: str, installed: bool | None = None) -> str | None:
    """*reason* when the vendor *module* cannot be imported here, else None (*installed*
    overrides the lookup, for tests)."""
    if not (importlib.util.find_spec(module) is not None if installed is None else installed):
        return reason
    return None


class VendorBackend:
    """The shape of a vendor adapter: the vendor module (``comm``) is injected by tests or
    imported on first use (:meth:`_import_comm`); :meth:`run` asks the selector
    (:func:`~fusion_passes.backends.selector.for_run`, which asks the adapter's
    ``declines``) and calls the method named for the variant, or answers a declined call
    with the unfused chain (before any vendor call)."""

    name: str
    variants: frozenset[str]

    def __init__(self, comm=None) -> None:
        self._injected = comm  # tests pass a fake; otherwise the vendor module on first run

    def _import_comm(self):
        raise NotImplementedError

    @functools.cached_property
    def _comm(self):
        if self._injected is not None:
            return self._injected
        return self._import_comm()

    def run(self, variant: str, args: FusedArgs) -> FusedOutputs:
        """Run one fused call of *variant* with the vendor's kernel, or unfused (see above)."""
        if variant not in self.variants:
            raise ValueError(f"fusion_passes: the {self.name} backend does not implement {variant!r}")
        from fusion_passes.backends import selector

        choice = selector.for_run(self, variant, args)
        if choice.backend != self.name:
            return run_on_reference(self.name, choice.why, variant, args)
        return getattr(self, variant)(args)
