"""fusion-passes: fuse tensor-parallel all-reduce + residual add + RMSNorm (+ quant).

Public API::

    fusion_passes.FusionPass(**options)   # a torch._inductor CustomGraphPass
    fusion_passes.install(**options)      # onto post_grad_custom_post_pass
    fusion_passes.uninstall()
    fusion_passes.enabled(**options)      # context manager
    fusion_passes.FusionReport            # FusionPass.report after each graph
    fusion_passes.FusionOptions

The fused ops are ``torch.ops.fusion_passes.*`` (see :mod:`fusion_passes.ops`), registered
by ``import fusion_passes``.

One exception: in the ``fusion-passes`` console script these imports (torch among them,
seconds of work) wait until a command needs them, so ``fusion-passes --help`` answers at
once; :func:`fusion_passes.cli.main` runs them before any command.
"""

import os as _os
import sys as _sys

__all__ = ["FusionPass", "FusionOptions", "FusionReport", "SiteReport", "enabled", "install", "uninstall"]
__version__ = "0.1.0"


def _load() -> None:
    """Import the public names, registering ``torch.ops.fusion_passes.*`` (idempotent)."""
    global FusionPass, FusionOptions, FusionReport, SiteReport, enabled, install, uninstall
    from fusion_passes import ops  # noqa: F401  (register torch.ops.fusion_passes.*)
    from fusion_passes.recognize.meaning import outputs  # noqa: F401  (registers fusion_passes::e2m1_values)
    from fusion_passes.fusion_pass import FusionPass
    from fusion_passes.options import FusionOptions
    from fusion_passes.registration import enabled, install, uninstall
    from fusion_passes.report import FusionReport, SiteReport


def __getattr__(name: str):
    """The public names, imported on first use (reached only in the console script)."""
    if name in __all__:
        _load()
        return globals()[name]
    raise AttributeError(f"module 'fusion_passes' has no attribute {name!r}")


def _console_script() -> bool:
    """Whether this process is the ``fusion-passes`` console script starting up."""
    argv = getattr(_sys, "argv", None) or [""]
    return _os.path.basename(argv[0]).removesuffix(".exe") == "fusion-passes"


if not _console_script():
    _load()
