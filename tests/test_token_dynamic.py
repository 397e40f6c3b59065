"""Recognition by meaning on token-dynamic graphs (issue 23, item 1): probed at 16, 1 and
7 tokens, never with a dynamic hidden size, one cached verdict for the static and the
token-dynamic form of a chain. (The whole corpus runs token-dynamic in test_spellings.)"""

from __future__ import annotations

import pytest
import torch

from fusion_passes.recognize import meaning as semantic
from fusion_passes.recognize.meaning import decide
from fusion_passes.recognize import AllReduce, all_reduce
from spellings import harness

T, H = 8, 256


def native_fp32_residual(t, res, w):
    """vLLM / SGLang forward_native: the residual added in fp32 (read by meaning only)."""
    s = t.float() + res.float()
    h = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6)
    return (h * w.float()).to(t.dtype), s.to(t.dtype)


CASE = harness.Case("native_fp32_residual", "test", native_fp32_residual)


def _recognize(gm):
    ar = next(a for n in gm.graph.nodes if isinstance(a := all_reduce(n), AllReduce))
    return semantic.recognize(ar, gm.graph)


def _trace(dynamic: bool, case=CASE):
    args = [harness.partial_input(case, 0), *harness.replicated_inputs(case)]
    return harness.trace(case, args, dynamic=dynamic)


def test_static_and_dynamic_forms_share_one_verdict(fake_pg, monkeypatch):
    semantic._CACHE.clear()
    probed = []
    real = decide.decide

    def spy(p, eps):
        probed.append(sorted({tuple(e[p.region.root].shape)[0] for e in p.envs}))
        return real(p, eps)

    monkeypatch.setattr(decide, "decide", spy)
    static, dynamic = _trace(False), _trace(True)
    assert isinstance(dynamic.graph.find_nodes(op="placeholder")[0].meta["val"].shape[0], torch.SymInt)
    first, second = _recognize(static), _recognize(dynamic)
    assert not isinstance(first, semantic.Miss) and not isinstance(second, semantic.Miss), (first, second)
    assert first.norm.residual_in_fp32 and second.norm.residual_in_fp32
    assert probed == [[1, 7, 16]]  # probed once, at every token count; the second form hit the cache
    assert len(semantic._CACHE) == 1


def test_a_dynamic_hidden_size_is_never_accepted(fake_pg):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    args = [harness.partial_input(CASE, 0), *harness.replicated_inputs(CASE)]
    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    fakes = [mode.from_tensor(a, symbolic_context=StatelessSymbolicContext(
        dynamic_sizes=[DimDynamic.DYNAMIC] * a.dim())) for a in args]
    captured = {}

    def capture(gm, _):
        captured["gm"] = gm
        return gm

    from torch._functorch.aot_autograd import aot_function

    with torch.no_grad(), mode:
        aot_function(harness.function(CASE), fw_compiler=capture)(*fakes)
    semantic._CACHE.clear()
    miss = _recognize(captured["gm"])
    assert isinstance(miss, semantic.Miss)
    assert "last (reduction) dimension" in miss.reason and "is dynamic" in miss.reason


@pytest.mark.parametrize("tokens", [3, 40])
def test_a_static_graph_of_any_token_count_is_probed_at_the_same_sizes(fake_pg, monkeypatch, tokens):
    """A static graph is probed at 16, 1 and 7 tokens whatever its own count."""
    import dataclasses

    semantic._CACHE.clear()
    probed = []
    real = decide.decide
    monkeypatch.setattr(decide, "decide", lambda p, eps: probed.append(
        sorted({e[p.region.root].shape[0] for e in p.envs})) or real(p, eps))
    result = _recognize(_trace(False, dataclasses.replace(CASE, tokens=tokens)))
    assert not isinstance(result, semantic.Miss), result
    assert probed == [[1, 7, 16]]


def _three_spellings(x1, x2, x3, res, w, w32):
    """Issue 23's token-dynamic misses, one all-reduce each (each on its own residual):
    the native fp32 residual add (vLLM / SGLang forward_native), the same with an fp32
    weight parameter, and an apex-style norm (the weight multiplied before the cast back)."""
    from graphs import all_reduce

    a, s1 = native_fp32_residual(all_reduce(x1), res, w)
    s = all_reduce(x2).float() + res.float()
    h = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6)
    b, s2 = (h * w32).to(torch.bfloat16), s.to(torch.bfloat16)
    t = all_reduce(x3) + res
    u = t.float()
    c = (w.float() * (u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + 1e-6))).to(torch.bfloat16)
    return a, s1, b, s2, c, t


def test_torch_compile_with_a_dynamic_token_dimension_fuses(fake_pg):
    """A real Inductor compile with ``mark_dynamic`` on the token dimension: all three
    all-reduces fuse, and the compiled code runs at other token counts without a
    recompile, equal to the compile without the pass."""
    import fusion_passes

    torch._dynamo.reset()

    def inputs(tokens):
        g = torch.Generator().manual_seed(tokens)
        act = [torch.randn(tokens, H, generator=g).to(torch.bfloat16) for _ in range(4)]
        for a in act:
            torch._dynamo.mark_dynamic(a, 0)
        w32 = 1 + 0.2 * torch.randn(H, generator=g)
        return (*act, w32.to(torch.bfloat16), w32)

    plain = torch.compile(_three_spellings, fullgraph=True)
    want = {n: plain(*inputs(n)) for n in (5, 9)}
    torch._dynamo.reset()
    with fusion_passes.enabled() as fusion:
        fused = torch.compile(_three_spellings, fullgraph=True)
        got = {n: fused(*inputs(n)) for n in (5, 9)}
    assert [s.fused for s in fusion.report.sites] == [True, True, True], fusion.report.table()
    for n in (5, 9):
        for a, b in zip(want[n], got[n]):
            assert torch.equal(a, b), n


@pytest.mark.parametrize("shape, fuses", [((2, 4, H), True), ((4, 128, H), False)])
def test_batch_and_sequence_both_over_one(fake_pg, shape, fuses):
    """A static [batch, seq, hidden] graph is probed as it is up to 256 rows (no one token
    dimension to rescale); over that it is refused with the reason."""
    from torch.fx.experimental.proxy_tensor import make_fx

    args = [torch.randn(*shape, dtype=torch.bfloat16) for _ in range(2)] + [torch.randn(H, dtype=torch.bfloat16)]
    with torch.no_grad():
        gm = make_fx(lambda x, r, w: native_fp32_residual(_all_reduce(x), r, w), tracing_mode="fake")(*args)
    semantic._CACHE.clear()
    result = _recognize(gm)
    if fuses:
        assert not isinstance(result, semantic.Miss), result
    else:
        assert isinstance(result, semantic.Miss) and "more than one leading dimension over 1" in result.reason


def _all_reduce(x):
    from graphs import all_reduce

    return all_reduce(x)
