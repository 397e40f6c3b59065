"""The options of the fusion pass (part of its cache key), validated when built."""

from __future__ import annotations

import dataclasses

from fusion_passes import backends


@dataclasses.dataclass(frozen=True)
class FusionOptions:
    """Options of :class:`fusion_passes.FusionPass`.

    ``backend``: ``"auto"`` (the selector picks per call) or the name of a registered
    backend to force (``fusion_passes.backends.ORDER``).
    ``hoist``: run the hoisting pass before matching (sinks all-reduces to their norms).
    ``hoist_casts``: let an all-reduce move across a dtype cast. OFF by default: it
    changes the precision in which the cross-rank sum is accumulated.
    ``calibrate``: measure a graph site's (variant, hidden) on this GPU before deciding it
    when the measured table does not hold it (world size 1; about 25 s per pair, once per
    machine; :mod:`fusion_passes.backends.calibrate`). OFF by default; also
    ``FUSION_PASSES_CALIBRATE=1``.

    A bad value raises ValueError here, naming the known values: a mistyped backend would
    otherwise turn every fusion off with no error.
    """

    backend: str = "auto"
    hoist: bool = True
    hoist_casts: bool = False
    calibrate: bool = False

    def __post_init__(self):
        if not isinstance(self.backend, str):
            raise ValueError(f"fusion_passes: backend must be a string, got {self.backend!r}")
        backends.check_name(self.backend)
        for name in ("hoist", "hoist_casts", "calibrate"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"fusion_passes: {name} must be True or False, got {value!r} "
                                 f"({type(value).__name__})")
