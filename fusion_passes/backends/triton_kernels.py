"""The Triton kernels of the ``triton`` backend (NVIDIA; PTX inline assembly for signals).

One kernel, specialised by ``tl.constexpr`` flags, computes for every row of ``[T, H]``::

    s  = sum over ranks r of input_r      (fp32 accumulation, in rank order, rounded to
                                           the activation dtype: what the all-reduce returns)
    s  = (s + residual) in the activation dtype          -> residual_out
         (RES_FP32 1: added in fp32; residual_out is the sum rounded, the norm reads
         the unrounded fp32 sum, as vLLM's fused_add_rms_norm; RES_FP32 2: the
         variance reads the unrounded sum, the normalization the rounded one,
         as Inductor's compile where it stores the sum: sum_stored)
    y  = RMSNorm(s) with the epilogue's weight conventions -> norm_out (optional)
    q  = quant(y)  (FP8 static / per-token / per-group,   -> q, scales
                    NVFP4, MXFP4; Q_RAW 1: the FP8 codes and a dynamic
                    scale's amax from y before its rounding to the output
                    dtype, as Inductor's Triton compile of the chain:
                    quant_unrounded; Q_RAW 2: the amax alone, the codes
                    from the rounded y, where that compile stores y in
                    the amax's loop: amax_unrounded)

The numerics follow :mod:`fusion_passes.epilogue` step by step (each rounding to the
activation dtype that the unfused chain performs is performed here too); the only
differences are fp32 summation order inside the norm's mean and the hardware
``rsqrt``, worth at most one bf16 ulp on a few elements. Given the same norm output the
quant epilogues are exact: FP8 bit-identical, NVFP4 / MXFP4 byte-identical (packed
codes, e4m3 / E8M0 scales, swizzle padding) to fusion_passes.epilogue on an H200.

World size 1: no symmetric memory, no barriers; one program per row (or per ``ROWS``
consecutive rows, a launch config ``fusion-passes tune`` may pick with the warps and
``num_stages``; or the row in ``CHUNK``-wide pieces, :func:`epilogue_row_looped`; or ``TILE``
rows at once, :func:`epilogue_tile`) reads the input in place (a fused add + RMSNorm (+ quant)
kernel).

World size > 1 (one-shot): a persistent grid of ``G`` programs; program ``b`` copies
rows ``b, b+G, ...`` of its input into this rank's symmetric buffer, meets program ``b``
of every peer at a barrier (release/acquire at system scope on the symmetric signal
pad), reads those rows from every peer's buffer, runs the epilogue, and meets them
again so that no peer still reads the buffer when the next call overwrites it. Each
barrier flips a pad slot 0 -> 1 (sender, CAS) and 1 -> 0 (receiver, CAS), so the pad is
all zeros again afterwards: no host counter, CUDA-graph replayable. Peers are read with
plain loads (NVLink P2P); multicast is never used.

Written for this project after reading meta-pytorch/kraken ``_ptx_utils/symm_mem_barrier.py``
(same CAS signal protocol) and PyTorch's symmetric-memory Triton tests.
"""

from __future__ import annotations

import triton
import triton.language as tl

QUANT_NONE = 0
QUANT_FP8_STATIC = 1
QUANT_FP8_PER_TOKEN = 2
QUANT_FP8_PER_GROUP = 3
QUANT_NVFP4 = 4
QUANT_MXFP4 = 5


@triton.jit
def thread_index():
    return tl.inline_asm_elementwise(
        "mov.u32 $0, %tid.x;", "=r", [], dtype=tl.uint32, is_pure=True, pack=1
    )


def _cas_spin_asm(label: str, sem: str, expect: int, store: int) -> str:
    """PTX that spins on a system-scope ``atom.cas`` with *sem* ordering until the slot
    held *expect*, leaving *store* in it."""
    return f"""
        {{
            .reg .u32 %old;
            .reg .pred %ok;
        {label}:
            atom.global.{sem}.sys.cas.b32 %old, [$1], {expect}, {store};
            setp.eq.u32 %ok, %old, {expect};
            @!%ok bra {label};
            mov.u32 $0, %old;
        }}
        """


# Spin until the slot is free (0), then set it (1), publishing prior writes system-wide.
PUT_RELEASE = tl.constexpr(_cas_spin_asm("put_again", "release", 0, 1))
# Spin until the slot is set (1), consume it (0), acquiring the sender's writes.
WAIT_ACQUIRE = tl.constexpr(_cas_spin_asm("wait_again", "acquire", 1, 0))


