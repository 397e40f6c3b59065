"""``python -m fusion_passes.cli ARGS`` (and ``torchrun ... -m fusion_passes.cli ARGS``): the console script."""

import sys

from fusion_passes.cli import main

sys.exit(main())
