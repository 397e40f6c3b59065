"""THE table of numbers that gate backends. Every entry names its source.

Nothing else in the library holds a size, token or world-size limit. A kernel's
documented limit names the file it comes from; a measured crossover names the benchmark
command and machine that measured it.
"""

from __future__ import annotations

# Reference backend: torch.distributed + torch math. No limits: it is the oracle and the
# CPU default. (Source: it runs the unfused ops themselves.)
REFERENCE: dict[str, object] = {}
