"""The ``triton`` backend: our portable fused kernel over torch symmetric memory.

One Triton kernel (:mod:`fusion_passes.backends.triton_kernels`) does the all-reduce
(one-shot: every rank reads every peer's copy of the rows it owns from symmetric
memory), the residual add, RMSNorm and the optional FP8 quantization, with fp32
accumulation. At world size 1 it is a fused add + RMSNorm (+ quant) kernel that reads
the input in place.

Variants (and their ``run`` arguments after those of ``add_rmsnorm``):

=============================  ======================================  =====================
variant                        quant parameters                        returns
=============================  ======================================  =====================
``add_rmsnorm``                --                                      ``(norm_out, residual_out)``
``add_rmsnorm_fp8_static``     ``scale`` (fp32, 1 element)             ``(q, None, residual_out, norm_out|None)``
``add_rmsnorm_fp8_per_token``  ``scale_ub`` (fp32 tensor or None)      ``(q, scales[T,1], residual_out, norm_out|None)``
``add_rmsnorm_fp8_per_group``  ``group_size, ue8m0, column_major``     ``(q, scales[T,H/g], residual_out, norm_out|None)``
``add_rmsnorm_nvfp4``          ``global_scale, swizzle=True``          ``(packed[T,H/2] u8, e4m3 scales, residual_out, norm_out|None)``
``add_rmsnorm_mxfp4``          --                                      ``(packed[T,H/2] u8, e8m0 scales[T,H/32] u8, residual_out, norm_out|None)``
=============================  ======================================  =====================

Every quant variant also takes ``with_norm_out=False`` (keyword or last positional):
``True`` also returns the norm output (the "Out" variants). Every variant takes
``residual_in_fp32=False`` (keyword): ``True`` adds the residual in fp32 and normalizes
the unrounded sum (vLLM's ``fused_add_rms_norm``; :func:`fusion_passes.epilogue.add_rms_norm`).

FP4 (fp16/bf16 activations only): NVFP4 scales are ``float8_e4m3fn``, ``[T, H/16]``
linear or, with ``swizzle``, ``[round_up(T,128), round_up(H/16,4)]`` in the 128x4-tiled
layout with zero padding (:func:`fusion_passes.epilogue.nvfp4_swizzle`); packed bytes
hold element ``2i`` in the low nibble. The E2M1 rounding is arithmetic on the fp32 value
and its bits (the PTX ``cvt...e2m1x2`` needs sm_100+), equal to
:func:`fusion_passes.epilogue.e2m1_codes` (see ``triton_kernels._e2m1_codes``);
``tests/gpu/triton_check.py`` checks the whole quant on an H200 (passed at world sizes 1
and 2 on 2026-11-29: packed codes and scales byte-identical to the epilogue on the
kernel's own norm output). From ``TRITON["fp4_many_tokens"]`` tokens on, the FP4
variants run with fewer warps per row (a measured choice; see thresholds.py).

Every number it gates on is in :data:`fusion_passes.backends.thresholds.TRITON`.

Multi-rank use (:mod:`fusion_passes.backends.symm`): one symmetric workspace per group,
registered collectively on the first eager call of a size (or :func:`symm.reserve`), then
reused, so calls replay under CUDA graphs; a call that needs a larger workspace during
capture raises. Calls on one group must be ordered on one stream, as NCCL's are on one
communicator: two concurrent calls would share the workspace.

Not implemented: a two-shot (reduce-scatter + all-gather) kernel. At world size 2 it
moves exactly the one-shot's NVLink bytes per direction, and world sizes 4/8, where it
would pay, could not be measured here; the gate declines those world sizes instead.
(GPU issue 7 asked for it as its lowest priority; it was not written or measured in that
round, so nothing selects it.) For the quant variants, running the epilogue on owned rows
and gathering the outputs moves more at world size 2, not less: per rank half the
input (T*H bytes at bf16) plus the peer's residual_out, codes and scales (about
1.25 T*H for FP4, 1.5 T*H for FP8) against the one-shot's 2 T*H. Not written in the
FP4 round either (2026-11-29).
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from fusion_passes import epilogue
from fusion_passes.backends import Call, thresholds
from fusion_passes.backends import symm

LIMITS = thresholds.TRITON

VARIANTS = frozenset(
    {"add_rmsnorm", "add_rmsnorm_fp8_static", "add_rmsnorm_fp8_per_token", "add_rmsnorm_fp8_per_group",
     "add_rmsnorm_nvfp4", "add_rmsnorm_mxfp4"}
)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# FP4 variants: elements per scale block (the epilogue's), and the activations they take.
FP4_BLOCK = {"add_rmsnorm_nvfp4": epilogue.NVFP4_BLOCK, "add_rmsnorm_mxfp4": epilogue.MXFP4_BLOCK}
FP4_DTYPES = epilogue.FP4_INPUT_DTYPES

# The quant math is fusion_passes.epilogue's (the oracle); its constants come from there.
FP8_DTYPE = torch.float8_e4m3fn  # the only FP8 format of this backend (CUDA)
FP8_MAX = epilogue.fp8_max(FP8_DTYPE)
PER_TOKEN_MIN_SCALE = epilogue.fp8_min_scaling_factor(FP8_DTYPE)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def num_warps_for(hidden: int) -> int:
    return max(1, min(int(LIMITS["max_warps"]), _next_pow2(hidden) // int(LIMITS["elements_per_warp"])))


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


class TritonBackend:
    """Fused all-reduce + add + RMSNorm (+ FP8) in one Triton kernel (NVIDIA GPUs)."""

    name = "triton"
    variants = VARIANTS
    # Per-group keyword options of fusion_passes.ops it runs itself (others: reference).
    quant_options = frozenset({"amax_eps", "scale_min"})

    @functools.cached_property
    def _k(self):
        from fusion_passes.backends import triton_kernels  # imports triton on first run only

        return triton_kernels

    # -- gate ------------------------------------------------------------------------
    def unsupported(self, call: Call) -> str | None:
        return unsupported(call)

    # -- run -------------------------------------------------------------------------
    def run(self, variant: str, *args, **kwargs):
        if variant not in VARIANTS:
            raise ValueError(f"fusion_passes: the triton backend does not implement {variant!r}")
        return getattr(self, variant)(*args, **kwargs)

    def add_rmsnorm(self, input, residual, weight, eps, group, gemma, weight_in_fp32, *,
                    residual_in_fp32=False):
        norm, res_out, _, _ = self._launch(
            input, residual, weight, eps, group, gemma, weight_in_fp32,
            quant=self._k.QUANT_NONE, write_norm=True, residual_in_fp32=residual_in_fp32,
        )
        return norm, res_out

    def add_rmsnorm_fp8_static(self, input, residual, weight, eps, group, gemma, weight_in_fp32,
                               scale, with_norm_out=False, *, residual_in_fp32=False):
        norm, res_out, q, _ = self._launch(
            input, residual, weight, eps, group, gemma, weight_in_fp32,
            quant=self._k.QUANT_FP8_STATIC, write_norm=with_norm_out, scale=scale,
            residual_in_fp32=residual_in_fp32,
        )
        return q, None, res_out, norm

    def add_rmsnorm_fp8_per_token(self, input, residual, weight, eps, group, gemma, weight_in_fp32,
                                  scale_ub=None, with_norm_out=False, *, residual_in_fp32=False):
        norm, res_out, q, scales = self._launch(
            input, residual, weight, eps, group, gemma, weight_in_fp32,
            quant=self._k.QUANT_FP8_PER_TOKEN, write_norm=with_norm_out, scale_ub=scale_ub,
            residual_in_fp32=residual_in_fp32,
        )
        return q, scales, res_out, norm

    def add_rmsnorm_fp8_per_group(self, input, residual, weight, eps, group, gemma, weight_in_fp32,
                                  group_size=128, ue8m0=False, column_major=False, with_norm_out=False,
                                  amax_eps=None, scale_min=None, *, residual_in_fp32=False):
        from fusion_passes.ops import KERNEL_GROUP_EPS, kernel_group_scale_min  # the op's defaults

        if group_size not in LIMITS["per_group_sizes"] or input.shape[-1] % group_size:
            # unsupported() declines such a call (Call.group_size); a direct run() still
            # gets the right answer, unfused.
            from fusion_passes.backends.reference import ReferenceBackend

            return ReferenceBackend().run(
                "add_rmsnorm_fp8_per_group", input, residual, weight, eps, group, gemma, weight_in_fp32,
                group_size, ue8m0, column_major, with_norm_out=with_norm_out, amax_eps=amax_eps,
                scale_min=scale_min, residual_in_fp32=residual_in_fp32,
            )
        norm, res_out, q, scales = self._launch(
            input, residual, weight, eps, group, gemma, weight_in_fp32,
            quant=self._k.QUANT_FP8_PER_GROUP, write_norm=with_norm_out, residual_in_fp32=residual_in_fp32,
            group_size=group_size, ue8m0=ue8m0, column_major=column_major,
            amax_eps=KERNEL_GROUP_EPS if amax_eps is None else amax_eps,
            scale_min=kernel_group_scale_min(ue8m0) if scale_min is None else scale_min,
        )
        return q, scales, res_out, norm

    def add_rmsnorm_nvfp4(self, input, residual, weight, eps, group, gemma, weight_in_fp32,
                          global_scale, swizzle=True, with_norm_out=False, *, residual_in_fp32=False):
        _check_fp4(input, "add_rmsnorm_nvfp4")
        norm, res_out, q, scales = self._launch(
            input, residual, weight, eps, group, gemma, weight_in_fp32,
            quant=self._k.QUANT_NVFP4, write_norm=with_norm_out, global_scale=global_scale,
            swizzle=bool(swizzle), residual_in_fp32=residual_in_fp32,
        )
        return q, scales, res_out, norm

    def add_rmsnorm_mxfp4(self, input, residual, weight, eps, group, gemma, weight_in_fp32,
                          with_norm_out=False, *, residual_in_fp32=False):
        _check_fp4(input, "add_rmsnorm_mxfp4")
        norm, res_out, q, scales = self._launch(
            input, residual, weight, eps, group, gemma, weight_in_fp32,
            quant=self._k.QUANT_MXFP4, write_norm=with_norm_out, residual_in_fp32=residual_in_fp32,
        )
        return q, scales, res_out, norm

    def _launch(self, input, residual, weight, eps, group, gemma, weight_in_fp32, *, quant, write_norm,
                scale=None, scale_ub=None, group_size=128, ue8m0=False, column_major=False,
                amax_eps=0.0, scale_min=0.0, global_scale=None, swizzle=True, residual_in_fp32=False):
        k = self._k
        hidden = input.shape[-1]
        lead = input.shape[:-1]
        x = input.reshape(-1, hidden).contiguous()
        tokens = x.shape[0]
        res = None if residual is None else residual.reshape(-1, hidden).contiguous()
        w = None if weight is None else weight.contiguous()
        dev = x.device
        out_dtype = x.dtype
        if w is not None and not (weight_in_fp32 or gemma):
            out_dtype = torch.promote_types(w.dtype, x.dtype)

        res_out = torch.empty_like(x)
        write_norm = write_norm or quant == k.QUANT_NONE
        norm = torch.empty((tokens, hidden), dtype=out_dtype, device=dev) if write_norm else None
        q = scales = None
        fp4 = quant in (k.QUANT_NVFP4, k.QUANT_MXFP4)
        if fp4:  # two E2M1 codes per byte; [T, H/2] whatever the input's leading dims (ops' fakes)
            q = torch.empty((tokens, hidden // 2), dtype=torch.uint8, device=dev)
        elif quant != k.QUANT_NONE:
            q = torch.empty((tokens, hidden), dtype=FP8_DTYPE, device=dev)
        stride_t = stride_g = 0
        scale_rows, scale_cols = tokens, 1
        block = _next_pow2(hidden)
        if quant == k.QUANT_FP8_STATIC:
            scales_arg = scale.reshape(-1).to(torch.float32)
        elif quant == k.QUANT_FP8_PER_TOKEN:
            scales = torch.empty((tokens, 1), dtype=torch.float32, device=dev)
            scales_arg, stride_t = scales, 1
        elif quant == k.QUANT_FP8_PER_GROUP:
            ng = hidden // group_size
            if column_major:
                scales = torch.empty((ng, tokens), dtype=torch.float32, device=dev).t()
            else:
                scales = torch.empty((tokens, ng), dtype=torch.float32, device=dev)
            scales_arg, stride_t, stride_g = scales, scales.stride(0), scales.stride(1)
        elif quant == k.QUANT_NVFP4:
            nb = hidden // epilogue.NVFP4_BLOCK
            if swizzle:
                rows, cols = epilogue.NVFP4_SWIZZLE_ROWS, epilogue.NVFP4_SWIZZLE_COLS
                scale_rows, scale_cols = -(-tokens // rows) * rows, -(-nb // cols) * cols
            else:
                scale_rows, scale_cols = tokens, nb
            # Swizzled with padding rows (T % 128): zero-filled first (one fill, about 1 us),
            # the kernel then writes rows < T (and the padding columns). Zeroing the padding
            # in the kernel instead cost 15-20 us at 1 token (one program's scattered
            # byte stores over a 57 KB tile; 1x H200, see results/README.md).
            alloc = torch.zeros if swizzle and scale_rows != tokens else torch.empty
            scales = alloc((scale_rows, scale_cols), dtype=torch.float8_e4m3fn, device=dev)
            scales_arg = scales
            scale_ub = global_scale  # the kernel reads the global scale through the same slot
            # >= 4 scale columns per row in registers (a swizzle tile is 4 wide)
            block = max(block, epilogue.NVFP4_BLOCK * epilogue.NVFP4_SWIZZLE_COLS)
        elif quant == k.QUANT_MXFP4:
            scales = torch.empty((tokens, hidden // epilogue.MXFP4_BLOCK), dtype=torch.uint8, device=dev)
            scales_arg = scales
        else:
            scales_arg = x  # unused

        rank, world = 0, 1
        buf_ptrs = sig_ptrs = 0
        nw = num_warps_for(hidden)
        if fp4 and tokens >= LIMITS["fp4_many_tokens"]:
            nw = min(nw, int(LIMITS["fp4_many_tokens_warps"][_FP4_VARIANT[quant]]))
        grid = max(tokens, 1)
        if tokens and _world_size(group) > 1:
            ws = symm.get(group, x.numel() * x.element_size(), dev)
            rank, world = ws.rank, ws.world_size
            buf_ptrs, sig_ptrs = ws.buffer_ptrs_dev, ws.signal_pad_ptrs_dev
            resident = _sm_count(dev.index if dev.index is not None else torch.cuda.current_device()) * max(
                1, int(LIMITS["threads_per_sm"]) // (32 * nw)
            )
            grid = max(1, min(tokens, resident, ws.signal_pad_bytes // 4 // world))
        if tokens:
            k.fused_allreduce_add_rmsnorm_kernel[(grid,)](
                x, x if res is None else res, x if w is None else w, res_out,
                res_out if norm is None else norm, res_out if q is None else q,
                scales_arg, x if scale_ub is None else scale_ub.reshape(-1).to(torch.float32),
                buf_ptrs, sig_ptrs,
                tokens, float(eps), stride_t, stride_g,
                H=hidden, BLOCK=block, RANK=rank, WS=world,
                HAS_RES=res is not None, RES_FP32=bool(residual_in_fp32) and res is not None,
                HAS_W=w is not None, GEMMA=bool(gemma),
                W_FP32=bool(weight_in_fp32), WRITE_NORM=norm is not None, QUANT=quant,
                HAS_UB=scale_ub is not None and quant == k.QUANT_FP8_PER_TOKEN, GROUP=group_size, UE8M0=bool(ue8m0),
                FP8_MAX=FP8_MAX, AMAX_EPS=float(amax_eps),
                MIN_SCALE=float(scale_min) if quant == k.QUANT_FP8_PER_GROUP else PER_TOKEN_MIN_SCALE,
                SWIZZLE=quant == k.QUANT_NVFP4 and bool(swizzle), SCALE_COLS=scale_cols,
                num_warps=nw,
            )

        def shaped(t, last):
            return None if t is None else t.reshape(*lead, last) if t.is_contiguous() else t

        out_norm = shaped(norm, hidden)
        if quant == k.QUANT_NONE:
            return out_norm, shaped(res_out, hidden), None, None
        if fp4:
            return out_norm, shaped(res_out, hidden), q, scales
        out_scales = None if scales is None else shaped(scales, scales.shape[-1])
        return out_norm, shaped(res_out, hidden), shaped(q, hidden), out_scales


_FP4_VARIANT = {4: "add_rmsnorm_nvfp4", 5: "add_rmsnorm_mxfp4"}  # triton_kernels.QUANT_NVFP4 / _MXFP4


def _check_fp4(input, variant: str) -> None:
    if input.dtype not in FP4_DTYPES:
        raise TypeError(f"fusion_passes: {variant} quantizes fp16/bf16 activations only, got {input.dtype}")
    if input.shape[-1] % FP4_BLOCK[variant]:
        raise ValueError(f"fusion_passes: {variant} needs hidden % {FP4_BLOCK[variant]} == 0")


def _world_size(group: str) -> int:
    from fusion_passes import groups

    return groups.world_size(group)


def unsupported(call: Call) -> str | None:
    """Why the triton backend cannot (or should not, being slower) run *call*."""
    if call.device != "cuda":
        return f"needs an NVIDIA CUDA GPU (PTX signal instructions), got device {call.device!r}"
    if call.dtype not in DTYPES:
        return f"dtype {call.dtype} not in {[str(d) for d in DTYPES]}"
    if call.world_size not in LIMITS["world_sizes"]:
        return f"world size {call.world_size} not in {LIMITS['world_sizes']} (barrier needs a power of two)"
    if call.world_size > 1 and not call.single_node:
        return "the group spans several nodes: symmetric-memory peer loads need one host"
    if call.hidden > LIMITS["max_hidden"]:
        return f"hidden {call.hidden} > {LIMITS['max_hidden']} (one row must fit in registers)"
    itemsize = torch.empty((), dtype=call.dtype).element_size()
    if (call.hidden * itemsize) % LIMITS["row_alignment_bytes"]:
        return f"hidden*itemsize = {call.hidden * itemsize} bytes is not a multiple of {LIMITS['row_alignment_bytes']}"
    if call.variant in FP4_BLOCK:
        if call.dtype not in FP4_DTYPES:
            return f"{call.variant} quantizes fp16/bf16 activations only, got {call.dtype}"
        if call.hidden % FP4_BLOCK[call.variant]:
            return f"{call.variant} needs hidden % {FP4_BLOCK[call.variant]} == 0, got {call.hidden}"
    group_size = getattr(call, "group_size", None)
    if call.variant == "add_rmsnorm_fp8_per_group" and group_size is not None:
        if group_size not in LIMITS["per_group_sizes"] or call.hidden % group_size:
            return (f"per-group FP8 group size {group_size} not in {LIMITS['per_group_sizes']} "
                    f"or does not divide hidden {call.hidden}")
    if call.tokens is not None and call.world_size > 1:
        if call.tokens * call.hidden * itemsize > LIMITS["max_workspace_bytes"]:
            return f"{call.tokens}x{call.hidden} exceeds the {LIMITS['max_workspace_bytes']}-byte symmetric workspace"
    measured = LIMITS["max_tokens_faster"]
    key = (call.world_size, call.variant)
    if key not in measured:
        return (
            f"no measured crossover for {call.variant} at world size {call.world_size} "
            "(`fusion-passes bench kernels` has not shown it faster than unfused there)"
        )
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    return _slower_than_unfused(measured[key], call)


def _slower_than_unfused(entry, call: Call) -> str | None:
    """Why *entry* of ``max_tokens_faster`` (see thresholds.py for its three forms) declines
    *call*, or None. A graph site (``tokens=None``) and an empty call are admitted wherever
    some token range at that hidden size was measured faster."""
    if entry is None:
        return None
    if isinstance(entry, int):
        if call.tokens is not None and call.tokens > entry:
            return f"{call.tokens} tokens > {entry}: slower than unfused there (measured crossover)"
        return None
    ranges = entry.get(call.hidden, entry.get(None))
    if ranges is None:
        return f"hidden {call.hidden} not measured for {call.variant} at world size {call.world_size}"
    if not ranges:
        return f"slower than unfused at every measured token count (hidden {call.hidden}; measured crossover)"
    if call.tokens is None or call.tokens < 1:
        return None
    if any(lo <= call.tokens and (hi is None or call.tokens <= hi) for lo, hi in ranges):
        return None
    shown = ", ".join(f"{lo}-{'' if hi is None else hi}" for lo, hi in ranges)
    return f"{call.tokens} tokens outside {shown}: slower than unfused there (measured crossover)"
