"""Correctness of the triton backend against the reference backend, on real GPUs.

Run directly at world size 1 (``python tests/gpu/triton_check.py``) or under torchrun
(``torchrun --nproc_per_node=2 tests/gpu/triton_check.py``); the pytest wrappers in
``test_triton_backend.py`` do exactly that. Exits non-zero on the first mismatch and
prints one line per case.

Tolerances (against the reference backend after the real collective; the quant against the oracles):
* ``residual_out``: bit-exact. The kernel rounds the all-reduce to the activation dtype
  and adds the residual in that dtype exactly as ``aten.add`` does (at world size 2 a
  sum of two values rounds once, like NCCL's; at 4+ the fp32 sum can differ from NCCL's
  ring order by one ulp, so there it gets the norm's tolerance).
* ``norm_out``: one ulp of the output dtype (bf16 2^-7, fp16 2^-10 relative), plus a
  tiny absolute term: the kernel's fp32 sum of squares runs in a different order than
  ``torch.mean`` and uses the hardware ``rsqrt``.
* Quant (FP8 static / per token / per group incl. UE8M0, NVFP4, MXFP4): BIT-EXACT, every
  byte of ``q`` and every scale (the swizzled layout's zero padding included), against the
  independent oracle of tests/oracles.py (``oracle_quant``: vLLM's QuantFP8 native path,
  torchao's blockwise float8 / MXFP8 RCEIL, vLLM's ref_nvfp4_quant + swizzle_blockscale,
  vLLM's own MXFP4 Triton kernel) applied to the kernel's OWN norm output: the kernel
  claims bit-identity given that norm, and the norm itself is checked against the
  reference above. Each line names the oracle used; where neither vLLM nor torchao is
  installed, the line says the epilogue answered (tests/test_oracles.py checks it against
  both on CPU). FP4 also end to end against the reference backend: at least 99% of the
  packed bytes and of the scale bytes equal (a norm value one ulp off can move an element
  across an E2M1 boundary or, as a block's absmax, its scale across an e4m3 step).
* ``residual_in_fp32``: the same tolerances, against the reference backend called with
  the same flag (the residual add in fp32, the norm on the unrounded sum).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from fusion_passes import variants
from fusion_passes.backends.reference import ReferenceBackend
from fusion_passes.backends.triton import TritonBackend

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: the oracles
import oracles  # noqa: E402


def run(backend, variant, x, res, w, eps, group, gemma, w_fp32, *params, with_norm_out=False,
        residual_in_fp32=False, **flags):
    """``backend.run`` as a tuple: ``(norm, residual_out)``, or ``(q, scales, residual_out, norm)``;
    *params* are the variant's non-option quant arguments in order."""
    args = oracles.fused_args(variants.get(variant), x, res, w, eps, group, gemma, w_fp32, *params,
                              with_norm_out=with_norm_out, residual_in_fp32=residual_in_fp32, **flags)
    o = backend.run(variant, args)
    return (o.norm_out, o.residual_out) if variant == "add_rmsnorm" else (o.q, o.scales, o.residual_out, o.norm_out)

ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float32: 2.0**-20}


def close(name, got, want, rtol, atol=1e-6):
    if got.shape != want.shape or got.dtype != want.dtype:
        raise AssertionError(f"{name}: {tuple(got.shape)}/{got.dtype} vs {tuple(want.shape)}/{want.dtype}")
    g, w = got.float(), want.float()
    if torch.isnan(g).any():
        raise AssertionError(f"{name}: NaN in output")
    bad = (g - w).abs() > atol + rtol * w.abs()
    if bad.any():
        i = bad.nonzero()[0].tolist()
        raise AssertionError(f"{name}: {int(bad.sum())} elements off, first at {i}: {g[tuple(i)]} vs {w[tuple(i)]}")


def same_bytes(t):
    return t.contiguous().view(torch.uint8)


def same_outputs(got, want) -> bool:
    """Every output of one call (a :func:`run` tuple) byte-equal to another's."""
    return all(a is None or torch.equal(same_bytes(a), same_bytes(b)) for a, b in zip(got, want))