@triton.jit
def _cas_spin(addr, ASM: tl.constexpr):
    """One of the spin loops above (:data:`PUT_RELEASE`, :data:`WAIT_ACQUIRE`) on *addr*."""
    tl.inline_asm_elementwise(ASM, "=r, l", [addr], dtype=tl.uint32, is_pure=False, pack=1)


@triton.jit
def _div_rn(y, s):
    """``y / s`` correctly rounded (torch's division), for a scale ``s`` shared by many ``y``.

    One correctly rounded reciprocal ``r`` per scale, then per element ``q = y * r`` and
    one FMA correction step (Markstein): the correctly rounded quotient for finite
    normal operands, at three instructions instead of a full IEEE division each, with
    FP8 output bit-identical to ``div.rn``'s (per-group FP8 at 16384x7168: 220 us against
    320 us with ``div.rn`` per element, one row 3.2 against 5.3 us; one A/B on 1x H200, not
    kept in results/).
    """
    r = tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)
    q = y * r
    e = tl.math.fma(-q, s, y)
    return tl.math.fma(e, r, q)


@triton.jit
def _div_const_rn(x, C: tl.constexpr):
    """``x / C`` correctly rounded, as torch divides on the CPU and torchao's blockwise float8
    reference computes a group's scale (Triton's ``/`` on fp32 is the approximate
    ``div.full.f32``: with it 1 to 6485 FP8 codes of a 1 x 128 group quant differed from that
    reference on an H200; with this, none did, tests/gpu/triton_check.py)."""
    return tl.math.div_rn(x, tl.full(x.shape, C, tl.float32))


@triton.jit
def _e2m1_codes(x):
    """E2M1 codes (int32, sign in bit 3) of fp32 ``x``, exactly :func:`fusion_passes.epilogue.e2m1_codes`:
    round to nearest, ties to even, saturating at 6, -0 kept (code 8), NaN -> 0 (as the
    epilogue's comparisons give). The hardware ``cvt.rn.satfinite.e2m1x2.f32`` needs
    sm_100+, so the rounding is done on the fp32 value and its bits, about 11 instructions
    per element instead of 7 compares and 7 adds. The same steps in numpy gave the
    epilogue's codes on every fp32 input of magnitude below 8, both signs (exhaustive),
    on every 1024th pattern above it, on +-inf and on quiet NaN (a one-off check on CPU,
    not kept as a test).
    """
    a = tl.maximum(tl.abs(x), 0.0)  # |x|; max.f32 returns the non-NaN operand: NaN -> 0
    # |x| < 1 (codes 0, 1, 2 = 0, 0.5, 1): adding 2^22 rounds |x| to a multiple of 0.5
    # (the fp32 ulp there), ties to even, and leaves 2 |x| rounded in the low bits.
    den = (a + 4194304.0).to(tl.int32, bitcast=True) - 0x4A800000
    # |x| >= 1: round the fp32 mantissa to one bit, ties to even (add 0x1FFFFF plus the
    # kept bit); (biased exponent, kept bit) then reads 2 * (e - 126) + m = the code
    # (1 -> 2, 1.5 -> 3, ..., 6 -> 7); saturate at 7 (inf included).
    b = a.to(tl.int32, bitcast=True)
    nrm = tl.minimum((b + ((b >> 22) & 1) + (0x1FFFFF - (252 << 22))) >> 22, 7)
    code = tl.where(a < 1.0, den, nrm)
    return code | ((x.to(tl.int32, bitcast=True) >> 28) & 8)  # the sign bit -> bit 3


@triton.jit
def _barrier(signal_pad_ptrs, slot, RANK: tl.constexpr, WS: tl.constexpr):
    """Program ``slot`` of every rank meets here; writes before are visible to reads after."""
    peers = tl.arange(0, WS)
    pads = signal_pad_ptrs.to(tl.pointer_type(tl.uint64))
    remote = tl.load(pads + peers).to(tl.pointer_type(tl.uint32))
    local = tl.load(pads + RANK).to(tl.pointer_type(tl.uint32))
    tl.debug_barrier()  # every thread's writes precede the release below
    if thread_index() < WS:  # thread p signals peer p and waits for peer p
        _cas_spin(remote + slot * WS + RANK, PUT_RELEASE)
        _cas_spin(local + slot * WS + peers, WAIT_ACQUIRE)
    tl.debug_barrier()  # no thread reads before every peer has arrived


