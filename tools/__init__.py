"""Developer tools, NOT installed (the wheel holds ``fusion_passes`` only): one-off A/B
scripts and the vLLM end-to-end harness. Run from the repository root as
``python -m tools.NAME`` (or ``python tools/NAME.py`` with the package importable); they
import the library as ``fusion_passes``. The shipped command line is ``fusion_passes/cli/``."""
