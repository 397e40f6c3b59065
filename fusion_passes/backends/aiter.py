"""The ``aiter`` backend: AMD AITER's fused all-reduce + RMSNorm (+ quant) kernels (ROCm).

NOT EXECUTED: written against ROCm/aiter at commit
``e4048607a535ace3a2b51ded31b1c8c2d45c0879`` (2026-08-22) --
``aiter/dist/communication_op.py`` (``tensor_model_parallel_fused_allreduce_rmsnorm``,
``tensor_model_parallel_fused_allreduce_rmsnorm_quant`` and ``..._mxfp4_quant``), which
route to ``CustomAllreduce.custom_fused_ar_rms`` / ``custom_fused_ar_rms_quant`` /
``custom_fused_ar_rms_per_group_quant`` / ``custom_fused_ar_rms_mxfp4_quant`` in
``aiter/dist/device_communicators/custom_all_reduce.py``. AITER imports only on ROCm and
there is no ROCm machine here, so this adapter has never run. tests/data/aiter_signatures.json
holds the parameters of every function it calls, read from that commit (the script next
to it regenerates them); tests/test_vendor_adapters.py binds every call against them. The
PyPI ``amd-aiter`` wheel predates the quant variants.

AITER's functions all-reduce over AITER's OWN tensor-parallel group
(``aiter.dist.parallel_state.get_tp_group()``), which its user initialises (as vLLM's
ROCm path does); :meth:`AiterBackend.run` checks that this group has the fused op's
world size and refuses otherwise (it cannot address an arbitrary torch group).

Variants: ``add_rmsnorm``, ``add_rmsnorm_fp8_per_token``, ``add_rmsnorm_fp8_per_group``,
``add_rmsnorm_mxfp4``. AITER has no static per-tensor FP8 epilogue. Limits are in
:data:`fusion_passes.backends.thresholds.AITER`. FP8 outputs use AITER's fp8 dtype
(``float8_e4m3fnuz`` on gfx942, ``float8_e4m3fn`` on gfx950: the platform's FP8, as
in the graphs vLLM builds there). Inputs go in as ``[tokens, hidden]``: the per-group
path takes ``M = input.shape[0]`` (parallel_state.py, its fake).

What the kernel computes, read at that commit (``csrc/include/custom_all_reduce.cuh``,
``local_device_load_rmsnorm*``): the residual is added in fp32 to the all-reduce rounded
to the activation dtype, and the norm reads the UNROUNDED fp32 sum (vLLM's
``fused_add_rms_norm``, ``residual_in_fp32=True``), ``x * w * rsqrt(mean(x^2) + eps)``
with ``w`` read as the activation dtype. So a call with a residual and
``residual_in_fp32=False`` (the sum rounded before the norm, as aten's add does), or
with a weight of another dtype, runs unfused. The product order (``x * w`` first, then
the rsqrt; ours scales first) can differ by one fp32 ulp before the final rounding.
"""

from __future__ import annotations

import functools

import torch

from fusion_passes.backends import thresholds
from fusion_passes.backends.contract import Call, platform_reason
from fusion_passes.backends.fallback import VendorBackend, not_installed
from fusion_passes.variants import FusedArgs, FusedOutputs

LIMITS = thresholds.AITER
VARIANTS = frozenset({"add_rmsnorm", "add_rmsnorm_fp8_per_token", "add_rmsnorm_fp8_per_group", "add_rmsnorm_mxfp4"})
DTYPES = (torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=None)
def _gcn_arch() -> str:
    try:
        return torch.cuda.get_device_properties(torch.cuda.current_device()).gcnArchName
    except Exception:  # noqa: BLE001 - no ROCm device
        return ""


