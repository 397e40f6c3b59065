"""Small tensor-parallel graphs for the unit tests, traced with make_fx (no compile)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.fx.experimental.proxy_tensor import make_fx

from fusion_passes.recognize.fx import op_name

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


def types_read(graph: torch.fx.Graph) -> dict[str, list]:
    """Node name -> the dtype and shape of every tensor it reads (its Node arguments, in
    order; None where a value has no tensor metadata)."""
    def sig(a):
        v = a.meta.get("val")
        return (v.dtype, [str(d) for d in v.shape]) if isinstance(v, torch.Tensor) else None

    out = {}
    for n in graph.nodes:
        reads = []
        torch.fx.node.map_arg((n.args, n.kwargs), lambda a: reads.append(sig(a)))
        out[n.name] = reads
    return out


def assert_types_kept(before: dict[str, list], graph: torch.fx.Graph) -> None:
    """The graph invariant of every rewrite (issue 22): each node that survived the pass
    reads values of the dtypes and shapes it read before (no fused output changed type)."""
    for name, reads in types_read(graph).items():
        was = before.get(name)
        if was is None or len(was) != len(reads):
            continue  # a node the pass made, or one whose arguments it rewired (hoisting)
        changed = [(i, a, b) for i, (a, b) in enumerate(zip(was, reads)) if None not in (a, b) and a != b]
        assert not changed, f"{name} reads another dtype or shape after the pass: {changed}"


def run_pass(gm: torch.fx.GraphModule, **options):
    """``(unfused copy, report)``: the fusion pass run on *gm* in place, the graph linted
    and the module recompiled."""
    import copy

    from fusion_passes import FusionPass

    before = copy.deepcopy(gm)
    reads = types_read(gm.graph)
    p = FusionPass(**options)
    p(gm.graph)
    gm.graph.lint()
    assert_types_kept(reads, gm.graph)
    gm.recompile()
    return before, p.report