def exact(name, got, want):
    """Every byte equal (fp32 scales: every value), shapes and dtypes equal."""
    got = got.cpu()
    if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
        raise AssertionError(f"{name}: {tuple(got.shape)}/{got.dtype} vs {tuple(want.shape)}/{want.dtype}")
    bad = (got != want) if got.dtype == torch.float32 else (same_bytes(got) != same_bytes(want))
    if bad.any():
        i = bad.nonzero()[0].tolist()
        raise AssertionError(f"{name}: {int(bad.sum())} elements differ, first at {i}")


def oracle_check(name, variant, params, q, s, norm) -> str:
    """Bit-exact against the oracle's quant of the kernel's own norm output; returns its name."""
    oq, os_, source = oracles.oracle_quant(variant, norm, params)
    exact(f"{name} q vs {source}", q, oq.reshape(q.shape))
    if os_ is None:
        assert s is None, f"{name}: static FP8 returns no scales"
    else:
        exact(f"{name} scales vs {source}", s, os_.reshape(s.shape))
    return source


def fp4_vs_reference(name, q, s, rq, rs):
    """End to end: >= 99% of the FP4 bytes equal the reference's (see the module docstring)."""
    for what, got, want in (("packed", q, rq), ("scales", s, rs)):
        equal = (same_bytes(got) == same_bytes(want)).float().mean().item()
        if equal < 0.99:
            raise AssertionError(f"{name} {what}: only {equal:.2%} of bytes equal the reference's")


QUANT_PARAMS = {  # each variant's non-option quant arguments, in order
    "fp8_static": lambda dev: [(torch.tensor([0.02], device=dev),)],
    "fp8_per_token": lambda dev: [(None,), (torch.tensor([3.0], device=dev),)],
    "fp8_per_group": lambda dev: [(128, False, False), (128, True, True), (64, False, True)],
    # global scale 448 * 6 / 5: a norm output of absmax ~5 uses the whole e4m3 range
    "nvfp4": lambda dev: [(torch.tensor([448.0 * 6 / 5], device=dev), True),
                          (torch.tensor([448.0 * 6 / 5], device=dev), False)],
    "mxfp4": lambda dev: [()],
}


def check_quant(tag, variant, common, p, rf, res_tol, tol, multi_row):
    """One quant call: residual / norm against the reference, q and scales bit-exact against
    the oracle on the kernel's own norm output, FP4 also >= 99% end to end."""
    if variant == "add_rmsnorm_nvfp4":  # hand the allocator dirty blocks: the scales' padding must be written
        dirty = [torch.full((1 << 16,), 0x7F, dtype=torch.uint8, device=common[0].device) for _ in range(64)]
        del dirty
    q, s, res_out, norm = run(TritonBackend(), variant, *common, *p, with_norm_out=True, **rf)
    rq, rs, rr, rn = run(ReferenceBackend(), variant, *common, *p, with_norm_out=True, **rf)
    close(f"{tag} residual_out", res_out, rr, res_tol)
    close(f"{tag} norm_out", norm, rn, tol)
    if rf.get("amax_unrounded"):
        amax_unrounded_check(tag, variant, p, q, s, norm, rs)
        source = None
    else:
        source = oracle_check(tag, variant, p, q, s, norm)
    if variant == "add_rmsnorm_fp8_per_group" and p[2] and multi_row:  # one row: both layouts coincide
        assert s.stride(0) == 1, f"{tag}: column-major scales expected, strides {s.stride()}"
    if variant in ("add_rmsnorm_nvfp4", "add_rmsnorm_mxfp4"):
        fp4_vs_reference(tag, q, s, rq, rs)
    # without the norm output: the same quant (the kernel once read the norm's dtype off the
    # residual output there, fp32 under carry_fp32, and quantized the unrounded norm)
    q2, s2, _, n2 = run(TritonBackend(), variant, *common, *p, **rf)
    assert n2 is None and torch.equal(same_bytes(q2), same_bytes(q)) and (s is None or torch.equal(
        same_bytes(s2), same_bytes(s))), f"{tag}: with_norm_out=False changed the quant"
    if source is not None:
        SOURCES.add(f"{variant}: {source}")


