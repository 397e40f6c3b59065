"""The ``fusion-passes`` command line (installed as ``fusion_passes.tools``)."""
