"""Recognition by meaning (fusion_passes.recognize.meaning and its parts), unit by unit.

The corpus of real spellings is tests/test_spellings.py; here: the per-shape verdict
cache, the FP8 forms against the epilogue's own functions, the E2M1 adapter against vLLM's
``cast_to_fp4``, the comparison rule, refusals of in-place ops the rewrite cannot serve,
bad ``form`` arguments, and the GPU rule for forms no kernel computes.
"""

from __future__ import annotations

import pytest
import torch

import fusion_passes
from fusion_passes import epilogue
from fusion_passes import fp8_forms
from fusion_passes.recognize.meaning import decide, probes
from fusion_passes.recognize.meaning.conventions import decode_e2m1
from graphs import all_reduce, count, run_pass, trace
from spellings import sources as S

pytestmark = pytest.mark.usefixtures("fake_pg")

T, H = 6, 128
BF16 = torch.bfloat16


def _native_layer(x, res, w):
    """vLLM's pre-IR RMSNorm.forward_native: the spelling only recognition by meaning reads."""
    return S.vllm_forward_native_old(x, res, w, 1e-6)


def test_verdict_is_computed_once_per_chain_shape(monkeypatch):
    """Four layers of one chain shape: every site fuses, the probes run once."""
    calls = []
    real = decide.decide
    monkeypatch.setattr(decide, "decide", lambda *a, **k: calls.append(1) or real(*a, **k))
    from fusion_passes.recognize import meaning as semantic

    semantic._CACHE.clear()

    def model(x0, x1, x2, x3, res, w, wm):
        for x in (x0, x1, x2, x3):
            y, res = _native_layer(all_reduce(x), res, w)
            res = res + y @ wm  # stands in for the next block
        return res

    args = [torch.randn(T, H, dtype=BF16) for _ in range(5)] + [torch.randn(H, dtype=BF16),
                                                                torch.randn(H, H, dtype=BF16)]
    gm = trace(model, *args)
    p = fusion_passes.FusionPass()
    p(gm.graph)
    assert [s.fused for s in p.report.sites] == [True] * 4, p.report.table()
    assert count(gm, "fusion_passes.allreduce_add_rmsnorm") == 4
    assert len(calls) == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_vllm_forms_are_the_epilogue(dtype):
    """The forms that name vLLM's own orders compute exactly the epilogue's functions."""
    y = torch.randn(T, H, dtype=torch.float64).mul(3).to(dtype)
    y[0] = 0
    fp8, m = torch.float8_e4m3fn, 448.0
    floor = epilogue.fp8_min_scaling_factor(fp8)
    cases = [
        (fp8_forms.quantize(y, H, fp8, m, fp8_forms.Form(scale_min=floor)), epilogue.fp8_per_token(y)),
        (fp8_forms.quantize(y, None, fp8, m, fp8_forms.Form(scale_min=floor)), epilogue.fp8_per_tensor(y)),
        (fp8_forms.quantize(y, 64, fp8, m, fp8_forms.Form(apply="div", scale_min=floor, pow2="ceil")),
         epilogue.fp8_per_group(y, 64, True)),
    ]
    for (q, s), (q2, s2) in cases:
        assert torch.equal(q.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s, s2)


def test_form_text_round_trips_and_bad_forms_are_clear_errors():
    for form in (fp8_forms.Form(), fp8_forms.Form(invert=True, apply="mul", precision="f64", amax_min=1e-12),
                 fp8_forms.Form(apply="div", amax_min=1e-10, amax_min_input=True), fp8_forms.Form(safe_recip=True),
                 fp8_forms.Form(input_product=True)):
        assert fp8_forms.parse(form.text()) == form
    assert [fp8_forms.static_form(how).text() for how in fp8_forms.STATIC] == ["", "div", "invert", "input_product"]
    with pytest.raises(ValueError, match="unknown FP8 form part"):
        fp8_forms.parse("reciprocal-ish")
    op = torch.ops.fusion_passes.allreduce_add_rmsnorm_fp8_per_token
    x = torch.randn(T, H, dtype=BF16)
    with pytest.raises(ValueError, match="unknown FP8 form part"):
        op(x, None, None, 1e-6, "c10d:0", form="bogus")


def test_e2m1_values_decode_as_vllm_casts():
    """Every E2M1 code decodes to what vLLM's ref cast_to_fp4 gives for a value rounding to
    it (sign included; -0.0 and +0.0 compare equal, as IEEE)."""
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    values = torch.cat([grid, -grid[1:], torch.tensor([-0.1])])
    packed = epilogue.pack_e2m1(epilogue.e2m1_codes(values.reshape(1, -1).repeat(1, 2)[:, :16]))
    decoded = torch.ops.fusion_passes.e2m1_values(packed, torch.float32)
    assert torch.equal(decoded, S.cast_to_fp4(values.reshape(1, -1).repeat(1, 2)[:, :16].clone()))
    assert torch.equal(decode_e2m1(packed), decoded)
    with pytest.raises(TypeError, match="packed uint8"):
        torch.ops.fusion_passes.e2m1_values(torch.zeros(1, 2), torch.float32)


def test_comparison_is_bitwise_with_nan_and_signed_zero_rules():
    a = torch.tensor([1.0, float("nan"), 0.0])
    assert probes.same(a, torch.tensor([1.0, float("nan"), -0.0]))
    assert not probes.same(a, torch.tensor([1.0, 1.0, 0.0]))
    assert not probes.same(a, a.to(torch.float64))
    f = torch.tensor([1.0, -1.0]).to(torch.float8_e4m3fn)
    g = torch.tensor([1.0, -0.0]).to(torch.float8_e4m3fn)  # codes compare as bytes
    assert not probes.same(f, g) and probes.same_flat(f.reshape(2, 1), f)
    assert not probes.same(torch.tensor([0.0]).to(torch.float8_e4m3fn), torch.tensor([-0.0]).to(torch.float8_e4m3fn))