def amax_unrounded_check(tag, variant, p, q, s, norm, ref_scales):
    """``amax_unrounded``: the scales from the unrounded norm value (the reference's, within
    4 fp32 ulps: the value carries the last bits of the mean's reduction order, the kernel's
    and torch's), not the rounded norm output's in most rows; the codes exactly those of the
    kernel's own rounded norm output under the kernel's scales (epilogue.FP8_CODES on the GPU)."""
    from fusion_passes import epilogue

    rel = ((s.float() - ref_scales.float()).abs() / ref_scales.float().abs()).max().item()
    assert rel <= 4 * 2.0 ** -23, f"{tag}: scales {rel:.3g} (relative) from the reference's unrounded-amax scales"
    params = dict(zip(("scale_ub",) if variant == "add_rmsnorm_fp8_per_token" else
                      ("group_size", "ue8m0", "column_major"), p))
    params.update(fp8_dtype=q.dtype, amax_eps=0.0, scale_min=None)
    if p[0] is None if variant == "add_rmsnorm_fp8_per_token" else not p[1]:  # no upper bound, no UE8M0 rounding
        _, rounded_scales, _ = oracles.oracle_quant(variant, norm, p)
        same = (rounded_scales.to(s.device).reshape(s.shape) == s).float().mean().item()
        assert same < 0.5, f"{tag}: {same:.0%} of the scales equal the rounded norm output's: amax not unrounded?"
    want = epilogue.FP8_CODES[variant](norm, s.reshape(norm.shape[0], -1) if variant != "add_rmsnorm_fp8_per_token"
                                       else s, params)
    assert torch.equal(same_bytes(q), same_bytes(want.reshape(q.shape))), \
        f"{tag}: codes are not the rounded norm output's under the kernel's scales"
    SOURCES.add(f"{variant} amax_unrounded: fusion_passes.epilogue.FP8_CODES and the reference backend")


SOURCES: set[str] = set()  # which oracle answered each variant (printed at the end)


def check_case(group, rank, world, tokens, hidden, dtype, *, residual=True, weight=True, gemma=False,
               w_fp32=True, w_dtype=None, quant=None, res_fp32=False, seed=0):
    dev = torch.device("cuda", torch.cuda.current_device())
    gen = torch.Generator(device=dev).manual_seed(seed)
    shared = torch.Generator(device=dev).manual_seed(seed + 1000)
    x = torch.randn((world, tokens, hidden), generator=gen, device=dev, dtype=torch.float32)[rank].to(dtype)
    res = torch.randn((tokens, hidden), generator=shared, device=dev).to(dtype) if residual else None
    w = (torch.rand((hidden,), generator=shared, device=dev) + 0.5).to(w_dtype or dtype) if weight else None
    eps = 1e-6
    rf = {res_fp32: True} if isinstance(res_fp32, str) else dict(residual_in_fp32=res_fp32)  # or a flag's name
    ref_norm, ref_res = run(ReferenceBackend(), "add_rmsnorm", x, res, w, eps, group, gemma, w_fp32, **rf)
    tb = TritonBackend()
    tol = max(ULP[ref_norm.dtype], ULP[dtype])  # the norm rounds to the activation dtype first
    res_tol = 0.0 if world <= 2 else ULP[dtype]
    tag = f"ws{world} T{tokens} H{hidden} {str(dtype)[6:]} res={residual} w={weight} gemma={gemma} wfp32={w_fp32} q={quant}"
    tag += f" {res_fp32}" if isinstance(res_fp32, str) else (" res_fp32=True" if res_fp32 else "")
    if quant is None:
        norm, res_out = run(tb, "add_rmsnorm", x, res, w, eps, group, gemma, w_fp32, **rf)
        close(f"{tag} residual_out", res_out, ref_res, res_tol)
        close(f"{tag} norm_out", norm, ref_norm, tol)
    else:
        for p in QUANT_PARAMS[quant](dev):
            tag_p = f"{tag} params={[v if not torch.is_tensor(v) else v.item() for v in p]}"
            check_quant(tag_p, "add_rmsnorm_" + quant, (x, res, w, eps, group, gemma, w_fp32), p, rf,
                        res_tol, tol, multi_row=tokens > 1)
    return tag


