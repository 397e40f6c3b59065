"""The triton backend under the compile-parity flags (docs/design.md, "What Inductor keeps
unrounded"), on a real GPU at world size 1:

* ``carry_fp32``: an fp32 residual in, the unrounded fp32 sum out (bit-exact: one fp32
  add of the same two values), the norm within one ulp of the output dtype;
* ``quant_unrounded`` (the kernel's ``Q_RAW``), flag on and off, every FP8 quant the kernel
  runs, three weight forms, the residual added in the activation dtype or in fp32: against
  the reference backend with the same flag. The residual is bit-exact, the norm within one
  ulp. Flag off: the codes and scales bit-exact against the epilogue's quant of the
  kernel's own norm output. Flag on: the codes and the dynamic scales come from the
  unrounded value (Inductor's Triton code takes the amax there too:
  ``epilogue.amax_reads_unrounded``), which is not an output and differs from the
  reference's in fp32 summation order and ``rsqrt``: the scales within 4 fp32 ulps, the
  codes that differ at most ``RAW_SHARE``;
* per site against the unfused compile (Inductor, default precision) of the chain the op
  replaces: the residual bit-exact, the share of FP8 codes that differ (issue 22: at most
  0.5%), with the flag (what the pass now selects) and without it (before), and whether
  the scales are equal.

    python tests/gpu/parity_check.py [stream ...]   (only the checks whose name holds one of these)
"""

from __future__ import annotations

import dataclasses
import os
import sys

import torch
import torch.distributed as dist

from fusion_passes import epilogue, ops, variants
from fusion_passes.backends.reference import ReferenceBackend
from fusion_passes.backends.triton import TritonBackend

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import oracles  # noqa: E402

ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
SHARE = 0.005  # issue 22's target: at most 0.5% of FP8 codes differ from the unfused compile
RAW_SHARE = 1e-4  # flag on, against the reference's unrounded value: fp32-ulp differences only
FP8_PARAMS = {  # each FP8 variant's non-option quant arguments (tests/gpu/triton_check.py's)
    "add_rmsnorm_fp8_static": [(torch.tensor([0.02]),)],
    "add_rmsnorm_fp8_per_token": [(None,), (torch.tensor([3.0]),)],
    "add_rmsnorm_fp8_per_group": [(128, False, False), (128, True, True), (64, False, True)],
}
FORMS = {"hf": dict(gemma=False, w_fp32=False), "vllm": dict(gemma=False, w_fp32=True),
         "gemma": dict(gemma=True, w_fp32=True)}


def args_for(variant, x, res, w, group, params, gemma=False, w_fp32=True, with_norm_out=False, **flags):
    a = oracles.fused_args(variants.get(variant), x, res, w, 1e-6, group, gemma, w_fp32, *params,
                           with_norm_out=with_norm_out)
    return dataclasses.replace(a, flags=dataclasses.replace(a.flags, **flags))


def share(a, b) -> float:
    return float((a.view(torch.uint8) != b.view(torch.uint8)).float().mean())


def on_cuda(params):
    return tuple(p.cuda() if torch.is_tensor(p) else p for p in params)


def check_carry(group, dtype, tokens, hidden) -> str:
    g = torch.Generator(device="cuda").manual_seed(tokens)
    x = torch.randn(tokens, hidden, device="cuda", generator=g).to(dtype)
    res32 = torch.randn(tokens, hidden, device="cuda", generator=g)
    w = (torch.rand(hidden, device="cuda", generator=g) + 0.5).to(dtype)
    a = args_for("add_rmsnorm", x, res32, w, group, (), carry_fp32=True)
    t, r = TritonBackend().run("add_rmsnorm", a), ReferenceBackend().run("add_rmsnorm", a)
    assert t.residual_out.dtype == torch.float32 and torch.equal(t.residual_out, r.residual_out), "carry sum"
    torch.testing.assert_close(t.norm_out.float(), r.norm_out.float(), rtol=ULP[dtype], atol=1e-6)
    return f"carry_fp32 {dtype} {tokens}x{hidden}"


