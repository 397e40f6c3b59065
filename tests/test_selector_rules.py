"""Every backend policy is the selector's (fusion_passes/backends/selector.py), and the rule
that decided is named: in the report of a graph site, in the log of a run-time fallback,
in a backend's own ``run``. One test per place that decided before (issue 24): the
option and auto choice, the compile-time GPU policies (once in ``match._backend``), the
option fallback (once in ``ops._backend``), the vendors' answers (once ``Unfusable`` in
``VendorBackend.run``) and the triton backend's quant group size (once in its ``run``).
"""

from __future__ import annotations

import logging

import pytest
import torch

from fusion_passes import arguments, backends, variants
from fusion_passes.backends import aiter as aiter_backend, flashinfer as fi_backend, selector
from fusion_passes.backends.triton import TritonBackend
from graphs import all_reduce, hf_rms_norm, run_pass, trace

T, H = 5, 64
BF16 = torch.bfloat16


def block(x, r, w):
    return hf_rms_norm(all_reduce(x) + r, w)


def traced(dtype=BF16):
    return trace(block, torch.randn(T, H, dtype=dtype), torch.randn(T, H, dtype=dtype), torch.randn(H, dtype=dtype))


def bound(variant, x, residual, weight, group, **kw):
    spec = variants.get(variant)
    a = arguments.bind(spec, (x, residual, weight, 1e-6, group), kw)
    return arguments.fused_args(spec, a, arguments.resolve(spec, a))


def test_the_option_and_auto_rules_are_in_the_report(fake_pg):
    for option, rule in [("reference", "option"), ("auto", "auto: reference")]:
        _, report = run_pass(traced(), backend=option)
        (site,) = report.sites
        assert site.fused and site.backend == "reference", report.table()
        assert site.rule == rule and site.to_dict()["rule"] == rule


def test_the_gpu_rules_are_the_selectors_and_in_the_report(fake_pg, monkeypatch):
    """A GPU site the triton kernel admits names its table; one that only the reference
    would run (once ``match._backend``'s own policy) is declined: ``gpu: no fused kernel``."""
    from fusion_passes import match

    monkeypatch.setattr(match.backends, "device_kind", lambda d: "cuda")
    _, report = run_pass(traced(), backend="auto")
    assert [(s.fused, s.backend, s.rule, s.table) for s in report.sites] == [
        (True, "triton", "gpu: shipped table", "shipped table")], report.table()
    _, report = run_pass(traced(torch.float64), backend="auto")  # no kernel takes fp64
    (site,) = report.sites
    assert not site.fused and site.reason.startswith("no fused kernel runs add_rmsnorm on cuda here: ")
    assert site.rule == "gpu: no fused kernel" and site.to_dict()["rule"] == "gpu: no fused kernel"
    _, report = run_pass(traced(torch.float64), backend="reference")  # the option is followed on a GPU too
    assert [(s.fused, s.rule) for s in report.sites] == [(True, "option")]


def test_a_gpu_site_in_another_projects_fp8_form_is_declined_by_the_selector():
    """Once ``match._backend``'s other policy: only the reference computes a form."""
    call = backends.Call("add_rmsnorm_fp8_static", "cuda", BF16, 4096, 2, form="input_product")
    choice = backends.choose(call)
    assert (choice.backend, choice.rule) == (None, "gpu: fp8 form")
    assert "no fused kernel computes the FP8 form 'input_product'" in choice.why
    assert backends.choose(call, run_time=True).rule != "gpu: fp8 form"  # compile-time only
    assert backends.choose(backends.Call("add_rmsnorm_fp8_static", "cpu", BF16, 4096, 2, form="x")).backend == "reference"


class _CpuOnly:
    """A CPU backend that computes no option argument and declines a scale upper bound."""

    name = "cpu_only"
    variants = frozenset({"add_rmsnorm", "add_rmsnorm_fp8_per_token"})
    quant_options = frozenset()

    def unsupported(self, call):
        return None

    def declines(self, call):
        return "no scale upper bound here" if call.quant_arg("scale_ub") is not None else None

    def run(self, variant, args):
        raise AssertionError("the selector should have sent this call to the reference backend")


@pytest.fixture
def cpu_only():
    backends.register("cpu_only", _CpuOnly, before="reference")
    try:
        yield
    finally:
        backends.unregister("cpu_only")