@triton.jit
def _norm(s, v, w, eps, H: tl.constexpr, HAS_W: tl.constexpr, GEMMA: tl.constexpr, W_FP32: tl.constexpr, act,
          out_ty, Q_RAW: tl.constexpr = False):
    """RMSNorm of the fp32 row ``s``, its mean of squares from ``v`` (``s`` itself, or the
    unrounded sum where ``s`` is the stored one: sum_stored), with the epilogue's weight
    conventions: ``(y, yq)``, ``y``
    rounded to the output dtype and returned in fp32 (the norm output), ``yq`` what the quant
    reads: ``y``, or with ``Q_RAW`` the fp32 value before that rounding
    (epilogue.norm_unrounded: the Hugging Face form's product of the weight and the
    unrounded normalized value)."""
    return _scale(s, tl.math.rsqrt(tl.sum(v * v, axis=0) / H + eps), w, HAS_W, GEMMA, W_FP32, act, out_ty, Q_RAW)


@triton.jit
def _scale(s, rstd, w, HAS_W: tl.constexpr, GEMMA: tl.constexpr, W_FP32: tl.constexpr, act, out_ty,
           Q_RAW: tl.constexpr = False):
    """:func:`_norm` past the variance: ``s * rstd`` and the weight, ``(y, yq)`` as there."""
    n = s * rstd
    raw = n
    if HAS_W:
        if GEMMA:
            raw = n * (1.0 + w)
            y = raw
        elif W_FP32:
            raw = n * w
            y = raw
        else:  # Hugging Face Llama: w * normed.to(dtype), in the promoted dtype
            raw = w * n
            y = w * n.to(act).to(tl.float32)
    else:
        y = n
    y = y.to(out_ty).to(tl.float32)
    if Q_RAW:
        yq = raw
    else:
        yq = y
    return y, yq