def check_raw(group, variant, params, dtype, tokens, hidden, form, res_fp32, unrounded) -> str:
    """One FP8 call, flag *unrounded*, against the reference backend and the epilogue."""
    g = torch.Generator(device="cuda").manual_seed(tokens * 31 + hidden)
    x = torch.randn(tokens, hidden, device="cuda", generator=g).to(dtype)
    res = torch.randn(tokens, hidden, device="cuda", generator=g).to(dtype)
    w = (torch.rand(hidden, device="cuda", generator=g) + 0.5).to(dtype)
    a = args_for(variant, x, res, w, group, params, with_norm_out=True, **FORMS[form],
                 residual_in_fp32=res_fp32, quant_unrounded=unrounded)
    why = TritonBackend().unsupported(dataclasses.replace(ops.call_for(variant, x, group), flags=a.flags))
    assert "unrounded" not in str(why or ""), why
    t, r = TritonBackend().run(variant, a), ReferenceBackend().run(variant, a)
    assert torch.equal(t.residual_out, r.residual_out), "residual_out"
    # The Hugging Face form rounds twice (n.to(dtype), then w * n): one ulp of n from the
    # kernel's rsqrt becomes up to ~1.2 ulp of the output (2 of 551936 elements at 0.0092
    # relative, bf16 77x7168, 1x H100, 2026-12-06); the other forms round once.
    rtol = ULP[dtype] * (2 if form == "hf" else 1)
    torch.testing.assert_close(t.norm_out.float(), r.norm_out.float(), rtol=rtol, atol=1e-6)
    qp = a.quant
    # Where the expected scales are computed: torch on CUDA divides by a Python scalar
    # through its reciprocal, as the kernel's per-token scale does (Triton's fp32 division);
    # the per-group scale is correctly rounded in the kernel (_div_const_rn), as on the CPU
    # (on a GPU 1 to 6485 per-group codes were off, 1x H100, 2026-12-06).
    dev = "cuda" if variant == "add_rmsnorm_fp8_per_token" else "cpu"
    at = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in qp.items()}
    oq, os_ = epilogue.quantize(variant, t.norm_out.to(dev), at)  # the scales (flag off: the codes) of the kernel's norm
    if not unrounded:
        if os_ is not None:
            assert torch.equal(t.scales.to(dev), os_.reshape(t.scales.shape)), "scales vs the epilogue on the kernel's norm"
        assert torch.equal(t.q.to(dev).view(torch.uint8), oq.view(torch.uint8)), "codes vs the epilogue on the kernel's norm"
        return f"{variant} {params_text(params)} {form} res_fp32={res_fp32} flag off: codes and scales bit-exact"
    # flag on: the codes from the unrounded value, a dynamic scale's amax too (Inductor's
    # Triton code; epilogue.amax_reads_unrounded). torch's unrounded norm and the kernel's
    # differ in the last bits of the row's sum of squares, so the scales agree to a few ulps
    # and a few codes at a rounding boundary may differ.
    fl = dataclasses.asdict(a.flags)
    y32 = epilogue.norm_unrounded(x, res, w, 1e-6, **fl).to(dev)
    want, ws = epilogue.quantize(variant, t.norm_out.to(dev), at, y32, amax_unrounded=True)
    scales = ""
    if ws is not None:
        torch.testing.assert_close(t.scales.to(dev), ws.reshape(t.scales.shape), rtol=4 * 2.0 ** -23, atol=0)
        scales = f"scales within 4 ulp ({float((t.scales.to(dev) == ws.reshape(t.scales.shape)).float().mean()):.0%} equal), "
    differ = int((t.q.to(dev).view(torch.uint8) != want.view(torch.uint8)).sum())
    assert differ <= RAW_SHARE * t.q.numel(), f"{differ} codes differ from the reference's unrounded value"
    return (f"{variant} {params_text(params)} {form} res_fp32={res_fp32} flag on: {scales}"
            f"{differ} of {t.q.numel()} codes differ from the reference's (vs flag off {share(t.q.to(dev), oq):.2%})")


def params_text(params) -> str:
    return str([p.item() if torch.is_tensor(p) else p for p in params])


def chain(variant, qp, form):
    """The unfused chain the op replaces: add, the form's RMSNorm, the variant's quant in
    vLLM's order (epilogue.QUANT, plain torch ops) with the call's resolved arguments *qp*."""
    kw = FORMS[form]

    def fn(x, res, w):
        h = x + res
        y = epilogue.rms_norm(h, w, 1e-6, gemma=kw["gemma"], weight_in_fp32=kw["w_fp32"])
        q, s = epilogue.QUANT[variant](y, qp)
        return (h, q) if s is None else (h, q, s)
    return fn


