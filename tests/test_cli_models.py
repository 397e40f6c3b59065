"""Small models and graphs the command-line tests share (no tests here).

``tiny_block`` is a ``module:function`` spec for ``fusion-passes dump`` / ``explain``:
two row-parallel linears, each all-reduced into a residual add + RMSNorm, the second
through a ``relu`` that must block its fusion. The ``*_graph`` helpers trace the same
shapes with make_fx (no compile) and write the dumps the diff/explain tests read.
"""

from __future__ import annotations

import pathlib

import torch
import torch.distributed as dist

HIDDEN = 64
TOKENS = 8
MODEL = "test_cli_models:relu_block"


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    c10d = torch.ops._c10d_functional
    return c10d.wait_tensor(c10d.all_reduce(x, "sum", dist.group.WORLD.group_name))


class TinyBlock(torch.nn.Module):
    """attention-like block (fuses) then an MLP-like block whose all-reduce feeds a relu."""

    def __init__(self, hidden: int = HIDDEN):
        super().__init__()
        self.o_proj = torch.nn.Linear(hidden, hidden, bias=False)
        self.down_proj = torch.nn.Linear(hidden, hidden, bias=False)
        self.norm1 = torch.nn.RMSNorm(hidden, eps=1e-6)
        self.norm2 = torch.nn.RMSNorm(hidden, eps=1e-6)

    def forward(self, x, residual):
        residual = _all_reduce(self.o_proj(x)) + residual
        h = self.norm1(residual)
        mlp = torch.relu(_all_reduce(self.down_proj(h)))  # the relu blocks this all-reduce
        return self.norm2(residual + mlp)


def tiny_block():
    """``(model, example_inputs)`` for ``fusion-passes dump test_cli_models:tiny_block``."""
    torch.manual_seed(0)
    return TinyBlock(), (torch.randn(TOKENS, HIDDEN), torch.randn(TOKENS, HIDDEN))


def one_input_block():
    """``(model, (x,))``: :class:`TinyBlock` with the input as its residual too (README's
    snippet calls ``compiled(inputs)`` with one tensor), for inference: no parameter wants
    a gradient (else AOT autograd keeps the all-reduce's value for the backward pass, a
    second user that blocks the fusion)."""
    torch.manual_seed(0)

    class OneInput(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = TinyBlock()

        def forward(self, x):
            return self.block(x, x)

    return OneInput().requires_grad_(False), (torch.randn(TOKENS, HIDDEN),)


def relu_block(x, res, w, w2, x2):
    """make_fx form: AR -> add -> norm fuses; AR -> relu -> add -> norm is blocked by relu."""
    s = _all_reduce(x) + res
    h = _norm(s, w)
    y = torch.relu(_all_reduce(x2 + h))
    return (_norm(s + y, w2),)


def two_sites(x, res, w, w2, x2):
    """Two sites that both fuse (the second's sum goes unused: the final-norm family)."""
    s = _all_reduce(x) + res
    h = _norm(s, w)
    s2 = s + _all_reduce(x2 + h)
    return (_norm(s2, w2),)


def _norm(x, w, eps=1e-6):
    dt = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * w.to(torch.float32)).to(dt)


def example_args(dtype=torch.bfloat16):
    torch.manual_seed(0)
    act = [torch.randn(TOKENS, HIDDEN, dtype=dtype) for _ in range(2)]
    weights = [torch.randn(HIDDEN, dtype=dtype) for _ in range(2)]
    return (*act, *weights, torch.randn(TOKENS, HIDDEN, dtype=dtype))


def write_dumps(fn, model: str, out: pathlib.Path, **options) -> tuple[pathlib.Path, pathlib.Path]:
    """Trace *fn* with make_fx, run FusionPass, write ``before`` and ``fused`` dumps."""
    from fusion_passes import FusionPass
    from fusion_passes.cli import graphio
    from fusion_passes.cli.recorder import explain_extras
    from torch.fx.experimental.proxy_tensor import make_fx

    with torch.no_grad():
        gm = make_fx(fn, tracing_mode="fake")(*example_args())
    before = graphio.graph_to_dict(gm.graph, stage="before", model=model)
    fusion = FusionPass(**options)
    fusion(gm.graph)
    fused = graphio.graph_to_dict(gm.graph, stage="fused", model=model, report=explain_extras(fusion.report))
    out.mkdir(parents=True, exist_ok=True)
    pa, pb = out / "graph_0.before.json", out / "graph_0.fused.json"
    pa.write_text(graphio.dumps(before))
    pb.write_text(graphio.dumps(fused))
    return pa, pb


GOLDEN = pathlib.Path(__file__).parent / "golden"
REGEN = "FUSION_PASSES_REGEN_GOLDEN"


def check_golden(name: str, text: str) -> None:
    """Compare *text* with ``tests/golden/<name>``; ``FUSION_PASSES_REGEN_GOLDEN=1`` rewrites it
    (then review the change with ``git diff tests/golden``)."""
    import os

    path = GOLDEN / name
    if os.environ.get(REGEN):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"missing golden {path}; generate it with {REGEN}=1 and review it"
    assert text == path.read_text(), f"output differs from {path} (regenerate with {REGEN}=1 and review)"


def normalise(text: str) -> str:
    """Drop what differs between machines: the torch version written into dumps."""
    import re

    return re.sub(r'"torch": "[^"]*"', '"torch": "X"', text)