def unsupported(call: Call, arch: str | None = None, installed: bool | None = None) -> str | None:
    """Why AITER's fused kernels cannot run *call* (*arch*, *installed* may be given for tests)."""
    if call.device != "rocm":
        return f"needs a ROCm GPU (AITER kernels are HIP), got device {call.device!r}"
    arch = _gcn_arch() if arch is None else arch
    if not arch.startswith(tuple(LIMITS["archs"])):
        return f"GPU arch {arch or 'unknown'!r} not in {LIMITS['archs']}"
    platform = platform_reason(call, DTYPES, LIMITS["world_sizes"],
                               "the process group spans several nodes: AITER's custom all-reduce uses IPC within one host",
                               world_note=" (fused AR kernels)")
    if platform is not None:
        return platform
    if call.hidden % LIMITS["hidden_multiple"]:
        return f"hidden {call.hidden} is not a multiple of {LIMITS['hidden_multiple']}"
    lo, hi = LIMITS["two_stage_hidden"]
    if call.hidden > hi:
        return f"hidden {call.hidden} > {hi} (largest hidden of the 2-stage kernel)"
    if call.variant == "add_rmsnorm_fp8_per_token" and call.hidden not in LIMITS["per_token_fp8_hidden"]:
        return f"per-token FP8 epilogue only for hidden in {LIMITS['per_token_fp8_hidden']}"
    if call.flags.promote_out:
        return "aiter writes the norm in the activation dtype; the graph's is wider (promote_out: an fp32 weight)"
    if call.flags.carry_fp32 or call.flags.quant_unrounded or call.flags.sum_stored or call.flags.amax_unrounded:
        return ("aiter rounds the sum and the quant input to the activation dtype "
                "(carry_fp32, quant_unrounded, sum_stored, amax_unrounded)")
    if not call.flags.weight_in_fp32 and not call.flags.gemma:
        return ("aiter multiplies the weight in fp32 before the cast; the graph multiplies after it "
                "(weight_in_fp32=False), which rounds differently")
    if call.flags.gemma and call.variant in ("add_rmsnorm_fp8_per_group", "add_rmsnorm_mxfp4"):
        return "aiter's per-group FP8 and MXFP4 epilogues have no gemma (1 + w) norm"
    if call.group_size is not None and call.group_size not in LIMITS["per_group_sizes"]:
        return f"quant group size {call.group_size} not in {LIMITS['per_group_sizes']}"
    if call.tokens is not None:
        itemsize = torch.empty((), dtype=call.dtype).element_size()
        nbytes = call.tokens * call.hidden * itemsize
        if nbytes > LIMITS["max_input_bytes"]:
            return f"{nbytes} input bytes > {LIMITS['max_input_bytes']} (custom all-reduce falls back to RCCL)"
        one_stage = nbytes * call.world_size <= LIMITS["one_stage_max_bytes_x_ranks"]
        if not one_stage and call.hidden < lo:
            return f"hidden {call.hidden} < {lo}: the 2-stage kernel that this size needs does not run it"
    return not_installed("aiter", "AITER is not installed (ROCm only; the PyPI amd-aiter wheel lacks the quant "
                         "variants)", installed)


