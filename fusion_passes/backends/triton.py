"""The ``triton`` backend: our portable fused kernel over torch symmetric memory.

One Triton kernel (:mod:`fusion_passes.backends.triton_kernels`) does the all-reduce
(one-shot: every rank reads every peer's copy of the rows it owns from symmetric
memory), the residual add, RMSNorm and the optional FP8 quantization, with fp32
accumulation. At world size 1 it is a fused add + RMSNorm (+ quant) kernel that reads
the input in place.

Variants: every one of :data:`fusion_passes.variants.VARIANTS` but dynamic per-tensor
FP8 (one scale over all tokens needs every row before the first is quantized). ``run``
takes the bound call (:class:`~fusion_passes.variants.FusedArgs`) and returns a
:class:`~fusion_passes.variants.FusedOutputs`; output shapes are the registry's. Only
``float8_e4m3fn`` FP8 (CUDA); the per-group option arguments (``amax_eps``,
``scale_min``) are kernel constants, so it runs both the kernel's and vLLM's native floors.

FP4 (fp16/bf16 activations only): NVFP4 scales are ``float8_e4m3fn``, ``[T, H/16]``
linear or, with ``swizzle``, ``[round_up(T,128), round_up(H/16,4)]`` in the 128x4-tiled
layout with zero padding (:func:`fusion_passes.epilogue.nvfp4_swizzle`); packed bytes
hold element ``2i`` in the low nibble. The E2M1 rounding is arithmetic on the fp32 value
and its bits (the PTX ``cvt...e2m1x2`` needs sm_100+), equal to
:func:`fusion_passes.epilogue.e2m1_codes` (see ``triton_kernels._e2m1_codes``);
``tests/gpu/triton_check.py`` checks the whole quant on a GPU (packed codes and scales
byte-identical to the epilogue on the kernel's own norm output; results/README.md has
the runs). From ``TRITON["fp4_many_tokens"]`` tokens on, the FP4 variants run with fewer
warps per row (a measured choice; see thresholds.py).

Every number it gates on is in :data:`fusion_passes.backends.thresholds.TRITON`.

Multi-rank use (:mod:`fusion_passes.backends.symm`): one symmetric workspace per process group,
registered collectively on the first eager call of a size (or :func:`symm.reserve`), then
reused, so calls replay under CUDA graphs; a call that needs a larger workspace during
capture raises. Calls on one group must be ordered on one stream, as NCCL's are on one
communicator: two concurrent calls would share the workspace.

Multi-rank paths (:func:`path_for`): ``barrier`` (above; measured at world size 2),
``lamport`` (wait-free one-shot: each rank pushes its rows into every peer's three-slot
buffer and readers wait on the data itself, a -0.0 sentinel; no barrier) and ``twoshot``
(each row reduced by one owner, ``row % world``, the rounded sums gathered back, the
epilogue run on every rank: at world size N each rank sends 2 (N-1)/N of the input
instead of the one-shot's N-1 times it). The wait-free kernels are
:mod:`fusion_passes.backends.lamport_kernels`; their protocol passed on one GPU at world
sizes 2, 4 and 8 (tests/gpu/lamport_check.py), but they were never timed on several GPUs,
so the shipped table does not pick them: a measured table (``fusion-passes tune`` at world
size N) may, per token bucket, and ``FUSION_PASSES_TRITON_PATH`` forces one. Where the
measured table says the unfused chain was faster, a call runs the fastest collective that
table measured (:func:`symm.all_reduce`: torch's symmetric-memory one-shot or two-shot, or
the group's own) and then this kernel at world size 1 (the epilogue alone), never the
eager reference.
The two-shot gathers the all-reduce's result (activation dtype) and recomputes the
epilogue locally rather than gathering the outputs: fewer bytes over the links for
every variant (2 bytes per element against 3 to 4 for residual_out + norm or codes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch

from fusion_passes import arguments, epilogue, groups, variants
from fusion_passes.backends import measured, symm, thresholds
from fusion_passes.backends.contract import Call
from fusion_passes.backends.triton_gate import (  # noqa: F401
    DTYPES, FP4_BLOCK, FP4_DTYPES, FP8_UNROUNDED, quant_group_reason, table_source, unsupported)
from fusion_passes.variants import FusedArgs, FusedOutputs

LIMITS = thresholds.TRITON

# variant -> the kernel's QUANT constexpr (a name in triton_kernels, imported on first run)
KERNEL_QUANT = {
    "add_rmsnorm": "QUANT_NONE",
    "add_rmsnorm_fp8_static": "QUANT_FP8_STATIC",
    "add_rmsnorm_fp8_per_token": "QUANT_FP8_PER_TOKEN",
    "add_rmsnorm_fp8_per_group": "QUANT_FP8_PER_GROUP",
    "add_rmsnorm_nvfp4": "QUANT_NVFP4",
    "add_rmsnorm_mxfp4": "QUANT_MXFP4",
}
VARIANTS = frozenset(KERNEL_QUANT)

# The quant math is fusion_passes.epilogue's (the oracle); its constants come from there.
FP8_DTYPE = torch.float8_e4m3fn  # the only FP8 format of this backend (CUDA)
FP8_MAX = epilogue.fp8_max(FP8_DTYPE)
PER_TOKEN_MIN_SCALE = epilogue.fp8_min_scaling_factor(FP8_DTYPE)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def num_warps_for(hidden: int, quant: bool = False) -> int:
    """Warps per row (thresholds.TRITON["elements_per_warp"/"_quant"]; measured)."""
    per_warp = int(LIMITS["elements_per_warp_quant" if quant else "elements_per_warp"])
    return max(1, min(int(LIMITS["max_warps"]), _next_pow2(hidden) // per_warp))


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@dataclasses.dataclass
class _Out:
    """One launch's output buffers and the kernel arguments that describe them."""

    res_out: torch.Tensor
    norm: torch.Tensor | None
    q: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    scales_arg: torch.Tensor | None = None  # the kernel's scale pointer (static: the input scale)
    ub: torch.Tensor | None = None  # per-token scale_ub, or NVFP4's global scale (same slot)
    stride_t: int = 0
    stride_g: int = 0
    scale_cols: int = 1
    block: int = 1