def check_compile(group, variant, params, dtype, tokens, hidden, form) -> str:
    g = torch.Generator(device="cuda").manual_seed(tokens + 7)
    x = torch.randn(tokens, hidden, device="cuda", generator=g).to(dtype)
    res = torch.randn(tokens, hidden, device="cuda", generator=g).to(dtype)
    w = (torch.rand(hidden, device="cuda", generator=g) + 0.5).to(dtype)
    qp = args_for(variant, x, res, w, group, params, **FORMS[form]).quant
    torch._dynamo.reset()
    h, q, *s = torch.compile(chain(variant, qp, form), dynamic=False, fullgraph=True)(x, res, w)
    line, on = [], None
    for unrounded in (True, False):
        a = args_for(variant, x, res, w, group, params, **FORMS[form], quant_unrounded=unrounded)
        t = TritonBackend().run(variant, a)
        assert torch.equal(t.residual_out, h), "residual vs the unfused compile"
        scales = "scales equal" if not s or torch.equal(t.scales, s[0].reshape(t.scales.shape)) else "scales differ"
        line.append(f"{'flag on' if unrounded else 'flag off'} {share(t.q, q):.3%} ({scales})")
        on = share(t.q, q) if unrounded else on
    if s and variant in ("add_rmsnorm_fp8_per_token", "add_rmsnorm_fp8_per_group"):
        line.append(amax_hypothesis(variant, x, res, w, qp, form, q, s[0]))
    text = (f"compile parity {variant} {params_text(params)} {form} {str(dtype)[6:]} {tokens}x{hidden}: "
            f"codes differing from the unfused compile: " + ", ".join(line))
    assert on <= SHARE, f"over {SHARE:.1%}: {text}"  # both flags printed either way
    return text


