"""What a vendor backend does with a call its kernel would compute differently."""

from __future__ import annotations

import logging

from fusion_passes.variants import FusedArgs, FusedOutputs

_log = logging.getLogger("fusion_passes")
_LOGGED: set[tuple[str, str]] = set()


class Unfusable(NotImplementedError):
    """This call's options are outside what the vendor kernel computes identically."""


def run_on_reference(backend: str, why: Exception, variant: str, args: FusedArgs) -> FusedOutputs:
    """Answer one call with the unfused chain (correct, just not fused), logging why once."""
    from fusion_passes.backends.reference import ReferenceBackend

    if (backend, str(why)) not in _LOGGED:
        _LOGGED.add((backend, str(why)))
        _log.warning("fusion_passes: %s runs %s unfused: %s", backend, variant, why)
    return ReferenceBackend().run(variant, args)
