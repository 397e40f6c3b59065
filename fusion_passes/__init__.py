"""fusion-passes: fuse tensor-parallel all-reduce + residual add + RMSNorm (+ quant).

Public API::

    fusion_passes.FusionPass(**options)   # a torch._inductor CustomGraphPass
    fusion_passes.install(**options)      # onto post_grad_custom_post_pass
    fusion_passes.uninstall()
    fusion_passes.enabled(**options)      # context manager
    fusion_passes.FusionReport            # FusionPass.report after each graph
    fusion_passes.FusionOptions

The fused ops are ``torch.ops.fusion_passes.*`` (see :mod:`fusion_passes.ops`).
"""

from fusion_passes import ops  # noqa: F401  (registers torch.ops.fusion_passes.*)
from fusion_passes.fusion_pass import FusionPass
from fusion_passes.registration import enabled, install, uninstall
from fusion_passes.options import FusionOptions
from fusion_passes.report import FusionReport, SiteReport

__all__ = ["FusionPass", "FusionOptions", "FusionReport", "SiteReport", "enabled", "install", "uninstall"]
__version__ = "0.1.0"