def amax_hypothesis(variant, x, res, w, qp, form, q, s) -> str:
    """Diagnostic (issue 22): does the compile take the dynamic scale's amax from the norm
    value before its rounding, kept in fp32? The scales and codes that hypothesis gives,
    compared with the compile's (printed, not asserted)."""
    kw = FORMS[form]
    y32 = epilogue.norm_unrounded(x, res, w, 1e-6, gemma=kw["gemma"], weight_in_fp32=kw["w_fp32"])
    dtype = qp["fp8_dtype"] if "fp8_dtype" in qp else torch.float8_e4m3fn
    m = variants.fp8_max(dtype)
    smin = epilogue.fp8_min_scaling_factor(dtype)
    if variant == "add_rmsnorm_fp8_per_token":
        amax = y32.abs().amax(dim=-1, keepdim=True)
        if qp.get("scale_ub") is not None:
            amax = amax.clamp(max=qp["scale_ub"])
        sc = (amax / m).clamp(min=smin)
        qq = (y32 * sc.reciprocal()).clamp(-m, m).to(dtype)
    else:
        g = qp["group_size"]
        grouped = y32.reshape(-1, y32.shape[-1] // g, g)
        amax = grouped.abs().amax(dim=-1, keepdim=True)
        sc = (amax / m).clamp(min=smin)
        if qp.get("ue8m0"):
            sc = torch.exp2(torch.ceil(torch.log2(sc)))
        qq = (grouped / sc).clamp(-m, m).to(dtype).reshape(y32.shape)
        sc = sc.reshape(y32.shape[0], -1)
    same = (sc.reshape(s.shape) == s).float().mean().item()
    return f"hypothesis amax from the unrounded fp32 norm: scales equal {same:.1%}, codes differ {share(qq, q):.3%}"


def check_stream(group, quant, gather, tokens, hidden, device="cuda") -> str:
    """Issue 22 at every site of an 8-site stream compiled by Inductor with and without the
    pass (triton backend). A chain on a GPU cannot stay bit-exact: the fused op's mean of
    squares sums in another order than the compile's looped reduction (whose order itself
    moves with the config Inductor picks), a 1-ulp variance flips a few norm elements, and
    each matmul spreads them over their rows. So, checked:

    * the first site (the same inputs on both sides): at most 0.5% of its norm elements /
      FP8 codes differ (issue 22's per-site target);
    * every site: the fused output's RMS distance from a reference of the same chain run
      eagerly in fp64 (FP8 sites: dequantized, against the reference's own FP8 quant) at
      most 1.02 x the unfused compile's (the issue's ratio, per site);
    * for scale, the differing elements of the unfused compile against itself under
      ``coordinate_descent_tuning`` (another reduction config Inductor may pick) are
      printed beside the fused ones.
    """
    import torch._inductor.config as inductor_config
    from fusion_passes import FusionPass

    from graphs import stream_args, stream_chain

    args = stream_args(8, int(quant), gather, tokens, hidden, device)
    fn = stream_chain(8, epilogue.fp8_per_token, int(quant), gather)  # vLLM's order, plain torch
    outs = []
    for fuse, patch in ((False, {}), (True, {}), (False, {"coordinate_descent_tuning": True})):
        p = FusionPass(backend="triton" if device == "cuda" else "reference") if fuse else None
        torch._dynamo.reset()
        with inductor_config.patch(fx_graph_cache=False, post_grad_custom_post_pass=p, **patch):
            outs.append(torch.compile(fn, fullgraph=True, dynamic=False)(*args))
        if fuse:
            fused = sum(x.fused for x in p.report.sites)
    unfused, got, other = outs
    wide = tuple([t.double() if t.dtype == torch.bfloat16 else t for t in a] if isinstance(a, list) else
                 a.double() if a.is_floating_point() else a for a in args)
    ref = fn(*wide)

    def value(o):  # a site's output as a float64 value: the norm output, or its FP8 codes dequantized
        return o[0].double() if o[0].dtype != torch.float8_e4m3fn else o[0].double() * o[1].double()

    def rms(a, b):
        return float((a - b).pow(2).mean().sqrt())

    differ = [int((a[0].view(torch.uint8) != b[0].view(torch.uint8)).sum()) for a, b in zip(unfused, got)]
    itself = [int((a[0].view(torch.uint8) != b[0].view(torch.uint8)).sum()) for a, b in zip(unfused, other)]
    ratios = [rms(value(g), value(r)) / rms(value(u), value(r)) for u, g, r in zip(unfused, got, ref)]
    first = differ[0] / unfused[0][0].numel()
    text = (f"stream {'fp8 per token' if quant else 'bf16'} {'gather' if gather else 'input'} {tokens}x{hidden} "
            f"({launch_text(quant, tokens, hidden, device)}): {fused}/8 fused; elements differing per site (of {unfused[0][0].numel()}): fused {differ}, "
            f"the compile against itself (coordinate descent) {itself}; fused/unfused distance from fp64 per "
            f"site {' '.join(f'{r:.3f}' for r in ratios)}")
    assert fused == 8 and first <= SHARE and max(ratios) <= 1.02, text
    return text


def launch_text(quant, tokens, hidden, device) -> str:
    """The launch the measured table gives the stream's fused sites (world size 1)."""
    from fusion_passes.backends import measured
    from fusion_passes.cli.tune_show import launch_options

    if device != "cuda":
        return "reference"
    variant = "add_rmsnorm_fp8_per_token" if quant else "add_rmsnorm"
    table = measured.local(1)
    e = None if table is None else table.lookup(variant, hidden, tokens, dtype=torch.bfloat16)
    if e is None:
        return "no measured entry: the shipped rules"
    return ", ".join([e.pick, f"{e.num_warps} warps", *launch_options(e.rows, e.num_stages, e.chunk, e.tile, e.evict)])


def cases(group):
    for dtype in (torch.bfloat16, torch.float16):
        for tokens, hidden in ((1, 4096), (7, 2048), (64, 4096)):
            yield check_carry, (group, dtype, tokens, hidden)
    for variant, plist in FP8_PARAMS.items():
        for i, params in enumerate(plist):
            p = on_cuda(params)
            for form, res_fp32 in (("hf", False), ("vllm", False), ("gemma", False), ("hf", True), ("vllm", True)):
                for unrounded in (False, True):
                    yield check_raw, (group, variant, p, torch.bfloat16, 77, 7168, form, res_fp32, unrounded)
                    if form == "hf" and not res_fp32:
                        yield check_raw, (group, variant, p, torch.float16, 1, 4096, form, res_fp32, unrounded)
            if i:  # the compile parity with each variant's first parameters (and per-group UE8M0)
                if params != (128, True, True):
                    continue
            for form, dtype, tokens, hidden in (("hf", torch.bfloat16, 64, 4096), ("hf", torch.float16, 2048, 7168),
                                                ("vllm", torch.bfloat16, 64, 4096)):
                yield check_compile, (group, variant, p, dtype, tokens, hidden, form)
    # 512x8192 and 1024x4096: where the shipped H100 table runs the looped kernel (the text names the launch)
    for quant, gather, tokens, hidden in ((False, False, 16, 4096), (False, True, 16, 4096), (True, True, 64, 4096),
                                          (True, True, 64, 1024), (False, False, 16, 1024), (False, False, 512, 8192),
                                          (False, False, 1024, 4096)):
        yield check_stream, (group, quant, gather, tokens, hidden)


def main() -> int:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29534"))
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    group = "c10d:" + dist.group.WORLD.group_name
    failures = total = 0
    only = sys.argv[1:]  # e.g. stream: only the checks whose name holds one of these
    for fn, c in cases(group):
        if only and not any(o in fn.__name__ for o in only):
            continue
        total += 1
        try:
            print("ok   " + fn(*c), flush=True)
        except Exception as e:  # noqa: BLE001 - report every failure, keep going
            failures += 1
            print(f"FAIL {fn.__name__}{c[1:]}: {type(e).__name__}: {e}", flush=True)
    dist.destroy_process_group()
    print(f"{total - failures} passed, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
