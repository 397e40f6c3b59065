"""Trace, fuse and compare one corpus :class:`Case`.

A case's graph is what Inductor is handed: the chain traced by AOTAutograd (the same
functionalization as ``torch.compile``: in-place custom ops become ``auto_functionalized``
or ``auto_functionalized_v2`` nodes) with Inductor's decomposition table, under
``no_grad``. Inputs are per rank: ``x`` is each rank's partial sum; the residual, weights
and scales are replicated (one seed for all ranks).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from typing import Callable

import torch
import torch.distributed as dist
from torch._functorch.aot_autograd import aot_function


c10d = torch.ops._c10d_functional


@dataclasses.dataclass(frozen=True)
class Case:
    """One chain after an all-reduce. ``chain(t, *inputs)`` gets the all-reduced ``t``.

    ``expect``: the catalogue family the first all-reduce must fuse into (None: it must not
    fuse); ``args``: fused-op arguments to check by schema name; ``bound``: None for a
    bit-exact comparison, else the name of a derived bound in :data:`BOUNDS`;
    ``held_out``: never looked at while designing the recognizer; ``unfused_quant``: the
    chain quantizes but the quant must stay unfused, and the site's reason says this.
    """

    name: str
    source: str
    chain: Callable
    inputs: tuple[str, ...] = ("res", "w")
    dtype: torch.dtype = torch.bfloat16
    expect: str | None = None
    args: tuple[tuple[str, object], ...] = ()
    held_out: bool = False
    hidden: int = 256
    tokens: int = 8
    bound: str | None = None
    v2: bool = False
    needs: tuple[str, ...] = ()
    unfused_quant: str | None = None  # the quant stays unfused: what the site's reason must say


def _seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


def _rand(g: torch.Generator, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


def partial_input(case: Case, rank: int) -> torch.Tensor:
    """Rank *rank*'s summand: random rows, plus a zero row, a -0.0 row and a large row
    that are the same kind on every rank (their sums stay zero, -0.0, large)."""
    g = torch.Generator().manual_seed(_seed(case.name) + 1 + rank)
    x = _rand(g, case.tokens, case.hidden) * (1.0 + rank)
    x[0] = 0.0
    x[1] = -0.0
    x[2] *= 64.0
    return x.to(case.dtype)


def replicated_inputs(case: Case) -> list[torch.Tensor]:
    """The replicated inputs named by ``case.inputs`` (same values on every rank)."""
    g = torch.Generator().manual_seed(_seed(case.name))
    t, h, dt = case.tokens, case.hidden, case.dtype
    make = {
        "res": lambda: _rand(g, t, h).to(dt),
        "w": lambda: (1.0 + 0.2 * _rand(g, h)).to(dt),
        "w32": lambda: 1.0 + 0.2 * _rand(g, h),
        "wg": lambda: (0.2 * _rand(g, h)).to(dt),  # Gemma's zero-centred weight
        "s": lambda: torch.tensor([0.0173]),  # a static FP8 scale (fp32 [1])
        "s0": lambda: torch.tensor(0.0173),  # the same, 0-dim (SGLang's tests): bf16 * it stays bf16
        "gs": lambda: torch.tensor([448.0 * 6.0 / 9.0]),  # NVFP4 global scale
        "ub": lambda: torch.tensor([1.5]),  # per-token scale upper bound
    }
    return [make[name]() for name in case.inputs if name != "x"]


def function(case: Case) -> Callable:
    """``f(x, *inputs) = case.chain(all_reduce(x), *inputs)`` in the plain-PyTorch dialect
    (an input named ``"x"`` is the rank's partial sum itself)."""
    group = dist.group.WORLD.group_name

    def f(x, *inputs):
        t = c10d.wait_tensor(c10d.all_reduce(x, "sum", group))
        rest = iter(inputs)
        return tuple(case.chain(t, *[x if name == "x" else next(rest) for name in case.inputs]))

    return f


def trace(case: Case, args: list[torch.Tensor], dynamic: bool = False) -> torch.fx.GraphModule:
    """The post-AOTAutograd graph of the case (see the module docstring). *dynamic*: the
    token dimension is symbolic (every input whose first size is ``case.tokens``), as
    ``torch.compile`` with ``mark_dynamic`` / ``dynamic=True`` and vLLM trace it."""
    from torch._inductor import config
    from torch._inductor.decomposition import select_decomp_table

    captured = {}

    def capture(gm, example_inputs):
        captured["gm"] = gm
        return gm

    inputs = [a.clone() for a in args]
    mode = contextlib.nullcontext()
    if dynamic:
        inputs = token_dynamic(inputs, case.tokens)
        mode = inputs[0].fake_mode  # the chain's own factories (empty_like, zeros_like) under it too
    with torch.no_grad(), config.patch(enable_auto_functionalized_v2=case.v2), mode:
        aot_function(function(case), fw_compiler=capture, decompositions=select_decomp_table())(*inputs)
    return captured["gm"]


def token_dynamic(inputs: list[torch.Tensor], tokens: int) -> list[torch.Tensor]:
    """Fake copies of *inputs* whose first size, where it is *tokens*, is one symbol."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)  # constants a chain makes

    def fake(t):
        sizes = [DimDynamic.DYNAMIC if i == 0 and t.dim() > 1 and s == tokens else DimDynamic.STATIC
                 for i, s in enumerate(t.shape)]
        return mode.from_tensor(t, symbolic_context=StatelessSymbolicContext(dynamic_sizes=sizes))

    return [fake(t) for t in inputs]


def call(gm: torch.fx.GraphModule, args: list[torch.Tensor]):
    """Run a traced graph on *args*: a symbolic-size input (a token-dynamic graph) gets the
    size it stands for (the first size of the first input that has the symbol)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) == len(args):
        return gm(*args)
    tensors = iter(args)
    full = []
    for n in placeholders:
        v = n.meta.get("val")
        if isinstance(v, torch.SymInt):
            full.append(_size_of(v, placeholders, args))
        else:
            full.append(next(tensors))
    return gm(*full)


