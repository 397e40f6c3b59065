"""The options of the fusion pass (part of its cache key)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class FusionOptions:
    """Options of :class:`fusion_passes.FusionPass`.

    ``backend``: ``"auto"`` (the selector picks per call) or a backend name to force.
    ``hoist``: run the hoisting pass before matching (sinks all-reduces to their norms).
    ``hoist_casts``: let an all-reduce move across a dtype cast. OFF by default: it
    changes the precision in which the cross-rank sum is accumulated.
    ``debug_fail``: a test hook that makes the rewrite raise (crash-safety tests).
    """

    backend: str = "auto"
    hoist: bool = True
    hoist_casts: bool = False
    debug_fail: bool = False

    def __post_init__(self):
        if not isinstance(self.backend, str) or not self.backend:
            raise ValueError(f"fusion_passes: backend must be a backend name or 'auto', got {self.backend!r}")