class TritonBackend:
    """Fused all-reduce + add + RMSNorm (+ FP8/FP4) in one Triton kernel (NVIDIA GPUs)."""

    name = "triton"
    variants = VARIANTS
    # Per-group option arguments it runs itself (kernel constants); others: reference.
    quant_options = frozenset({"amax_eps", "scale_min"})

    @functools.cached_property
    def _k(self):
        from fusion_passes.backends import triton_kernels  # imports triton on first run only

        return triton_kernels

    # -- gate ------------------------------------------------------------------------
    def unsupported(self, call: Call) -> str | None:
        return unsupported(call)

    def table_source(self, call: Call) -> str:
        return table_source(call)

    def declines(self, call: Call) -> str | None:
        """A quant group size the kernel has no constant for (its gate declines it too, from
        ``Call.group_size``; this answers a direct :meth:`run`)."""
        return quant_group_reason(call)

    # -- run -------------------------------------------------------------------------
    def run(self, variant: str, a: FusedArgs) -> FusedOutputs:
        """Run one bound call (:class:`~fusion_passes.variants.FusedArgs`) of *variant*."""
        if variant not in VARIANTS:
            raise ValueError(f"fusion_passes: the triton backend does not implement {variant!r}")
        if not isinstance(a, FusedArgs):
            raise TypeError(f"fusion_passes: TritonBackend.run takes a FusedArgs, got {type(a).__name__}")
        from fusion_passes.backends import selector

        if selector.for_run(self, variant, a).backend != self.name:
            from fusion_passes.backends.reference import ReferenceBackend  # the selector's "triton declined"

            return ReferenceBackend().run(variant, a)
        if variant in FP4_BLOCK:
            _check_fp4(a.input, variant)
        quant = getattr(self._k, KERNEL_QUANT[variant])
        return self._launch(a, quant, write_norm=a.return_norm or quant == self._k.QUANT_NONE, variant=variant)

    def _outputs(self, a: FusedArgs, quant: int, write_norm: bool, x: torch.Tensor) -> _Out:
        """Allocate the outputs of one launch, as the registry shapes them."""
        k, p, dev = self._k, a.quant, x.device
        tokens, hidden = x.shape
        norm_dtype = arguments.norm_dtype(x, a.weight, a.flags)
        res_dtype = torch.float32 if a.flags.carry_fp32 else x.dtype  # carry_fp32: the unrounded sum
        out = _Out(torch.empty_like(x, dtype=res_dtype), torch.empty((tokens, hidden), dtype=norm_dtype, device=dev)
                   if write_norm else None, block=_next_pow2(hidden))
        if quant in (k.QUANT_NVFP4, k.QUANT_MXFP4):  # two E2M1 codes per byte; [T, H/2] (the registry's)
            out.q = torch.empty((tokens, hidden // 2), dtype=torch.uint8, device=dev)
        elif quant != k.QUANT_NONE:
            out.q = torch.empty((tokens, hidden), dtype=FP8_DTYPE, device=dev)
        if quant == k.QUANT_FP8_STATIC:
            out.scales_arg = p["scale"].reshape(-1).to(torch.float32)
        elif quant == k.QUANT_FP8_PER_TOKEN:
            out.scales = torch.empty((tokens, 1), dtype=torch.float32, device=dev)
            out.scales_arg, out.stride_t, out.ub = out.scales, 1, p["scale_ub"]
        elif quant == k.QUANT_FP8_PER_GROUP:
            ng = hidden // p["group_size"]
            if p["column_major"]:
                out.scales = torch.empty((ng, tokens), dtype=torch.float32, device=dev).t()
            else:
                out.scales = torch.empty((tokens, ng), dtype=torch.float32, device=dev)
            out.scales_arg, out.stride_t, out.stride_g = out.scales, out.scales.stride(0), out.scales.stride(1)
        elif quant == k.QUANT_NVFP4:
            rows, out.scale_cols = variants.nvfp4_scale_shape(tokens, hidden, p["swizzle"])
            # Swizzled with padding rows (T % 128): zero-filled first (one fill, about 1 us),
            # the kernel then writes rows < T (and the padding columns). Zeroing the padding
            # in the kernel instead cost 15-20 us at 1 token (one program's scattered
            # byte stores over a 57 KB tile; one A/B on 1x H200, not kept in results/).
            alloc = torch.zeros if p["swizzle"] and rows != tokens else torch.empty
            out.scales = alloc((rows, out.scale_cols), dtype=torch.float8_e4m3fn, device=dev)
            out.scales_arg, out.ub = out.scales, p["global_scale"]  # the global scale goes through the ub slot
            # >= 4 scale columns per row in registers (a swizzle tile is 4 wide)
            out.block = max(out.block, variants.NVFP4_BLOCK * variants.NVFP4_SWIZZLE_COLS)
        elif quant == k.QUANT_MXFP4:
            out.scales = torch.empty((tokens, hidden // variants.MXFP4_BLOCK), dtype=torch.uint8, device=dev)
            out.scales_arg = out.scales
        return out

    def _plan(self, a: FusedArgs, x: torch.Tensor, fp4: bool, variant: str) -> "_Plan":
        """Grid, warps and multi-rank path of one launch: the measured table's entry for this
        call's token bucket where there is one (agreed across the group), else the shipped
        rules. A measured ``unfused`` pick at world size > 1 runs the fastest collective the
        table measured and then this kernel at world size 1 (the epilogue alone)."""
        tokens, hidden = x.shape
        world = groups.world_size(a.group)
        entry = measured_entry(variant, a.group, world, tokens, hidden, x.dtype)
        nw = num_warps_for(hidden, variant != "add_rmsnorm")
        if fp4 and tokens >= LIMITS["fp4_many_tokens"]:
            nw = min(nw, int(LIMITS["fp4_many_tokens_warps"][variant]))
        if entry is not None and entry.num_warps:
            nw = entry.num_warps
        nw = FORCE.get("num_warps", nw)
        stages = FORCE.get("num_stages", entry.num_stages if entry is not None else None)
        # what the world-size-1 kernel computes this call with: its quant and residual mode
        form = (hidden, getattr(self._k, KERNEL_QUANT[variant]), _res_mode(a.flags) if a.residual is not None else 0)
        if not (tokens and world > 1):
            return _local_plan(tokens, nw, stages, entry, form)
        if FORCE.get("path", "unfused" if entry is not None and entry.pick == "unfused" else None) == "unfused":
            plan = _local_plan(tokens, nw, stages, entry, form, path="unfused")
            plan.collective = symm.collective_of(None if entry is None else entry.best_unfused)
            return plan
        dev = x.device
        resident = _sm_count(dev.index if dev.index is not None else torch.cuda.current_device()) * max(
            1, int(LIMITS["threads_per_sm"]) // (32 * nw)
        )
        path = path_for(world, tokens, hidden, x.element_size(), None if entry is None else entry.path)
        if path != "barrier":
            from fusion_passes.backends import lamport

            lw = lamport.get(a.group, tokens, hidden, x.dtype, dev)
            return _Plan(max(1, min(tokens, resident)), nw, lw.rank, lw.world_size, path, lamport=lw,
                         num_stages=stages)
        ws = symm.get(a.group, x.numel() * x.element_size(), dev)
        grid = max(1, min(tokens, resident, ws.signal_pad_bytes // 4 // ws.world_size))
        return _Plan(grid, nw, ws.rank, ws.world_size, "barrier", ws.buffer_ptrs_dev, ws.signal_pad_ptrs_dev,
                     num_stages=stages)

    def _launch(self, a: FusedArgs, quant: int, write_norm: bool, variant: str = "") -> FusedOutputs:
        k, p, f = self._k, a.quant, a.flags
        hidden = a.input.shape[-1]
        lead = a.input.shape[:-1]
        x = a.input.reshape(-1, hidden).contiguous()
        variant = variant or _VARIANT_OF_QUANT[quant]
        res = None if a.residual is None else a.residual.reshape(-1, hidden).contiguous()
        w = None if a.weight is None else a.weight.contiguous()
        fp4 = quant in (k.QUANT_NVFP4, k.QUANT_MXFP4)
        o = self._outputs(a, quant, write_norm, x)
        plan = self._plan(a, x, fp4, variant)
        per_group = quant == k.QUANT_FP8_PER_GROUP
        if not x.shape[0]:
            return _shaped(o, lead, hidden, fp4)
        if plan.path == "unfused":  # the fastest measured collective, then the epilogue
            x = symm.all_reduce(x, a.group, plan.collective).contiguous()
        # without a norm output the kernel still reads the norm's dtype off norm_ptr (it rounds
        # the norm there): a tensor of that dtype, never written (not res_out: carry_fp32 makes it fp32)
        norm_ptr = o.norm if o.norm is not None else _of_dtype(arguments.norm_dtype(x, a.weight, f), x, w, o.res_out)
        tensors = (x, x if res is None else res, x if w is None else w, o.res_out,
                   norm_ptr, o.res_out if o.q is None else o.q,
                   x if o.scales_arg is None else o.scales_arg,
                   x if o.ub is None else o.ub.reshape(-1).to(torch.float32))
        consts = dict(
            H=hidden, BLOCK=o.block, RANK=plan.rank, WS=plan.world,
            HAS_RES=res is not None, RES_FP32=_res_mode(f) if res is not None else 0,
            HAS_W=w is not None, GEMMA=bool(f.gemma),
            W_FP32=bool(f.weight_in_fp32), WRITE_NORM=o.norm is not None, QUANT=quant,
            HAS_UB=o.ub is not None and quant == k.QUANT_FP8_PER_TOKEN, GROUP=p.get("group_size", 128),
            UE8M0=bool(p.get("ue8m0", False)), FP8_MAX=FP8_MAX,
            AMAX_EPS=float(p["amax_eps"]) if per_group else 0.0,
            MIN_SCALE=float(p["scale_min"]) if per_group else PER_TOKEN_MIN_SCALE,
            SWIZZLE=quant == k.QUANT_NVFP4 and bool(p["swizzle"]), SCALE_COLS=o.scale_cols,
            Q_RAW=_quant_mode(f) if variant in FP8_UNROUNDED else 0,
        )
        scalars = (x.shape[0], float(a.eps), o.stride_t, o.stride_g)
        if plan.lamport is not None:
            import triton.language as tl

            from fusion_passes.backends import lamport, lamport_kernels

            lw = plan.lamport
            bits, sent = lamport.sentinel(x.dtype)
            _launcher(lamport_kernels.lamport_kernel, plan.grid)(
                *tensors, lw.peers, lw.state, *scalars, lw.slot_elems, **consts,
                BITS=tl.int16 if bits == torch.int16 else tl.int32, SENT=sent, TWO_SHOT=plan.path == "twoshot",
                **plan.launch())
        else:
            _launcher(k.fused_allreduce_add_rmsnorm_kernel, plan.grid)(
                *tensors, plan.buf_ptrs, plan.sig_ptrs, *scalars, **consts, ROWS=plan.rows,
                EVICT=plan.evict and plan.world == 1, CHUNK=plan.chunk, TILE=plan.tile, **plan.launch())
        return _shaped(o, lead, hidden, fp4)


@dataclasses.dataclass
class _Plan:
    """One launch: grid, warps, this rank's place, and the multi-rank path
    (``local`` at world size 1, else one of :data:`PATHS`)."""

    grid: int
    num_warps: int
    rank: int = 0
    world: int = 1
    path: str = "local"
    buf_ptrs: int = 0  # barrier path: the symmetric workspace's peer buffers / signal pads
    sig_ptrs: int = 0
    lamport: object = None  # wait-free paths: their lamport.LamportWorkspace
    rows: int = 1  # world size 1 (and the epilogue after an unfused collective): rows per program
    num_stages: int | None = None  # Triton's software-pipelining depth (None: Triton's default)
    collective: str | None = None  # path "unfused": the measured fastest (symm.COLLECTIVES; None: the group's own)
    evict: bool = False  # world size 1: streamed loads evict_first, the weight evict_last (a tuned option)
    chunk: int = 0  # world size 1: the row in pieces of this many elements, two passes (a tuned option; 0: whole)
    tile: int = 1  # world size 1: rows per program at once, a [tile, BLOCK] block (a tuned option)

    def launch(self) -> dict:
        """The launch options: warps, and the stages where a measured config names them."""
        return {"num_warps": self.num_warps, **({"num_stages": self.num_stages} if self.num_stages else {})}


def world1_form(chunk: int, tile: int, hidden: int, quant: int, res_fp32: int) -> tuple[int, int]:
    """The looped kernel's piece size (0: the whole row) and the tile kernel's rows at once (1:
    none) that a world-size-1 launch runs, from those asked (the table's entry, or ``FORCE``):
    each only where that kernel computes the call (``triton_kernels.looped_supported``, and a
    row of two pieces or more; ``triton_kernels.tile_supported``), otherwise the one-pass
    kernel, whatever the table says."""
    from fusion_passes.backends import triton_kernels as k

    return (chunk if 0 < chunk < hidden and k.looped_supported(quant, res_fp32) else 0,
            tile if tile > 1 and k.tile_supported(quant) else 1)


def _local_plan(tokens: int, nw: int, stages: int | None, entry, form: tuple[int, int, int],
                path: str = "local") -> _Plan:
    """A launch of the kernel at world size 1: ``rows`` rows per program (or ``tile`` at once),
    the measured entry's or ``FORCE``'s while ``tune`` times them (one by default), ``ceil(tokens
    / rows)`` programs; the pieces and the tile as :func:`world1_form` admits them for *form*,
    ``(hidden, quant, residual mode)``."""
    rows = FORCE.get("rows", (entry.rows if entry is not None and entry.rows else 1))
    evict = FORCE.get("evict", bool(entry is not None and entry.evict))
    chunk, tile = world1_form(FORCE.get("chunk", (entry.chunk if entry is not None and entry.chunk else 0)),
                              FORCE.get("tile", (entry.tile if entry is not None and entry.tile else 1)), *form)
    per_program = tile if tile > 1 else rows
    return _Plan(max(1, -(-tokens // per_program)), nw, path=path, rows=rows, num_stages=stages, evict=evict,
                 chunk=chunk, tile=tile)


PATHS = ("barrier", "lamport", "twoshot")
PATH_ENV = "FUSION_PASSES_TRITON_PATH"
COMPILE_ONLY: list = []
"""``fusion-passes tune`` only (:func:`compile_only`): while it holds an entry, a launch compiles its
binary (Triton's ``warmup``) and runs nothing, leaving its outputs unwritten."""


@contextlib.contextmanager
def compile_only():
    """Within: every launch of this backend's kernels only compiles its binary (``JITFunction.warmup``:
    the binary a real launch with these arguments would use, from the same specialization). Under
    Triton's ``AsyncCompileMode`` the compiles then run in its executor, several at once
    (``fusion_passes.cli.tune.precompile``). The call's outputs are left unwritten."""
    COMPILE_ONLY.append(True)
    try:
        yield
    finally:
        COMPILE_ONLY.pop()


def _launcher(kernel, grid: int):
    """``kernel[(grid,)]``, or within :func:`compile_only` its compile alone."""
    return functools.partial(kernel.warmup, grid=(grid,)) if COMPILE_ONLY else kernel[(grid,)]


FORCE: dict = {}
"""``fusion-passes tune`` only: ``{"num_warps": n, "path": p, "rows": r, "num_stages": s, "evict": e,
"chunk": c, "tile": t}`` (any of them) forced on every launch while it times the candidates (``path`` one
of :data:`PATHS` or ``"unfused"``; ``rows``, ``evict``, ``chunk`` and ``tile`` at world size 1 only)."""


def path_for(world: int, tokens: int, hidden: int, itemsize: int, measured_path: str | None = None) -> str:
    """The multi-rank path for a call: ``$FUSION_PASSES_TRITON_PATH`` if set (benchmarks),
    else *measured_path* (the measured table's pick for this bucket), else the first entry
    of ``thresholds.TRITON["paths"][world]`` whose token limit admits it; a wait-free path
    whose workspace would exceed ``lamport_max_workspace_bytes`` falls back to ``barrier``."""
    import os

    forced = os.environ.get(PATH_ENV)
    if forced:
        if forced not in PATHS:
            raise ValueError(f"fusion_passes: {PATH_ENV}={forced!r}; expected one of {', '.join(PATHS)}")
        path = forced
    elif FORCE.get("path") in PATHS:
        path = FORCE["path"]
    elif measured_path in PATHS:
        path = measured_path
    else:
        path = next((p for limit, p in LIMITS["paths"].get(world, ((None, "barrier"),))
                     if limit is None or tokens <= limit), "barrier")
    if path != "barrier":
        from fusion_passes.backends.lamport import buffer_elems

        pow2 = 1 << max(0, (tokens - 1).bit_length())
        if buffer_elems(world, pow2, hidden) * itemsize > LIMITS["lamport_max_workspace_bytes"]:
            return "barrier"
    return path


def measured_entry(variant: str, group: str, world: int, tokens: int, hidden: int, dtype):
    """The measured table's entry for this call's token bucket and activation *dtype* (None: no measured entry; the
    shipped rules decide). At world size > 1 only a table agreed across the group counts."""
    from fusion_passes.backends import agree

    if not tokens:
        return None
    digest = agree.for_group(group, world)
    table = measured.by_digest(digest) if digest else None
    return None if table is None else table.lookup(variant, hidden, tokens, dtype=dtype)


def _res_mode(f) -> int:
    """The kernel's ``RES_FP32``: 0 the sum rounded (aten.add), 1 the norm reads the unrounded
    fp32 sum (residual_in_fp32, carry_fp32), 2 only its variance does (sum_stored)."""
    if f.sum_stored:
        return 2
    return 1 if (f.residual_in_fp32 or f.carry_fp32) else 0


def _of_dtype(dtype: torch.dtype, *tensors) -> torch.Tensor:
    """One of *tensors* of *dtype* (the first), or a one-element tensor of it."""
    for t in tensors:
        if t is not None and t.dtype == dtype:
            return t
    return torch.empty(1, dtype=dtype, device=tensors[0].device)


def _quant_mode(f) -> int:
    """The kernel's ``Q_RAW``: 0 the quant reads the rounded norm output, 1 its codes and
    amax read the unrounded one (quant_unrounded), 2 its amax alone does (amax_unrounded)."""
    if f.quant_unrounded:
        return 1
    return 2 if f.amax_unrounded else 0


def _shaped(o: _Out, lead, hidden: int, fp4: bool) -> FusedOutputs:
    """The outputs with the input's leading dims (FP4 codes and scales stay [T, ...])."""

    def shaped(t, last):
        return None if t is None else t.reshape(*lead, last) if t.is_contiguous() else t

    if fp4:
        return FusedOutputs(shaped(o.res_out, hidden), shaped(o.norm, hidden), o.q, o.scales)
    scales = None if o.scales is None else shaped(o.scales, o.scales.shape[-1])
    return FusedOutputs(shaped(o.res_out, hidden), shaped(o.norm, hidden), shaped(o.q, hidden), scales)


# triton_kernels.QUANT_* -> variant (the constants' values, so the kernels are not imported)
_VARIANT_OF_QUANT = dict(enumerate(KERNEL_QUANT))


def _check_fp4(input, variant: str) -> None:
    if input.dtype not in FP4_DTYPES:
        raise TypeError(f"fusion_passes: {variant} quantizes fp16/bf16 activations only, got {input.dtype}")
    if input.shape[-1] % FP4_BLOCK[variant]:
        raise ValueError(f"fusion_passes: {variant} needs hidden % {FP4_BLOCK[variant]} == 0")