@triton.jit
def _fp8_per_token(y, yq, row, q_ptr, qscale_ptr, ub, cols, mask, scale_stride_t, HAS_UB: tl.constexpr,
                   FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr, H: tl.constexpr):
    """epilogue.fp8_per_token: one scale per row from ``y``, ``q = clamp(yq * (1 / scale))``."""
    amax = tl.max(tl.abs(y), axis=0)
    if HAS_UB:
        amax = tl.minimum(amax, ub)
    # Triton's fp32 division here (div.full.f32), not _div_const_rn: the GPU check against the
    # per-token reference on CUDA (torch multiplies a CUDA tensor divided by a Python scalar by
    # the fp32 reciprocal) passed bit-exact with it and failed with the correctly rounded form.
    scale = tl.maximum(amax / FP8_MAX, MIN_SCALE)
    q = tl.clamp(yq * tl.math.div_rn(1.0, scale), -FP8_MAX, FP8_MAX)
    off = tl.cast(row, tl.int64) * H
    tl.store(q_ptr + off + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(qscale_ptr + tl.cast(row, tl.int64) * scale_stride_t, scale)


@triton.jit
def _fp8_per_group(y, yq, row, q_ptr, qscale_ptr, cols, mask, scale_stride_t, scale_stride_g, H: tl.constexpr,
                   BLOCK: tl.constexpr, GROUP: tl.constexpr, UE8M0: tl.constexpr, FP8_MAX: tl.constexpr,
                   MIN_SCALE: tl.constexpr, AMAX_EPS: tl.constexpr):
    """epilogue.fp8_per_group: 1 x GROUP groups, scales from ``y``, ``q = yq / scale`` correctly rounded."""
    NG: tl.constexpr = BLOCK // GROUP
    y2 = tl.reshape(y, (NG, GROUP))
    amax = tl.maximum(tl.max(tl.abs(y2), axis=1), AMAX_EPS)
    scale = tl.maximum(_div_const_rn(amax, FP8_MAX), MIN_SCALE)
    if UE8M0:
        scale = tl.math.exp2(tl.math.ceil(tl.math.log2(scale)))
    q2 = tl.clamp(_div_rn(tl.reshape(yq, (NG, GROUP)), tl.broadcast_to(scale[:, None], (NG, GROUP))), -FP8_MAX, FP8_MAX)
    q = tl.reshape(q2, (BLOCK,))
    tl.store(q_ptr + tl.cast(row, tl.int64) * H + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    g = tl.arange(0, NG)
    tl.store(qscale_ptr + tl.cast(row, tl.int64) * scale_stride_t + g * scale_stride_g, scale, mask=g < H // GROUP)


@triton.jit
def _fp4(y, row, q_ptr, qscale_ptr, gs, inv_gs, H: tl.constexpr, BLOCK: tl.constexpr, NVFP4: tl.constexpr,
         SWIZZLE: tl.constexpr, SCALE_COLS: tl.constexpr):
    """epilogue.nvfp4 (NVFP4: e4m3 scales per 16, optionally swizzled) or epilogue.mxfp4
    (E8M0 scales per 32); packed E2M1 codes, element ``2i`` in the low nibble."""
    FB: tl.constexpr = 16 if NVFP4 else 32  # epilogue.NVFP4_BLOCK / MXFP4_BLOCK
    NB: tl.constexpr = BLOCK // FB
    y2 = tl.reshape(y, (NB, FB))
    amax = tl.max(tl.abs(y2), axis=1)
    kb = tl.arange(0, NB)
    if NVFP4:
        # s = fp8(clamp(gs * (amax * (1/6)), +-448)); q = y * 1/(s * 1/gs), 1/0 := 1e-8
        s32 = tl.clamp(gs * (amax * (1.0 / 6.0)), -448.0, 448.0).to(tl.float8e4nv).to(tl.float32)
        d = s32 * inv_gs
        qs = tl.math.div_rn(tl.full(d.shape, 1.0, tl.float32), d + (d == 0).to(tl.float32) * 1e8)
        if SWIZZLE:  # [rows/128, cols/4, 32, 4, 4] tiles (epilogue.nvfp4_swizzle)
            soff = (((row // 128) * (SCALE_COLS // 4) + kb // 4) * 512
                    + (row % 32) * 16 + ((row // 32) % 4) * 4 + kb % 4)
            tl.store(qscale_ptr + soff, tl.where(kb < H // FB, s32, 0.0).to(tl.float8e4nv), mask=kb < SCALE_COLS)
        else:
            tl.store(qscale_ptr + tl.cast(row, tl.int64) * (H // FB) + kb, s32.to(tl.float8e4nv), mask=kb < H // FB)
    else:
        # epilogue.mxfp4: amax's exponent after rounding its mantissa to nearest,
        # e = clamp(floor(log2) - 2, +-127) (inf -> 127, 0 -> -127); q = y * 2^-e exactly
        bits = amax.to(tl.int32, bitcast=True)
        eb = ((bits + 0x200000) >> 23) & 0xFF
        e = tl.where(eb == 255, 127, tl.minimum(tl.maximum(eb - 129, -127), 127))
        # 2^-e: a normal fp32 power of two, except 2^-127 (subnormal, e = 127)
        qs = tl.where(e == 127, 0x00400000, (127 - e) << 23).to(tl.float32, bitcast=True)
        tl.store(qscale_ptr + tl.cast(row, tl.int64) * (H // FB) + kb, (e + 127).to(tl.uint8), mask=kb < H // FB)
    codes = _e2m1_codes(y2 * qs[:, None])
    lo, hi = tl.split(tl.reshape(codes, (BLOCK // 2, 2)))
    cols2 = tl.arange(0, BLOCK // 2)
    tl.store(q_ptr + tl.cast(row, tl.int64) * (H // 2) + cols2, (lo | (hi << 4)).to(tl.uint8), mask=cols2 < H // 2)


@triton.jit
def _stream(ptr, mask, EVICT: tl.constexpr):
    """A load read once per launch (a row of the input or the residual): with ``EVICT``,
    marked first out of L2 (``evict_first``, as Inductor marks its streamed loads), so the
    weight every row reads stays resident; a tuned launch option."""
    if EVICT:
        return tl.load(ptr, mask=mask, other=0.0, eviction_policy="evict_first")
    else:
        return tl.load(ptr, mask=mask, other=0.0)


@triton.jit
def _weight(w_ptr, cols, mask, HAS_W: tl.constexpr, EVICT: tl.constexpr):
    """The norm weight's columns in fp32 (0.0 without a weight): with ``EVICT``, marked to stay
    in L2 (``evict_last``), since every row reads it."""
    if HAS_W:
        if EVICT:
            return tl.load(w_ptr + cols, mask=mask, other=0.0, eviction_policy="evict_last").to(tl.float32)
        else:
            return tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        return 0.0


@triton.jit
def _fp8_static(yq, inv_scale, q_ptr, off, mask, FP8_MAX: tl.constexpr):
    """epilogue.fp8_static: ``clamp(yq * (1 / scale))`` stored as FP8 at ``q_ptr + off``."""
    q = tl.clamp(yq * inv_scale, -FP8_MAX, FP8_MAX)
    tl.store(q_ptr + off, q.to(q_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_residual(s, r_in, act, RES_FP32: tl.constexpr):
    """The residual add, ``(s, v)``: ``s`` the sum everything after reads and ``v`` the one the
    variance reads. RES_FP32 0: aten.add in the activation dtype, both rounded; 1: vLLM
    fused_add_rms_norm, both the unrounded fp32 sum; 2: sum_stored, the variance on the
    unrounded sum, the rest on the rounded one."""
    if RES_FP32 == 1:
        s = s + r_in
        v = s
    elif RES_FP32 == 2:
        v = s + r_in
        s = v.to(act).to(tl.float32)
    else:
        s = (s + r_in).to(act).to(tl.float32)
        v = s
    return s, v


@triton.jit
def epilogue_row(
    s, row, cols, mask, res_ptr, w, res_out_ptr, norm_ptr, q_ptr, qscale_ptr, inv_scale, ub, gs, inv_gs, eps,
    scale_stride_t, scale_stride_g, H: tl.constexpr, BLOCK: tl.constexpr, HAS_RES: tl.constexpr,
    RES_FP32: tl.constexpr, HAS_W: tl.constexpr, GEMMA: tl.constexpr, W_FP32: tl.constexpr,
    WRITE_NORM: tl.constexpr, QUANT: tl.constexpr, HAS_UB: tl.constexpr, GROUP: tl.constexpr,
    UE8M0: tl.constexpr, FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr, AMAX_EPS: tl.constexpr,
    SWIZZLE: tl.constexpr, SCALE_COLS: tl.constexpr, Q_RAW: tl.constexpr = False, EVICT: tl.constexpr = False,
):
    """Everything after the all-reduce for one row: ``s`` is the reduced row in fp32
    (already rounded to the activation dtype, as the collective returns it)."""
    act = res_out_ptr.dtype.element_ty
    off = tl.cast(row, tl.int64) * H
    v = s
    if HAS_RES:
        s, v = _add_residual(s, _stream(res_ptr + off + cols, mask, EVICT).to(tl.float32), act, RES_FP32)
    tl.store(res_out_ptr + off + cols, s.to(act), mask=mask)
    out_ty = norm_ptr.dtype.element_ty
    y, yq = _norm(s, v, w, eps, H, HAS_W, GEMMA, W_FP32, act, out_ty, Q_RAW != 0)
    if WRITE_NORM:
        tl.store(norm_ptr + off + cols, y.to(out_ty), mask=mask)
    # What a dynamic scale's amax reads: with Q_RAW the unrounded value, as Inductor's Triton
    # code does (epilogue.amax_reads_unrounded). On 1x H100 (tests/gpu/parity_check.py,
    # 2026-12-07) the codes then differ from the unfused compile's in 0.000-0.058%.
    ya = y
    if Q_RAW != 0:
        ya = yq
    if Q_RAW == 2:  # amax_unrounded: the codes, a loop after the store in the compile, read y rounded
        yq = y
    if QUANT == 1:
        _fp8_static(yq, inv_scale, q_ptr, off + cols, mask, FP8_MAX)
    elif QUANT == 2:
        _fp8_per_token(ya, yq, row, q_ptr, qscale_ptr, ub, cols, mask, scale_stride_t, HAS_UB, FP8_MAX, MIN_SCALE, H)
    elif QUANT == 3:
        _fp8_per_group(ya, yq, row, q_ptr, qscale_ptr, cols, mask, scale_stride_t, scale_stride_g, H, BLOCK, GROUP,
                       UE8M0, FP8_MAX, MIN_SCALE, AMAX_EPS)
    elif QUANT == 4 or QUANT == 5:
        _fp4(y, row, q_ptr, qscale_ptr, gs, inv_gs, H, BLOCK, QUANT == 4, SWIZZLE, SCALE_COLS)


@triton.jit
def epilogue_row_looped(
    row, in_ptr, res_ptr, w_ptr, res_out_ptr, norm_ptr, q_ptr, inv_scale, eps, H: tl.constexpr,
    CHUNK: tl.constexpr, HAS_RES: tl.constexpr, RES_FP32: tl.constexpr, HAS_W: tl.constexpr, GEMMA: tl.constexpr,
    W_FP32: tl.constexpr, WRITE_NORM: tl.constexpr, QUANT: tl.constexpr, FP8_MAX: tl.constexpr,
    Q_RAW: tl.constexpr, EVICT: tl.constexpr,
):
    """:func:`epilogue_row` at world size 1 with the row in ``CHUNK``-wide pieces, in two
    passes, as Inductor's looped reductions do: the first adds, stores the sum and accumulates
    its squares per lane, the second reads the stored sum back (just written: in L2) with the
    weight and normalizes. Fewer live registers than a whole row; a tuned launch option. Only
    where the second pass needs nothing but the stored (rounded) sum: no quant or static FP8,
    the residual added in the activation dtype or ``sum_stored`` (:func:`looped_supported`).
    The variance's lanes are summed in another order than the one-pass kernel's."""
    act = res_out_ptr.dtype.element_ty
    out_ty = norm_ptr.dtype.element_ty
    off = tl.cast(row, tl.int64) * H
    acc = tl.zeros([CHUNK], dtype=tl.float32)
    for c in tl.range(0, H, CHUNK):
        cols = c + tl.arange(0, CHUNK)
        mask = cols < H
        s = _stream(in_ptr + off + cols, mask, EVICT).to(tl.float32)
        v = s
        if HAS_RES:
            s, v = _add_residual(s, _stream(res_ptr + off + cols, mask, EVICT).to(tl.float32), act, RES_FP32)
        tl.store(res_out_ptr + off + cols, s.to(act), mask=mask)
        acc += v * v
    rstd = tl.math.rsqrt(tl.sum(acc, axis=0) / H + eps)
    for c in tl.range(0, H, CHUNK):
        cols = c + tl.arange(0, CHUNK)
        mask = cols < H
        s = _stream(res_out_ptr + off + cols, mask, EVICT).to(tl.float32)
        w = _weight(w_ptr, cols, mask, HAS_W, EVICT)
        y, yq = _scale(s, rstd, w, HAS_W, GEMMA, W_FP32, act, out_ty, Q_RAW == 1)
        if WRITE_NORM:
            tl.store(norm_ptr + off + cols, y.to(out_ty), mask=mask)
        if QUANT == 1:
            _fp8_static(yq, inv_scale, q_ptr, off + cols, mask, FP8_MAX)


def looped_supported(quant: int, res_fp32: int) -> bool:
    """Whether :func:`epilogue_row_looped` computes this call: its second pass reads only the
    stored sum, so no dynamic scale (a row's amax is a third pass) and no norm of the
    unrounded fp32 sum (``RES_FP32`` 1, which the store rounds away)."""
    return quant in (QUANT_NONE, QUANT_FP8_STATIC) and res_fp32 in (0, 2)


@triton.jit
def epilogue_tile(
    pid, T, in_ptr, res_ptr, w, res_out_ptr, norm_ptr, q_ptr, inv_scale, eps, H: tl.constexpr, BLOCK: tl.constexpr,
    TILE: tl.constexpr, HAS_RES: tl.constexpr, RES_FP32: tl.constexpr, HAS_W: tl.constexpr, GEMMA: tl.constexpr,
    W_FP32: tl.constexpr, WRITE_NORM: tl.constexpr, QUANT: tl.constexpr, FP8_MAX: tl.constexpr,
    Q_RAW: tl.constexpr, EVICT: tl.constexpr,
):
    """:func:`epilogue_row` at world size 1 for ``TILE`` consecutive rows at once, a
    ``[TILE, BLOCK]`` block (as Inductor's ``XBLOCK``): every row's loads in flight together,
    one reduction per row along the block's second axis. Only where nothing after the norm
    reduces a row again: no quant or static FP8 (:func:`tile_supported`). The variance's lanes
    may be summed in another order than the one-pass kernel's (the block's layout is Triton's)."""
    act = res_out_ptr.dtype.element_ty
    out_ty = norm_ptr.dtype.element_ty
    rows = pid * TILE + tl.arange(0, TILE)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    mask = (rows < T) & (cols < H)
    off = tl.cast(rows, tl.int64) * H + cols
    s = _stream(in_ptr + off, mask, EVICT).to(tl.float32)
    v = s
    if HAS_RES:
        s, v = _add_residual(s, _stream(res_ptr + off, mask, EVICT).to(tl.float32), act, RES_FP32)
    tl.store(res_out_ptr + off, s.to(act), mask=mask)
    rstd = tl.math.rsqrt(tl.sum(v * v, axis=1)[:, None] / H + eps)
    if HAS_W:
        w = w[None, :]
    y, yq = _scale(s, rstd, w, HAS_W, GEMMA, W_FP32, act, out_ty, Q_RAW == 1)
    if WRITE_NORM:
        tl.store(norm_ptr + off, y.to(out_ty), mask=mask)
    if QUANT == 1:
        _fp8_static(yq, inv_scale, q_ptr, off, mask, FP8_MAX)


def tile_supported(quant: int) -> bool:
    """Whether :func:`epilogue_tile` computes this call: no dynamic scale (a row's amax, or a
    group's, is laid out for one row per program) and no FP4."""
    return quant in (QUANT_NONE, QUANT_FP8_STATIC)


# T (the row count) only bounds loops and masks, never an address: no binary per "T % 16 == 0", which
# would compile every launch config once more across tune's buckets (1 token stays its own binary)
@triton.jit(do_not_specialize_on_alignment=["T"])
def fused_allreduce_add_rmsnorm_kernel(
    in_ptr,
    res_ptr,
    w_ptr,
    res_out_ptr,
    norm_ptr,
    q_ptr,
    qscale_ptr,  # scales written (per-token / per-group) or read (static)
    ub_ptr,  # per-token scale upper bound (fp32 scalar), if HAS_UB; NVFP4: the global scale
    buf_ptrs,  # device array of WS peer buffer pointers (WS > 1)
    sig_ptrs,  # device array of WS peer signal-pad pointers (WS > 1)
    T,
    eps,
    scale_stride_t,
    scale_stride_g,
    H: tl.constexpr,
    BLOCK: tl.constexpr,
    RANK: tl.constexpr,
    WS: tl.constexpr,
    HAS_RES: tl.constexpr,
    RES_FP32: tl.constexpr,
    HAS_W: tl.constexpr,
    GEMMA: tl.constexpr,
    W_FP32: tl.constexpr,
    WRITE_NORM: tl.constexpr,
    QUANT: tl.constexpr,
    HAS_UB: tl.constexpr,
    GROUP: tl.constexpr,
    UE8M0: tl.constexpr,
    FP8_MAX: tl.constexpr,
    MIN_SCALE: tl.constexpr,  # per-token / per-group floor of the scale
    AMAX_EPS: tl.constexpr,  # per-group FP8: floor of each quant group's absmax
    SWIZZLE: tl.constexpr = False,  # NVFP4 scales in the 128x4-tiled layout
    SCALE_COLS: tl.constexpr = 1,  # NVFP4 swizzled: round_up(H / 16, 4)
    # 1: FP8 codes and amax from the unrounded norm value (quant_unrounded); 2: the amax alone (amax_unrounded)
    Q_RAW: tl.constexpr = 0,
    ROWS: tl.constexpr = 1,  # world size 1: rows per program (a tuned launch config)
    EVICT: tl.constexpr = False,  # world size 1: streamed loads evict_first (a tuned launch config)
    CHUNK: tl.constexpr = 0,  # world size 1: the row in CHUNK-wide pieces, two passes (a tuned launch config; 0: whole)
    TILE: tl.constexpr = 1,  # world size 1: TILE rows at once, a [TILE, BLOCK] block (a tuned launch config)
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    act = in_ptr.dtype.element_ty
    w = _weight(w_ptr, cols, mask, HAS_W, EVICT)
    inv_scale = tl.math.div_rn(1.0, tl.load(qscale_ptr).to(tl.float32)) if QUANT == 1 else 0.0
    ub = tl.load(ub_ptr).to(tl.float32) if HAS_UB else 0.0
    gs = tl.load(ub_ptr).to(tl.float32) if QUANT == 4 else 0.0  # NVFP4's global scale
    # epilogue.nvfp4: 1 / global_scale, with vLLM's get_reciprocal (1/0 := 1e-8)
    inv_gs = tl.math.div_rn(1.0, gs + (gs == 0).to(tl.float32) * 1e8) if QUANT == 4 else 0.0

    if WS == 1 and TILE > 1:  # TILE rows per program at once (epilogue_tile)
        epilogue_tile(pid, T, in_ptr, res_ptr, w, res_out_ptr, norm_ptr, q_ptr, inv_scale, eps, H, BLOCK,
                      TILE, HAS_RES, RES_FP32, HAS_W, GEMMA, W_FP32, WRITE_NORM, QUANT, FP8_MAX, Q_RAW, EVICT)
    elif WS == 1 and CHUNK > 0:  # ROWS rows per program, each in CHUNK-wide pieces (epilogue_row_looped)
        for row in range(pid * ROWS, tl.minimum(pid * ROWS + ROWS, T)):
            epilogue_row_looped(row, in_ptr, res_ptr, w_ptr, res_out_ptr, norm_ptr, q_ptr, inv_scale, eps, H, CHUNK,
                                HAS_RES, RES_FP32, HAS_W, GEMMA, W_FP32, WRITE_NORM, QUANT, FP8_MAX, Q_RAW, EVICT)
    elif WS == 1 and ROWS == 1:  # one row per program, no loop: the shortest path from load to store
        s = _stream(in_ptr + tl.cast(pid, tl.int64) * H + cols, mask, EVICT).to(tl.float32)
        epilogue_row(s, pid, cols, mask, res_ptr, w, res_out_ptr, norm_ptr, q_ptr, qscale_ptr, inv_scale, ub, gs,
                      inv_gs, eps, scale_stride_t, scale_stride_g, H, BLOCK, HAS_RES, RES_FP32, HAS_W, GEMMA, W_FP32,
                      WRITE_NORM, QUANT, HAS_UB, GROUP, UE8M0, FP8_MAX, MIN_SCALE, AMAX_EPS, SWIZZLE, SCALE_COLS,
                      Q_RAW, EVICT)
    elif WS == 1:  # ROWS consecutive rows per program: the weight loaded once, the loop pipelined (num_stages)
        for row in range(pid * ROWS, tl.minimum(pid * ROWS + ROWS, T)):
            s = _stream(in_ptr + tl.cast(row, tl.int64) * H + cols, mask, EVICT).to(tl.float32)
            epilogue_row(s, row, cols, mask, res_ptr, w, res_out_ptr, norm_ptr, q_ptr, qscale_ptr, inv_scale, ub,
                          gs, inv_gs, eps, scale_stride_t, scale_stride_g, H, BLOCK, HAS_RES, RES_FP32, HAS_W, GEMMA,
                          W_FP32, WRITE_NORM, QUANT, HAS_UB, GROUP, UE8M0, FP8_MAX, MIN_SCALE, AMAX_EPS, SWIZZLE,
                          SCALE_COLS, Q_RAW, EVICT)
    else:
        nprog = tl.num_programs(0)
        bufs = buf_ptrs.to(tl.pointer_type(tl.uint64))
        mine = tl.multiple_of(tl.load(bufs + RANK).to(tl.pointer_type(act)), 16)
        for row in range(pid, T, nprog):
            off = tl.cast(row, tl.int64) * H
            tl.store(mine + off + cols, tl.load(in_ptr + off + cols, mask=mask), mask=mask)
        _barrier(sig_ptrs, pid, RANK, WS)
        for row in range(pid, T, nprog):
            off = tl.cast(row, tl.int64) * H
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for r in tl.static_range(WS):
                if r == RANK:
                    src = in_ptr
                else:
                    src = tl.multiple_of(tl.load(bufs + r).to(tl.pointer_type(act)), 16)
                acc += tl.load(src + off + cols, mask=mask, other=0.0).to(tl.float32)
            s = acc.to(act).to(tl.float32)  # the all-reduce's result is in the activation dtype
            epilogue_row(s, row, cols, mask, res_ptr, w, res_out_ptr, norm_ptr, q_ptr, qscale_ptr, inv_scale, ub,
                          gs, inv_gs, eps, scale_stride_t, scale_stride_g, H, BLOCK, HAS_RES, RES_FP32, HAS_W, GEMMA,
                          W_FP32, WRITE_NORM, QUANT, HAS_UB, GROUP, UE8M0, FP8_MAX, MIN_SCALE, AMAX_EPS, SWIZZLE,
                          SCALE_COLS, Q_RAW)
        _barrier(sig_ptrs, pid, RANK, WS)  # peers are done reading this rank's buffer
