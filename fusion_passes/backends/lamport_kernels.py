"""The wait-free ("Lamport") one-shot kernel of the ``triton`` backend: the data is the flag.

Every rank owns a buffer of three slots, each ``[WS, T_max, H]`` elements of the
activation dtype, filled with the sentinel ``-0.0`` (bits ``0x8000`` in bf16/fp16,
``0x80000000`` in fp32). Call ``k`` (its parity ``k % 3`` lives in device memory, in
``state``) runs, per program of a persistent grid:

1. **push**: each of its rows of the input, with ``-0.0`` replaced by ``+0.0`` (the sum is
   unchanged), is stored into slot ``k % 3`` of EVERY rank's buffer (this one included),
   at region ``[RANK]``;
2. **re-arm**: its share of the slot the PREVIOUS call used in this rank's own buffer is
   filled with the sentinel again (that slot is next written by call ``k + 2``, which a
   peer can only start after reading this rank's data of call ``k + 1``, pushed after
   this kernel has finished);
3. **read**: for each of its rows it loads the ``WS`` regions of slot ``k % 3`` from this
   rank's OWN buffer (local memory) with volatile loads until no element is the sentinel,
   sums them in fp32 in rank order (every rank gets the same bits), rounds to the
   activation dtype (what an all-reduce returns) and runs the epilogue of
   :mod:`fusion_passes.backends.triton_kernels`.

There is no barrier: a reader waits on the data itself. Program 0 finally waits until
every program has read the parity (a counter in ``state``), then advances it and records
how many elements the next call must re-arm; so the protocol needs no host counter and
replays under CUDA graphs. The grid must be resident on every rank at once (the launcher
caps it at one wave), or a program could wait on a peer program that is not scheduled.

Written for this project after reading the TensorRT-LLM / FlashInfer one-shot "Lamport"
all-reduce fusion kernels (``allReduceFusionKernels.cu``: triple buffering, -0.0 sentinel,
a parity in device memory). Peers are written with plain stores over NVLink/P2P, read
locally; multicast is never used.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fusion_passes.backends.triton_kernels import epilogue_row, thread_index


@triton.jit
def _arrive(addr):
    """One relaxed atomic add of 1 per program (thread 0 only)."""
    if thread_index() == 0:
        tl.inline_asm_elementwise("atom.global.relaxed.gpu.add.u32 $0, [$1], 1;", "=r, l", [addr],
                                  dtype=tl.uint32, is_pure=False, pack=1)


@triton.jit
def _push(in_ptr, peers, slot_off, T, pid, nprog, cols, mask, H: tl.constexpr, RANK: tl.constexpr,
          WS: tl.constexpr, BITS: tl.constexpr, SENT: tl.constexpr, TO_OWNER: tl.constexpr):
    """Phase 1: each row of the input, -0.0 replaced by +0.0 (the sentinel never travels as
    data), into region ``[RANK]`` of the slot: of every rank, this one included (one-shot),
    or only of the row's owner ``row % WS`` (two-shot)."""
    for row in range(pid, T, nprog):
        off = tl.cast(row, tl.int64) * H
        x = tl.load(in_ptr + off + cols, mask=mask).to(BITS, bitcast=True)
        x = tl.where(x == SENT, 0, x)
        if TO_OWNER:
            base = tl.load(peers + row % WS).to(tl.pointer_type(BITS))
            tl.store(base + slot_off + tl.cast(RANK, tl.int64) * T * H + off + cols, x, mask=mask)
        else:
            dst = slot_off + tl.cast(RANK, tl.int64) * T * H + off
            for p in tl.static_range(WS):
                base = tl.load(peers + p).to(tl.pointer_type(BITS))
                tl.store(base + dst + cols, x, mask=mask)


@triton.jit
def _rearm(mine, clear_off, clear_n, pid, nprog, cols, BLOCK: tl.constexpr, BITS: tl.constexpr,
           SENT: tl.constexpr):
    sent = tl.full([BLOCK], SENT, BITS)
    for start in range(pid * BLOCK, clear_n, nprog * BLOCK):
        idx = start + cols
        tl.store(mine + clear_off + idx, sent, mask=idx < clear_n)


@triton.jit
def _reduce_owned(peers, mine, slot_off, T, pid, nprog, cols, mask, act, H: tl.constexpr, BLOCK: tl.constexpr,
                  RANK: tl.constexpr, WS: tl.constexpr, BITS: tl.constexpr, SENT: tl.constexpr):
    """Two-shot phase 2: sum the owned rows (``RANK, RANK + WS, ...``) over the WS regions,
    round to the activation dtype and push each sum into every rank's gather region."""
    gather = slot_off + tl.cast(WS, tl.int64) * T * H
    for k in range(pid, tl.cdiv(T - RANK, WS), nprog):
        row = RANK + k * WS
        off = tl.cast(row, tl.int64) * H
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for r in tl.static_range(WS):
            v = _wait_row(mine + slot_off + tl.cast(r, tl.int64) * T * H + off, cols, mask, BITS, SENT)
            acc += v.to(act, bitcast=True).to(tl.float32)
        x = acc.to(act).to(BITS, bitcast=True)
        x = tl.where(x == SENT, 0, x)
        for p in tl.static_range(WS):
            base = tl.load(peers + p).to(tl.pointer_type(BITS))
            tl.store(base + gather + off + cols, x, mask=mask)