def check_graph_replay(group, rank, world, tokens=64, hidden=4096, dtype=torch.bfloat16, replays=20):
    """The kernel captured once in a CUDA graph, replayed on fresh data, stays right."""
    dev = torch.device("cuda", torch.cuda.current_device())
    tb = TritonBackend()
    x = torch.empty((tokens, hidden), device=dev, dtype=dtype)
    res = torch.empty_like(x)
    w = torch.rand((hidden,), device=dev, dtype=dtype) + 0.5
    run(tb, "add_rmsnorm", x, res, w, 1e-6, group, False, True)  # registers the workspace eagerly
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run(tb, "add_rmsnorm", x, res, w, 1e-6, group, False, True)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run(tb, "add_rmsnorm", x, res, w, 1e-6, group, False, True)
    for i in range(replays):
        gen = torch.Generator(device=dev).manual_seed(100 + i)
        x.copy_(torch.randn((world, tokens, hidden), generator=gen, device=dev)[rank].to(dtype))
        res.copy_(torch.randn((tokens, hidden), generator=gen, device=dev).to(dtype))
        graph.replay()
        ref_norm, ref_res = run(ReferenceBackend(), "add_rmsnorm", x, res, w, 1e-6, group, False, True)
        close(f"graph replay {i} residual_out", out[1], ref_res, 0.0 if world <= 2 else ULP[dtype])
        close(f"graph replay {i} norm_out", out[0], ref_norm, ULP[dtype])
    return f"ws{world} CUDA graph: {replays} replays"


def check_back_to_back(group, rank, world, iters=200):
    """Many calls without host sync (signal pad reuse, buffer overwrite races)."""
    dev = torch.device("cuda", torch.cuda.current_device())
    tb = TritonBackend()
    outs, refs = [], []
    for i in range(iters):
        tokens = (1, 7, 300, 2048)[i % 4]
        gen = torch.Generator(device=dev).manual_seed(7 * i)
        x = torch.randn((world, tokens, 4096), generator=gen, device=dev)[rank].to(torch.bfloat16)
        res = torch.randn((tokens, 4096), generator=gen, device=dev).to(torch.bfloat16)
        outs.append(run(tb, "add_rmsnorm", x, res, None, 1e-6, group, False, True))
        refs.append((x, res))
    torch.cuda.synchronize()
    for i, ((norm, res_out), (x, res)) in enumerate(zip(outs, refs)):
        rn, rr = run(ReferenceBackend(), "add_rmsnorm", x, res, None, 1e-6, group, False, True)
        close(f"back-to-back {i} residual_out", res_out, rr, 0.0 if world <= 2 else ULP[torch.bfloat16])
        close(f"back-to-back {i} norm_out", norm, rn, ULP[torch.bfloat16])
    return f"ws{world} {iters} back-to-back calls"


def check_op(group, rank, world):
    """The fused op with backend="auto": triton is the backend the selector picks for a call
    its table admits, the op runs it (counted), and the result matches the reference."""
    import fusion_passes.ops  # noqa: F401  (registers the op)
    from fusion_passes import backends
    from fusion_passes.backends import triton as triton_backend
    from fusion_passes.ops import call_for

    dev = torch.device("cuda", torch.cuda.current_device())
    admitted = [t for t in (1, 16, 64, 2048, 4096) if triton_backend.unsupported(call_for(
        "add_rmsnorm", torch.empty((t, 4096), device=dev, dtype=torch.bfloat16), group)) is None]
    assert admitted, f"ws{world}: triton's gate admits no add_rmsnorm call at hidden 4096 (thresholds.TRITON)"
    tokens = admitted[0]
    x = torch.randn((world, tokens, 4096), device=dev)[rank].to(torch.bfloat16)
    res = torch.randn((tokens, 4096), device=dev).to(torch.bfloat16)
    w = torch.rand(4096, device=dev).to(torch.bfloat16) + 0.5
    chosen = backends.select(call_for("add_rmsnorm", x, group))
    assert chosen == "triton", f"ws{world}: the selector chose {chosen!r}, not triton, for {tokens} tokens"
    impl, calls = backends.get("triton"), []
    impl.run = lambda *a, **k: calls.append(a[0]) or type(impl).run(impl, *a, **k)
    try:
        norm, res_out = torch.ops.fusion_passes.allreduce_add_rmsnorm(x, res, w, 1e-6, group)
    finally:
        del impl.run
    assert calls == ["add_rmsnorm"], f"ws{world}: the op ran {calls} on triton"
    rn, rr = run(ReferenceBackend(), "add_rmsnorm", x, res, w, 1e-6, group, False, True)
    close("op residual_out", res_out, rr, 0.0 if world <= 2 else ULP[torch.bfloat16])
    close("op norm_out", norm, rn, ULP[torch.bfloat16])
    return f"ws{world} fused op, backend auto -> {chosen} ({tokens} tokens), ran on triton"