def _size_of(sym, placeholders, args) -> int:
    tensors = [n for n in placeholders if isinstance(n.meta.get("val"), torch.Tensor)]
    for n, a in zip(tensors, args):
        for s, real in zip(n.meta["val"].shape, a.shape):
            if isinstance(s, torch.SymInt) and s.node.expr == sym.node.expr:
                return int(real)
    raise ValueError(f"no input has the size {sym}")


def fused_args(gm: torch.fx.GraphModule) -> dict[str, object]:
    """The first fused op's arguments by schema name (defaults filled in)."""
    for n in gm.graph.nodes:
        if n.op == "call_function" and getattr(n.target, "namespace", "") == "fusion_passes":
            schema = n.target._schema
            out = {a.name: a.default_value for a in schema.arguments if a.has_default_value()}
            out.update({a.name: v for a, v in zip(schema.arguments, n.args)})
            out.update(n.kwargs)
            return out
    return {}


def verdict(case: Case, report) -> list[str]:
    """What is wrong with the pass's outcome for *case* (empty when it is as expected)."""
    site = report.sites[0] if report.sites else None
    if site is None:
        return ["no all-reduce site in the report"]
    problems = []
    if report.errors:
        problems.append(f"pass errors: {report.errors}")
    if case.expect is None and site.fused:
        problems.append(f"must not fuse, fused as {site.variant}")
    if case.expect is not None and site.variant != case.expect:
        problems.append(f"expected {case.expect}, got {site.variant if site.fused else 'unfused'}: {site.reason}")
    if case.expect is None and not site.reason:
        problems.append("an unfused site without a reason")
    if case.unfused_quant is not None and case.unfused_quant not in (site.reason or ""):
        problems.append(f"the quant must stay unfused with {case.unfused_quant!r}; the reason: {site.reason}")
    return problems


FP8_AND_FP4 = (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz, torch.uint8)


def quant_left_problems(report, gm: torch.fx.GraphModule) -> list[str]:
    """A quantization the pass left in the graph (a cast to an FP8 dtype, NVFP4's uint8
    packing) after a fused site must be explained by that site's reason."""
    site = report.sites[0] if report.sites else None
    if site is None or not site.fused:
        return []
    left = [n.name for n in gm.graph.nodes if n.op == "call_function"
            and n.target is torch.ops.prims.convert_element_type.default and n.args[1] in FP8_AND_FP4]
    if left and "quant left unfused" not in (site.reason or ""):
        return [f"quantization left in the graph ({', '.join(left)}) without a reason: {site.reason}"]
    return []


