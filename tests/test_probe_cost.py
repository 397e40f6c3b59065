"""Recognition by meaning probes a few rows of the real hidden size, never the graph's full
activation (issue 20, item 2): the largest tensor the pass makes does not grow with the
token count. The compile-time figures (with and without the pass, separate processes)
come from ``tests/probe_cost.py``; the commands are in its docstring."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._python_dispatch import TorchDispatchMode

from probe_cost import chain as maximum_chain
from test_dump_safety import native_chain

HIDDEN = 4096
ROWS = 16  # fusion_passes.recognize.meaning.probe_sizes.TOKENS: the most rows a probe holds


class _Largest(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and not _is_fake(t):
                self.numel = max(self.numel, t.numel())
        return out


def _is_fake(t) -> bool:
    from fusion_passes import _compat

    return isinstance(t, _compat.FakeTensor)


def _largest(fn, tokens: int) -> tuple[int, object]:
    """The largest real tensor the pass makes on *fn* traced at *tokens* x HIDDEN (fake:
    tracing allocates nothing), and the pass's report."""
    from fusion_passes import FusionPass
    from fusion_passes.recognize import meaning as semantic

    args = [torch.empty(tokens, HIDDEN, dtype=torch.bfloat16) for _ in range(2)]
    args.append(torch.empty(HIDDEN, dtype=torch.bfloat16))
    with torch.no_grad():
        gm = make_fx(fn, tracing_mode="fake")(*args)
    semantic._CACHE.clear()  # every token count probed, not read from the cache
    p = FusionPass()
    with _Largest() as rec:
        p(gm.graph)
    return rec.numel, p.report


@pytest.mark.parametrize("fn, fused", [(maximum_chain, False), (native_chain, True)], ids=["maximum", "native"])
def test_probes_do_not_grow_with_the_token_count(fake_pg, fn, fused):
    small, report_small = _largest(fn, 64)
    large, report_large = _largest(fn, 2048)
    assert [s.fused for s in report_small.sites] == [s.fused for s in report_large.sites] == [fused]
    assert large == small <= 2 * ROWS * HIDDEN