def all_cases() -> list[dict]:
    """Every check_case: shapes, dtypes, norm forms, each quant, residual_in_fp32."""
    cases = []
    for tokens in (1, 3, 64, 257, 2048):
        for hidden in (128, 4096, 7168):
            cases.append(dict(tokens=tokens, hidden=hidden, dtype=torch.bfloat16))
    cases += [
        dict(tokens=33, hidden=16384, dtype=torch.bfloat16),
        dict(tokens=33, hidden=8192, dtype=torch.float16),
        dict(tokens=33, hidden=2048, dtype=torch.float32),
        dict(tokens=17, hidden=4096, dtype=torch.bfloat16, residual=False),
        dict(tokens=17, hidden=4096, dtype=torch.bfloat16, weight=False),
        dict(tokens=17, hidden=4096, dtype=torch.bfloat16, gemma=True),
        dict(tokens=17, hidden=4096, dtype=torch.bfloat16, w_fp32=False),
        dict(tokens=17, hidden=4096, dtype=torch.bfloat16, w_fp32=False, w_dtype=torch.float32),
        dict(tokens=17, hidden=4096, dtype=torch.bfloat16, w_dtype=torch.float32),
    ]
    for quant in ("fp8_static", "fp8_per_token", "fp8_per_group"):
        for tokens, hidden in ((1, 4096), (77, 7168), (1024, 8192)):
            cases.append(dict(tokens=tokens, hidden=hidden, dtype=torch.bfloat16, quant=quant))
    # FP4: 77 and 1 tokens pad the swizzled scales' rows; hidden 2080 pads their columns
    # (130 -> 132 NVFP4 blocks) and is 65 MXFP4 blocks.
    for quant in ("nvfp4", "mxfp4"):
        for tokens, hidden in ((1, 4096), (77, 7168), (1024, 8192), (33, 2080), (300, 16384)):
            cases.append(dict(tokens=tokens, hidden=hidden, dtype=torch.bfloat16, quant=quant))
        cases += [
            dict(tokens=64, hidden=4096, dtype=torch.float16, quant=quant),
            dict(tokens=17, hidden=4096, dtype=torch.bfloat16, quant=quant, w_fp32=False),
            dict(tokens=17, hidden=4096, dtype=torch.bfloat16, quant=quant, gemma=True),
            dict(tokens=17, hidden=4096, dtype=torch.bfloat16, quant=quant, residual=False),
            dict(tokens=130, hidden=7168, dtype=torch.bfloat16, quant=quant, res_fp32=True),
        ]
    # residual_in_fp32 (vLLM's fused_add_rms_norm): against the reference with the same flag
    cases += [
        dict(tokens=1, hidden=4096, dtype=torch.bfloat16, res_fp32=True),
        dict(tokens=257, hidden=7168, dtype=torch.bfloat16, res_fp32=True),
        dict(tokens=33, hidden=8192, dtype=torch.float16, res_fp32=True),
        dict(tokens=33, hidden=2048, dtype=torch.float32, res_fp32=True),
        dict(tokens=17, hidden=4096, dtype=torch.bfloat16, res_fp32=True, gemma=True),
        dict(tokens=17, hidden=4096, dtype=torch.bfloat16, res_fp32=True, w_fp32=False),
        dict(tokens=17, hidden=4096, dtype=torch.bfloat16, res_fp32=True, residual=False),
    ]
    for quant in ("fp8_static", "fp8_per_token", "fp8_per_group"):
        cases.append(dict(tokens=77, hidden=7168, dtype=torch.bfloat16, quant=quant, res_fp32=True))
    # sum_stored (issue 22: the variance from the unrounded sum, the normalization from the stored one)
    cases += [
        dict(tokens=1, hidden=4096, dtype=torch.bfloat16, res_fp32="sum_stored"),
        dict(tokens=257, hidden=7168, dtype=torch.bfloat16, res_fp32="sum_stored"),
        dict(tokens=33, hidden=8192, dtype=torch.float16, res_fp32="sum_stored"),
        dict(tokens=17, hidden=4096, dtype=torch.bfloat16, res_fp32="sum_stored", gemma=True),
        dict(tokens=77, hidden=7168, dtype=torch.bfloat16, res_fp32="sum_stored", quant="fp8_per_token"),
    ]
    # amax_unrounded (issue 22: a norm output Inductor's Triton code stores in the amax's loop:
    # the amax from the unrounded value, the codes from the stored one)
    cases += [
        dict(tokens=64, hidden=4096, dtype=torch.bfloat16, res_fp32="amax_unrounded", quant="fp8_per_token"),
        dict(tokens=77, hidden=7168, dtype=torch.bfloat16, res_fp32="amax_unrounded", quant="fp8_per_group"),
        dict(tokens=5, hidden=4096, dtype=torch.float16, res_fp32="amax_unrounded", quant="fp8_per_token"),
    ]
    # carry_fp32 with a quant (the residual output fp32): the norm still rounds before the quant
    cases += [dict(tokens=64, hidden=4096, dtype=torch.bfloat16, res_fp32="carry_fp32", quant=q)
              for q in ("fp8_static", "fp8_per_token", "fp8_per_group")]
    return cases