def test_the_run_time_fallbacks_are_the_selectors_and_logged_with_their_rule(fake_pg, cpu_only, caplog):
    """Once ``ops._backend``'s option fallback and ``VendorBackend.run``'s answer: the fused
    op asks the selector, which names the reference backend and the rule."""
    op = torch.ops.fusion_passes.allreduce_add_rmsnorm_fp8_per_token
    group = "c10d:" + fake_pg.group_name
    x, r, w = torch.randn(T, H, dtype=BF16), torch.randn(T, H, dtype=BF16), torch.randn(H, dtype=BF16)
    cases = [({"fp8_dtype": torch.float8_e4m3fnuz}, "fallback: options"),
             ({"scale_ub": torch.tensor([1.0])}, "cpu_only declined")]
    for kw, rule in cases:
        args = bound("add_rmsnorm_fp8_per_token", x, r, w, group, **kw)
        call = selector.call_of("add_rmsnorm_fp8_per_token", args, world_size=2,
                                options=arguments.options(variants.get("add_rmsnorm_fp8_per_token"),
                                                          arguments.bind(variants.get("add_rmsnorm_fp8_per_token"),
                                                                         (x, r, w, 1e-6, group), kw), args.quant))
        assert (backends.choose(call, "cpu_only", run_time=True).backend,
                backends.choose(call, "cpu_only", run_time=True).rule) == ("reference", rule)
        with caplog.at_level(logging.WARNING, logger="fusion_passes"):
            got = op(x, r, w, 1e-6, group, backend="cpu_only", **kw)
        want = op(x, r, w, 1e-6, group, backend="reference", **kw)
        assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(got, want))
        assert f"({rule})" in caplog.text
    plain = selector.call_of("add_rmsnorm", bound("add_rmsnorm", x, r, w, group), world_size=2)
    assert backends.choose(plain, "cpu_only", run_time=True) == selector.Choice("cpu_only", "option")


def test_the_vendor_adapters_answer_through_the_selector(fake_pg):
    """The checks once raised as ``Unfusable`` are each adapter's ``declines``, asked by the
    selector before any vendor call."""
    group = "c10d:" + fake_pg.group_name
    x, r, w = torch.randn(4, 256, dtype=BF16), torch.randn(4, 256, dtype=BF16), torch.randn(256, dtype=BF16)
    fi = fi_backend.FlashInferBackend(comm=object())
    args = bound("add_rmsnorm", x, r, w, group, residual_in_fp32=True)
    assert selector.for_run(fi, "add_rmsnorm", args) == selector.Choice("reference", "flashinfer declined",
                                                                       fi_backend.RESIDUAL_ROUNDED)
    assert selector.for_run(fi, "add_rmsnorm", bound("add_rmsnorm", x, r, w, group)).backend == "flashinfer"
    ai = aiter_backend.AiterBackend(comm=object(), fp8_dtype=torch.float8_e4m3fn)
    args = bound("add_rmsnorm_fp8_per_token", x, r, w, group, residual_in_fp32=True, scale_ub=torch.tensor([1.0]))
    choice = selector.for_run(ai, "add_rmsnorm_fp8_per_token", args)
    assert (choice.backend, choice.rule, choice.why) == ("reference", "aiter declined",
                                                         "aiter's per-token FP8 epilogue has no scale upper bound")
    # a graph site does not know these arguments: nothing is declined for them there
    site = backends.Call("add_rmsnorm_fp8_per_group", "rocm", BF16, 4096, 2)
    assert ai.declines(site) is None and fi.declines(site) is None


def test_the_triton_backends_quant_group_size_is_the_selectors(fake_pg):
    """Once ``TritonBackend.run``'s own fallback: now its ``declines``, asked by the selector."""
    group = "c10d:" + fake_pg.group_name
    x = torch.randn(4, 256, dtype=BF16)
    args = bound("add_rmsnorm_fp8_per_group", x, None, None, group, group_size=32)
    choice = selector.for_run(TritonBackend(), "add_rmsnorm_fp8_per_group", args)
    assert (choice.backend, choice.rule) == ("reference", "triton declined")
    assert choice.why.startswith("per-group FP8 quant group size 32 not in")
    args = bound("add_rmsnorm_fp8_per_group", x, None, None, group, group_size=128)
    assert selector.for_run(TritonBackend(), "add_rmsnorm_fp8_per_group", args).backend == "triton"


def test_the_carry_fp32_flag_is_the_selectors():
    """Once ``match._carry_source``'s own test of the selector's answer: a fused op hands the
    next site its unrounded fp32 sum only where a backend runs that call (a kernel on a GPU)."""
    flags = variants.Flags(weight_in_fp32=True, residual_in_fp32=True, carry_fp32=True)
    cpu = backends.Call("add_rmsnorm", "cpu", BF16, 4096, 2, tokens=8, flags=flags)
    assert selector.carries_fp32(cpu) == selector.Choice("reference", "flags: carry_fp32")
    gpu = backends.Call("add_rmsnorm", "cuda", BF16, 7168, 1, tokens=256, flags=flags)
    assert selector.carries_fp32(gpu) == selector.Choice("triton", "flags: carry_fp32")
    fp64 = backends.Call("add_rmsnorm", "cuda", torch.float64, 7168, 1, tokens=256, flags=flags)
    choice = selector.carries_fp32(fp64)
    assert (choice.backend, choice.rule) == (None, "flags: no kernel carries fp32")
