"""Small tensor-parallel graphs for the unit tests, traced with make_fx (no compile)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.fx.experimental.proxy_tensor import make_fx

from fusion_passes.fx_util import op_name

c10d = torch.ops._c10d_functional


def group_name() -> str:
    return dist.group.WORLD.group_name


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """The plain-PyTorch dialect's all-reduce, as DTensor / HF tp_plan emit it."""
    return c10d.wait_tensor(c10d.all_reduce(x, "sum", group_name()))


def hf_rms_norm(x, w, eps=1e-6):
    """Hugging Face Llama's RMSNorm (weight after the cast back)."""
    dt = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(dt)


def fp32_weight_rms_norm(x, w, eps=1e-6):
    """vLLM / F.rms_norm's order: weight multiplied in fp32, then the cast back."""
    dt = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * w.to(torch.float32)).to(dt)


def gemma_rms_norm(x, w, eps=1e-6):
    """Gemma's ``(1 + w)`` norm."""
    dt = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * (1.0 + w.float())).to(dt)


def trace(fn, *args) -> torch.fx.GraphModule:
    """make_fx under fake tensors: an aten graph shaped like Inductor's post-grad input."""
    with torch.no_grad():  # functionalized, as Inductor's post-grad graphs are
        return make_fx(torch.func.functionalize(fn), tracing_mode="fake")(*args)


def count(gm: torch.fx.GraphModule, name: str) -> int:
    """Calls of the op whose qualified name is *name* (e.g. ``_c10d_functional.all_reduce``)."""
    return sum(
        1 for n in gm.graph.nodes
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
        and op_name(n.target).rpartition(".")[0] == name
    )


def run_pass(gm: torch.fx.GraphModule, **options):
    """``(unfused copy, report)``: the fusion pass run on *gm* in place, the graph linted
    and the module recompiled."""
    import copy

    from fusion_passes import FusionPass

    before = copy.deepcopy(gm)
    p = FusionPass(**options)
    p(gm.graph)
    gm.graph.lint()
    gm.recompile()
    return before, p.report