def check_launch_configs(group, rank, world, tokens=1000, hidden=7168):
    """Every tuned launch option (rows per program, num_stages, evict_first) computes the same
    bytes as the default launch: a launch config may change the time, never a result."""
    from fusion_passes.backends import triton as tb

    if world != 1:
        return "launch configs: world size 1 only (skipped)"
    g = torch.Generator(device="cuda").manual_seed(7)
    x = torch.randn(tokens, hidden, device="cuda", generator=g).to(torch.bfloat16)
    res = torch.randn(tokens, hidden, device="cuda", generator=g).to(torch.bfloat16)
    w = (torch.rand(hidden, device="cuda", generator=g) + 0.5).to(torch.bfloat16)
    backend, n = TritonBackend(), 0
    for variant, params in (("add_rmsnorm", ()), ("add_rmsnorm_fp8_per_token", (None,))):
        want = run(backend, variant, x, res, w, 1e-6, group, False, False, *params)
        for rows in (1, 2, 4):
            for stages in (None, 1, 3):
                for evict in (False, True):
                    tb.FORCE.update(rows=rows, num_stages=stages, evict=evict)
                    try:
                        got = run(backend, variant, x, res, w, 1e-6, group, False, False, *params)
                    finally:
                        tb.FORCE.clear()
                    if not same_outputs(got, want):
                        raise AssertionError(f"{variant} rows {rows} stages {stages} evict {evict}: differs "
                                             "from the default launch")
                    n += 1
    return f"launch configs: {n} (rows x stages x evict_first, 2 variants) byte-identical to the default launch"