class AiterBackend(VendorBackend):
    name = "aiter"
    variants = VARIANTS

    # fusion_passes.ops passes fp8_dtype when it is not float8_e4m3fn (e.g. gfx942's fnuz).
    quant_options = frozenset({"fp8_dtype"})

    def __init__(self, comm=None, fp8_dtype: torch.dtype | None = None) -> None:
        super().__init__(comm)  # AITER's module unless given
        self._fp8 = fp8_dtype  # AITER's platform FP8 (aiter.utility.dtypes.fp8) unless given

    def _platform_fp8(self) -> torch.dtype:
        if self._fp8 is None:
            from aiter.utility.dtypes import fp8

            self._fp8 = fp8
        return self._fp8

    def _import_comm(self):
        import aiter.dist.communication_op  # imports only on ROCm

        return aiter.dist.communication_op

    def unsupported(self, call: Call) -> str | None:
        return unsupported(call)

    def declines(self, call: Call) -> str | None:
        """Why the kernel would compute this call's arguments differently (see the module
        docstring), or None; the selector then runs it unfused."""
        fp8_dtype = call.quant_arg("fp8_dtype")
        if fp8_dtype is not None and fp8_dtype != self._platform_fp8():
            return f"aiter writes {self._fp8} on this GPU, the graph wants {fp8_dtype}"
        if call.variant == "add_rmsnorm_fp8_per_token" and call.quant_arg("scale_ub") is not None:
            return "aiter's per-token FP8 epilogue has no scale upper bound"
        if call.variant == "add_rmsnorm_fp8_per_group":
            if call.quant_arg("ue8m0"):
                return "aiter's per-group FP8 epilogue writes fp32 scales, not UE8M0"
            if call.quant_arg("group_size", LIMITS["per_group_sizes"][0]) not in LIMITS["per_group_sizes"]:
                return f"aiter per-group FP8 quant group sizes: {LIMITS['per_group_sizes']}"
        return self._declines_norm(call)

    def _declines_norm(self, call: Call) -> str | None:
        """The norm's side of :meth:`declines` (every variant)."""
        gemma = call.flags.gemma
        if call.weight_dtype is not None and not call.flags.weight_in_fp32 and not gemma:
            return ("aiter multiplies the weight in fp32 before the cast (vLLM order); the Hugging Face "
                    "order (weight_in_fp32=False) would round differently")
        if gemma and call.variant in ("add_rmsnorm_fp8_per_group", "add_rmsnorm_mxfp4"):
            return "aiter's per-group FP8 and MXFP4 epilogues have no gemma (1 + w) norm"
        if call.residual and not call.flags.residual_in_fp32:
            return ("aiter normalizes the unrounded fp32 residual sum (custom_all_reduce.cuh); the "
                    "graph rounds the sum to the activation dtype first (residual_in_fp32=False)")
        if call.residual_dtype is not None and call.residual_dtype != call.dtype:
            return (f"aiter reads the residual as the activation dtype {call.dtype}, "
                    f"the call gives a {call.residual_dtype} one (a carried fp32 sum)")
        if call.weight_dtype is not None and call.weight_dtype != call.dtype:
            return (f"aiter reads the norm weight as the activation dtype {call.dtype}, "
                    f"the graph multiplies a {call.weight_dtype} weight")
        return None

    # -- argument mapping ---------------------------------------------------------------
    def _common(self, a: FusedArgs):
        from fusion_passes import groups

        self._check_group(a.group, groups.world_size(a.group))
        hidden = a.input.shape[-1]
        x = a.input.reshape(-1, hidden)
        residual = torch.zeros_like(x) if a.residual is None else a.residual.reshape(-1, hidden)  # x + 0 == x
        weight = torch.ones(hidden, dtype=x.dtype, device=x.device) if a.weight is None else a.weight
        return x, residual, weight

    def _check_group(self, group: str, world_size: int) -> None:
        tp = self._comm.get_tp_group()
        if tp.world_size != world_size:
            raise RuntimeError(
                f"fusion_passes: aiter all-reduces over its own TP group (world size {tp.world_size}), "
                f"but the fused op's group {group!r} has world size {world_size}"
            )

    def add_rmsnorm(self, a: FusedArgs) -> FusedOutputs:
        x, res, w = self._common(a)
        norm, res_out = self._comm.tensor_model_parallel_fused_allreduce_rmsnorm(
            x, res, w, a.eps, gemma_norm=bool(a.flags.gemma)
        )
        return _shaped(a, FusedOutputs(res_out, norm))

    def add_rmsnorm_fp8_per_token(self, a: FusedArgs) -> FusedOutputs:
        x, res, w = self._common(a)
        out = self._comm.tensor_model_parallel_fused_allreduce_rmsnorm_quant(
            x, res, w, a.eps, quant_type="per_token", emit_bf16=a.return_norm, gemma_norm=bool(a.flags.gemma)
        )
        q, res_out, scales = out[:3]
        return _shaped(a, FusedOutputs(res_out, out[3] if a.return_norm else None, q, scales))

    def add_rmsnorm_fp8_per_group(self, a: FusedArgs) -> FusedOutputs:
        p = a.quant
        x, res, w = self._common(a)
        out = self._comm.tensor_model_parallel_fused_allreduce_rmsnorm_quant(
            x, res, w, a.eps, quant_type="per_group", group_size=p["group_size"],
            emit_bf16=a.return_norm, transpose_scale=bool(p["column_major"]),
        )
        q, res_out, scales = out[:3]
        return _shaped(a, FusedOutputs(res_out, out[3] if a.return_norm else None, q, scales))

    def add_rmsnorm_mxfp4(self, a: FusedArgs) -> FusedOutputs:
        x, res, w = self._common(a)
        out = self._comm.tensor_model_parallel_fused_allreduce_rmsnorm_mxfp4_quant(
            x, res, w, a.eps, emit_bf16=a.return_norm
        )
        packed, res_out, scales = out[:3]  # uint8 [T, H/2] (2 x e2m1), uint8 e8m0 [T, H/32]
        return _shaped(a, FusedOutputs(res_out, out[3] if a.return_norm else None, packed, scales))


def _shaped(a: FusedArgs, out: FusedOutputs) -> FusedOutputs:
    """AITER's [T, ...] results as the op's fakes shape them: the activations and FP8 data
    ``input.shape``, FP8 scales ``input.shape[:-1] + (groups,)``; FP4 outputs stay [T, ...]."""
    shape = a.input.shape
    out.residual_out = out.residual_out.reshape(shape)
    if out.norm_out is not None:
        out.norm_out = out.norm_out.reshape(shape)
    if out.q is not None and out.q.shape[-1] == shape[-1]:  # FP8 data (FP4 packs two a byte)
        out.q = out.q.reshape(shape)
        out.scales = out.scales.reshape(*shape[:-1], out.scales.shape[-1])
    return out
