"""The token range the graph being compiled serves (vLLM's compile ranges).

vLLM compiles one graph per range of token counts and tells each pass the range
(``PassContext.compile_range``). :class:`fusion_passes.vllm.VllmFusionPass` sets it here
while the pass runs, and the matcher hands it to the selector with every graph site
(``Call.token_range``): a range in which every measured size was slower than the unfused
chain stays unfused; a range straddling a crossover is fused and each call picks its path
from the table at run time. Outside a range (plain ``torch.compile``): any token count.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

_RANGE: contextvars.ContextVar[tuple[int, int | None] | None] = contextvars.ContextVar(
    "fusion_passes_compile_range", default=None)


def current() -> tuple[int, int | None] | None:
    """``(lo, hi)`` inclusive (hi None: no upper end) while a range is set, else None."""
    return _RANGE.get()


@contextlib.contextmanager
def serving(lo: int | None, hi: int | None) -> Iterator[None]:
    """Inside, graph sites serve token counts ``lo..hi`` (``lo`` None: no range)."""
    token = _RANGE.set(None if lo is None else (max(1, int(lo)), None if hi is None else int(hi)))
    try:
        yield
    finally:
        _RANGE.reset(token)