def check_looped_configs(group, rank, world, tokens=1000):
    """The looped kernel (the row in pieces, two passes) and the tile kernel (2 or 4 rows at
    once as one block), tuned options, against the default one-pass launch and an fp64
    reference. Each may sum the variance's lanes in another order, so bytes may differ: the
    residual output must not (it is the add alone), the norm output by at most two steps of
    its dtype (two roundings) and static FP8 codes by one, and the norm's mean distance from
    fp64 at most 1.01x the one-pass kernel's. Cases one does not compute (a dynamic scale; for
    the looped kernel the norm of the unrounded fp32 sum too) must run the one-pass kernel:
    equal bytes."""
    from fusion_passes.backends import triton as tb

    if world != 1:
        return "looped and tile configs: world size 1 only (skipped)"
    g = torch.Generator(device="cuda").manual_seed(11)
    backend, lines = TritonBackend(), []
    for hidden in (4096, 7168):
        x = (torch.randn(tokens, hidden, device="cuda", generator=g) * 3).to(torch.bfloat16)
        res = torch.randn(tokens, hidden, device="cuda", generator=g).to(torch.bfloat16)
        w = (torch.rand(hidden, device="cuda", generator=g) + 0.5).to(torch.bfloat16)
        exact_norm = (x.double() + res.double()).to(torch.bfloat16).double()
        exact_norm = exact_norm * torch.rsqrt(exact_norm.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
        for variant, params, flags in (("add_rmsnorm", (), {}), ("add_rmsnorm", (), {"sum_stored": True}),
                                       ("add_rmsnorm_fp8_static", (torch.tensor([0.02], device="cuda"),), {}),
                                       ("add_rmsnorm_fp8_per_token", (None,), {}),
                                       ("add_rmsnorm", (), {"residual_in_fp32": True})):
            kw = dict(with_norm_out=variant != "add_rmsnorm", **flags)
            want = run(backend, variant, x, res, w, 1e-6, group, False, False, *params, **kw)
            for force in ({"chunk": 1024}, {"chunk": 2048}, {"tile": 2}, {"tile": 4}):
                tb.FORCE.update(force)
                try:
                    got = run(backend, variant, x, res, w, 1e-6, group, False, False, *params, **kw)
                finally:
                    tb.FORCE.clear()
                looped = "chunk" in force
                tag = (f"{'looped' if looped else 'tile'} H{hidden} {variant} {flags or ''} "
                       f"{'pieces of ' + str(force['chunk']) if looped else str(force['tile']) + ' rows at once'}")
                if variant == "add_rmsnorm_fp8_per_token" or (looped and flags.get("residual_in_fp32")):
                    if not same_outputs(got, want):
                        raise AssertionError(f"{tag}: not the one-pass kernel's bytes")
                    continue
                norm, res_out = (got[0], got[1]) if variant == "add_rmsnorm" else (got[3], got[2])
                norm1 = want[0] if variant == "add_rmsnorm" else want[3]
                exact(f"{tag} residual_out", res_out, (want[1] if variant == "add_rmsnorm" else want[2]).cpu())
                # the Hugging Face form rounds twice (the normalized value, then its product with
                # the weight): a variance one ulp apart moves the output by up to two steps (1x H100,
                # 2026-12-07: 8 of 7.2M elements at 7168 in pieces of 1024 moved by two)
                close(f"{tag} norm_out", norm, norm1, 2 * ULP[torch.bfloat16])
                if variant == "add_rmsnorm_fp8_static":
                    # one e4m3 step
                    close(f"{tag} fp8 codes", got[0].float(), want[0].float(), 2.0**-3, atol=2.0**-9)
                if not flags:
                    d_new = (norm.double() - exact_norm).abs().mean().item()
                    d_one = (norm1.double() - exact_norm).abs().mean().item()
                    if d_new > 1.01 * d_one:
                        raise AssertionError(f"{tag}: {d_new:.3g} from fp64, the one-pass kernel {d_one:.3g}")
                lines.append(f"{'c' if looped else 't'}{force.get('chunk', force.get('tile'))}:"
                             f"{(norm != norm1).sum().item()}")
    return (f"looped and tile configs: {len(lines)} (pieces of 1024 / 2048, 2 / 4 rows at once, H 4096 / 7168): "
            f"residual bytes equal, norm within two bf16 steps (differing elements of {tokens} rows: {' '.join(lines)}); "
            "per-token FP8 (and, looped, the fp32 sum): the one-pass kernel's bytes")


def main() -> int:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if world == 1 and "MASTER_ADDR" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29533"))
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", torch.cuda.current_device()))
    group = "c10d:" + dist.group.WORLD.group_name
    only = sys.argv[1:]  # e.g. sum_stored: only the cases whose description holds one of these
    cases = [c for c in all_cases() if not only or any(o in repr(c) for o in only)]
    failures = 0
    for i, case in enumerate(cases):
        try:
            tag = check_case(group, rank, world, seed=i, **case)
            ok = "ok  "
        except Exception as e:  # noqa: BLE001 - report every failure, keep going
            tag, ok = str(e), "FAIL"
            failures += 1
        if rank == 0:
            print(ok, tag, flush=True)
    extra = () if only else (check_graph_replay, check_back_to_back, check_op, check_launch_configs,
                             check_looped_configs)
    for fn in extra:
        try:
            tag, ok = fn(group, rank, world), "ok  "
        except Exception as e:  # noqa: BLE001 - report every failure, keep going
            tag, ok = str(e), "FAIL"
            failures += 1
        if rank == 0:
            print(ok, tag, flush=True)
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        for line in sorted(SOURCES):
            print("oracle", line, flush=True)
        print(f"{len(cases) + len(extra) - failures} passed, {failures} failed at world size {world}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