def test_maybe_inplace_x_read_back_is_refused(monkeypatch):
    """vLLM IR's maybe_inplace leaves x unspecified: a graph reading it back cannot fuse."""
    pytest.importorskip("vllm", reason="needs vLLM 0.33 (its IR ops)")
    monkeypatch.setenv("VLLM_TARGET_DEVICE", "cpu")
    import vllm.ir  # noqa: F401
    from spellings import harness

    case = harness.Case("x_read_back", "constructed", lambda t, r, w: (
        *torch.ops.vllm_ir.fused_add_rms_norm.maybe_inplace(t, r, w, 1e-6), t * 2), needs=("vllm",))
    gm = harness.trace(case, [harness.partial_input(case, 0), *harness.replicated_inputs(case)])
    _, report = run_pass(gm)
    assert not report.sites[0].fused and "maybe_inplace" in report.sites[0].reason, report.table()


def test_a_form_stays_unfused_on_a_gpu(monkeypatch):
    """No kernel computes a non-vLLM FP8 form: on a GPU the quant stays and the reason says so."""
    from fusion_passes import match

    monkeypatch.setattr(match.backends, "device_kind", lambda device: "cuda")

    def chain(x, res, w):
        h = all_reduce(x) + res
        return (*S.torchao_float8_training(S.hf_llama_rmsnorm(h, w)), h)

    gm = trace(chain, torch.randn(T, H, dtype=BF16), torch.randn(T, H, dtype=BF16), torch.randn(H, dtype=BF16))
    p = fusion_passes.FusionPass(backend="auto")
    p(gm.graph)
    (site,) = p.report.sites
    assert "no fused kernel computes the FP8 form" in (site.reason or ""), p.report.table()
    assert count(gm, "fusion_passes.allreduce_add_rmsnorm_fp8_per_token") == 0


def test_static_form_is_checked():
    """A static form that is none of ``fp8_forms.STATIC`` is a one-line error naming them."""
    op = torch.ops.fusion_passes.allreduce_add_rmsnorm_fp8_static
    with pytest.raises(ValueError, match="static FP8 form must be one of .*'input_product'.*got 'invert'"):
        op(torch.randn(T, H, dtype=BF16), None, None, 1e-6, "c10d:0", scale=torch.tensor([0.5]), form="invert")


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_sglang_static_0dim_is_the_input_product_form(monkeypatch, device):
    """SGLang's native static quant with a 0-dim fp32 scale (the product stays bf16) reads as
    the static form ``input_product``: on the CPU it fuses with that form (the reference
    backend computes it); on a GPU no kernel computes it, so the quant stays with the reason."""
    from fusion_passes import match

    real = match.backends.device_kind
    monkeypatch.setattr(match.backends, "device_kind", lambda d: device)

    def chain(x, res, w, s):
        y, res = S.sglang_forward_native(all_reduce(x), res, w, 1e-6)
        return S.sglang_native_static_quant_fp8(y, s)[0], res

    args = (torch.randn(T, H, dtype=BF16) * 4, torch.randn(T, H, dtype=BF16), torch.randn(H, dtype=BF16),
            torch.tensor(0.0173))
    gm = trace(chain, *args)
    want = gm(*args)
    p = fusion_passes.FusionPass(backend="auto")
    p(gm.graph)
    gm.recompile()
    monkeypatch.setattr(match.backends, "device_kind", real)  # run it here (the reference backend)
    got = gm(*args)
    assert [torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(want, got)] == [True, True]
    (site,) = p.report.sites
    fused = [n for n in gm.graph.nodes if "allreduce_add_rmsnorm_fp8_static" in str(n.target)]
    if device == "cpu":
        assert site.fused and [n.kwargs.get("form") for n in fused] == ["input_product"], p.report.table()
    else:
        assert site.fused and site.variant == "allreduce_add_rmsnorm" and not fused, p.report.table()
        assert "no fused kernel computes the FP8 form 'input_product'" in (site.reason or ""), p.report.table()


def test_a_quant_the_meaning_path_cannot_read_has_a_reason(monkeypatch):
    """The structural norm fuses and the quant after it (transformers' per-row FP8, which
    only recognition by meaning reads) stays: when that reading misses, the site still says
    why the quant is left, with the meaning path's reason."""
    from fusion_passes.recognize import meaning as semantic
    from fusion_passes.recognize.roles import Miss

    def chain(x, res, w):
        h = all_reduce(x) + res
        y = S.hf_llama_rmsnorm(h, w)
        return (*S.hf_quantize_fp8_per_row(y.reshape(-1, y.shape[-1])), h)

    monkeypatch.setattr(semantic, "recognize", lambda ar, graph: Miss("probes refused this chain", ar.node))
    gm = trace(chain, torch.randn(T, H, dtype=BF16), torch.randn(T, H, dtype=BF16), torch.randn(H, dtype=BF16))
    p = fusion_passes.FusionPass()
    p(gm.graph)
    (site,) = p.report.sites
    assert site.fused and site.variant == "allreduce_add_rmsnorm", p.report.table()
    assert site.reason == "quant left unfused: probes refused this chain", p.report.table()