@triton.jit
def _wait_row(src, cols, mask, BITS: tl.constexpr, SENT: tl.constexpr):
    """Volatile loads of one row until none of its elements is the sentinel."""
    v = tl.load(src + cols, mask=mask, other=0, volatile=True)
    while tl.max((v == SENT).to(tl.int32), axis=0) > 0:
        v = tl.load(src + cols, mask=mask, other=0, volatile=True)
    return v


@triton.jit
def lamport_kernel(
    in_ptr, res_ptr, w_ptr, res_out_ptr, norm_ptr, q_ptr, qscale_ptr, ub_ptr,
    peers_ptr,  # device int64[WS]: base address of every rank's Lamport buffer
    state_ptr,  # this rank's int32[lamport.STATE_WORDS]: [0] arrived programs, [1] parity 0..2, [2] to re-arm
    T, eps, scale_stride_t, scale_stride_g, slot_elems,
    H: tl.constexpr, BLOCK: tl.constexpr, RANK: tl.constexpr, WS: tl.constexpr, HAS_RES: tl.constexpr,
    RES_FP32: tl.constexpr, HAS_W: tl.constexpr, GEMMA: tl.constexpr, W_FP32: tl.constexpr,
    WRITE_NORM: tl.constexpr, QUANT: tl.constexpr, HAS_UB: tl.constexpr, GROUP: tl.constexpr,
    UE8M0: tl.constexpr, FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr, AMAX_EPS: tl.constexpr,
    SWIZZLE: tl.constexpr, SCALE_COLS: tl.constexpr, BITS: tl.constexpr, SENT: tl.constexpr,
    TWO_SHOT: tl.constexpr = False, Q_RAW: tl.constexpr = 0,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    act = in_ptr.dtype.element_ty
    parity = tl.load(state_ptr + 1, volatile=True)
    clear_n = tl.load(state_ptr + 2, volatile=True)
    _arrive(state_ptr)
    peers = peers_ptr.to(tl.pointer_type(tl.int64))
    mine = tl.load(peers + RANK).to(tl.pointer_type(BITS))
    slot_off = tl.cast(parity % 3, tl.int64) * slot_elems

    _push(in_ptr, peers, slot_off, T, pid, nprog, cols, mask, H, RANK, WS, BITS, SENT, TWO_SHOT)
    _rearm(mine, tl.cast((parity + 2) % 3, tl.int64) * slot_elems, clear_n, pid, nprog, cols, BLOCK, BITS, SENT)

    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) if HAS_W else 0.0
    inv_scale = tl.math.div_rn(1.0, tl.load(qscale_ptr).to(tl.float32)) if QUANT == 1 else 0.0
    ub = tl.load(ub_ptr).to(tl.float32) if HAS_UB else 0.0
    gs = tl.load(ub_ptr).to(tl.float32) if QUANT == 4 else 0.0
    inv_gs = tl.math.div_rn(1.0, gs + (gs == 0).to(tl.float32) * 1e8) if QUANT == 4 else 0.0
    if TWO_SHOT:
        _reduce_owned(peers, mine, slot_off, T, pid, nprog, cols, mask, act, H, BLOCK, RANK, WS, BITS, SENT)
    for row in range(pid, T, nprog):
        off = tl.cast(row, tl.int64) * H
        if TWO_SHOT:  # the owner's sum, already rounded to the activation dtype
            g = mine + slot_off + tl.cast(WS, tl.int64) * T * H + off
            s = _wait_row(g, cols, mask, BITS, SENT).to(act, bitcast=True).to(tl.float32)
        else:
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for r in tl.static_range(WS):
                v = _wait_row(mine + slot_off + tl.cast(r, tl.int64) * T * H + off, cols, mask, BITS, SENT)
                acc += v.to(act, bitcast=True).to(tl.float32)
            s = acc.to(act).to(tl.float32)  # the all-reduce's result is in the activation dtype
        epilogue_row(s, row, cols, mask, res_ptr, w, res_out_ptr, norm_ptr, q_ptr, qscale_ptr, inv_scale, ub,
                      gs, inv_gs, eps, scale_stride_t, scale_stride_g, H, BLOCK, HAS_RES, RES_FP32, HAS_W, GEMMA,
                      W_FP32, WRITE_NORM, QUANT, HAS_UB, GROUP, UE8M0, FP8_MAX, MIN_SCALE, AMAX_EPS, SWIZZLE,
                      SCALE_COLS, Q_RAW)

    if pid == 0:  # every program has read the parity: advance it for the next call
        arrived = tl.load(state_ptr, volatile=True)
        while arrived < nprog:
            arrived = tl.load(state_ptr, volatile=True)
        tl.store(state_ptr + 2, (WS + 1) * T * H if TWO_SHOT else WS * T * H)
        tl.store(state_ptr + 1, (parity + 1) % 3)
        tl.store(state_ptr, 0)
