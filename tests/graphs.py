"""Small tensor-parallel graphs for the unit tests, traced with make_fx (no compile)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.fx.experimental.proxy_tensor import make_fx

from fusion_passes.recognize.fx import op_name

c10d = torch.ops._c10d_functional


def group_name() -> str:
    return dist.group.WORLD.group_name


def stream_chain(layers: int, quantize, quants: int, gather: bool):
    """*layers* sites whose residual stream starts at an embedding gather (or an input) and
    runs through every site, as a decoder's does; a matmul between sites (the next
    all-reduce's input: the site's bf16 norm output, or its FP8 codes dequantized, from
    *quants* identical ``quantize(y) -> (codes, scales)`` of the norm output as q/k/v have);
    each site's norm output or first quant's (codes, scales) returned, the stream read by
    nothing else until the final norm. Inductor stores the stream at every fourth sum or
    so (more than 4 buffer reads), and a norm output where the stream's reads make it so
    (fusion_passes.inductor_store). Issue 22's per-site parity, on CPU
    (tests/test_compile_parity.py) and GPU (tests/gpu/parity_check.py)."""
    def fn(ids, table, x, ws, w, w_final):
        h = table[ids] if gather else table
        outs = []
        for i in range(layers):
            h = all_reduce(x) + h
            y = hf_rms_norm(h, w, 1e-6)
            if not quants:
                outs.append((y,))
                x = y @ ws[i]
                continue
            qs = [quantize(y) for _ in range(quants)]
            outs.append(qs[0])
            x = sum(((c.float() * sc) @ ws[i].float()).to(y.dtype) for c, sc in qs)
        outs.append((hf_rms_norm(h, w_final, 1e-5), h))
        return outs
    return fn


def stream_args(layers: int, quants: int, gather: bool, tokens: int, hidden: int, device="cpu"):
    """Inputs of :func:`stream_chain` (bf16 activations, FP8 weights where it quantizes)."""
    g = torch.Generator().manual_seed(0)
    rows = 64 if gather else tokens
    weights = [torch.randn(hidden, hidden, generator=g) / hidden ** 0.5 for _ in range(layers)]
    wdt = torch.float8_e4m3fn if quants else torch.bfloat16
    args = (torch.randint(0, 64, (tokens,), generator=g), torch.randn(rows, hidden, generator=g).to(torch.bfloat16),
            torch.randn(tokens, hidden, generator=g).to(torch.bfloat16), [w.to(wdt) for w in weights],
            (torch.rand(hidden, generator=g) + 0.5).to(torch.bfloat16),
            (torch.rand(hidden, generator=g) + 0.5).to(torch.bfloat16))
    return tuple([t.to(device) for t in a] if isinstance(a, list) else a.to(device) for a in args)


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