def arg_problems(case: Case, gm) -> list[str]:
    got = fused_args(gm)
    return [f"fused arg {k}={got.get(k)!r}, expected {v!r}" for k, v in case.args if got.get(k) != v]


# ------------------------------------------------------------------------------ numerics


def bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bits as integers (fp8 / fp4 bytes compare by code, floats by value below)."""
    return t.view(torch.uint8) if t.element_size() == 1 else t


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact in the graph's dtype: equal shape and dtype, and equal values, NaN where
    NaN (1-byte codes compare as bytes; +0 and -0 compare equal, as IEEE and torch.equal)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = bits(a), bits(b)
    if a.is_floating_point():
        nan = torch.isnan(a)
        return bool(torch.equal(nan, torch.isnan(b)) and torch.equal(a[~nan], b[~nan]))
    return bool(torch.equal(a, b))


def hoisted_scale_bound(case: Case, want: tuple, got: tuple, partials: list, inputs: list) -> list[str]:
    """DeepSeek fp16's ``t * (1 / 2.5)`` after the all-reduce, hoisted above it: the fused
    graph sums ``a*c + b*c``, the unfused one computes ``(a + b)*c``. Each of those four fp16
    roundings errs by at most u|value| (u = 2^-11, half an ulp), so the scaled sums differ by
    ``B <= 3u|c|(|a| + |b|)`` elementwise. The rest is the same math on both sides (vLLM's
    native norm: fp32 residual add, ``x * rsqrt(mean(x^2) + eps)``, cast, ``* w``); to first
    order a change ``B`` of ``x`` moves ``n = x*r`` (``r`` the rsqrt) by at most
    ``r*B + |x| r^3 mean(|x| B)``. Each result is finally rounded once or twice more, which
    may flip a last bit: + 2u|n| before the weight, + 2u|y| after it. A factor 2 covers the
    first-order terms. Both outputs are checked against these bounds elementwise."""
    c = 1.0 / 2.5
    u = torch.finfo(case.dtype).eps / 2  # half an ulp of 1.0: 2^-11 in fp16
    b = 3 * u * abs(c) * sum(p.abs().to(torch.float64) for p in partials)
    (norm_w, res_w), (norm_g, res_g), w = want, got, inputs[1].to(torch.float64)
    x = res_w.to(torch.float64)
    res_bound = b + 2 * u * x.abs()
    r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    n = x * r
    dn = 2 * (r * res_bound + x.abs() * r.pow(3) * (x.abs() * res_bound).mean(-1, keepdim=True))
    norm_bound = w.abs() * (dn + 2 * u * n.abs()) + 2 * u * norm_w.to(torch.float64).abs()
    problems = []
    for name, a, g, bound in (("norm", norm_w, norm_g, norm_bound), ("residual", res_w, res_g, res_bound)):
        err = (a.to(torch.float64) - g.to(torch.float64)).abs()
        if a.dtype != g.dtype or a.shape != g.shape or not bool((err <= bound).all()):
            problems.append(f"{name}: max error {err.max().item():.3g} over its bound "
                            f"(max excess {(err - bound).max().item():.3g})")
    return problems


BOUNDS: dict[str, Callable] = {"hoisted_scale": hoisted_scale_bound}
"""bound name -> ``fn(case, unfused outputs, fused outputs, partials, inputs) -> problems``."""


def compare(case: Case, want: tuple, got: tuple, partials: list, inputs: list) -> list[str]:
    """Problems with fused outputs *got* against unfused *want* (bit-exact unless ``bound``)."""
    if len(want) != len(got):
        return [f"{len(want)} outputs unfused, {len(got)} fused"]
    if case.bound is not None:
        return BOUNDS[case.bound](case, want, got, partials, inputs)
    return [f"output {i} differs ({a.dtype} {tuple(a.shape)} vs {b.dtype} {tuple(b.shape)})"
            for i, (a, b) in enumerate(zip(want, got)) if not same(a, b)]
