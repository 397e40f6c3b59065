"""The ``flashinfer`` backend: FlashInfer's TRT-LLM fused all-reduce + RMSNorm (+ quant) (CUDA).

NOT EXECUTED on a GPU. Written against flashinfer-python 0.7.2.post1 (pinned in the
``cuda`` extra; vLLM 0.33 installs the same): ``flashinfer.comm.allreduce_fusion`` and
``create_allreduce_fusion_workspace`` (``flashinfer/comm/allreduce.py``),
``AllReduceFusionPattern`` and ``QuantizationSFLayout``. FlashInfer JIT-compiles its
communication kernels with nvcc on first use; the GPU machine here has no network and no
FlashInfer, so no kernel of it has run. On CPU (tests/test_vendor_adapters.py) every call
goes through FlashInfer's own Python layer (``allreduce_fusion`` with its argument checks,
``trtllm_ar.trtllm_allreduce_fusion``) down to the compiled module, which is the only part
replaced; the signatures and enum members are the installed ones.

The workspace (IPC buffers of the TRT-LLM backend; never the multicast/MNNVL one) is
created once per (group, hidden, dtype), sized for the largest input the gate admits,
on the first eager call: never during CUDA-graph capture.

Variants: ``add_rmsnorm`` (kARResidualRMSNorm), ``add_rmsnorm_fp8_static``
(kARResidualRMSNorm[Out]FP8Quant), ``add_rmsnorm_fp8_per_token``
(kARResidualRMSNorm[Out]DynamicFP8Quant; no scale upper bound), ``add_rmsnorm_nvfp4``
(kARResidualRMSNorm[Out]FP4Quant, SM100+ only). Its per-token-group pattern writes packed
UE8M0 int32 scales, not the fp32 scales of our ``add_rmsnorm_fp8_per_group``, so that
variant is not offered. Limits (and vLLM's measured size crossovers) are in
:data:`fusion_passes.backends.thresholds.FLASHINFER`.

What the kernel computes, read from the installed source
(``flashinfer/data/include/flashinfer/comm/trtllm_allreduce_fusion.cuh``, ``FusedOp``):
the residual is added in the activation dtype (``vec_add`` stores T) and the norm reads
that ROUNDED sum, ``x * rsqrt(mean(x^2) + eps) * (weight_bias + gamma)`` in fp32 with
``gamma`` read as the activation dtype, rounded to it; static FP8 multiplies the rounded
norm by ``1 / scale``. So it declines ``residual_in_fp32`` (vLLM's fused_add_rms_norm
normalizes the unrounded fp32 sum), the Hugging Face weight order, and a weight of another
dtype than the activations.
"""

from __future__ import annotations

import functools

import torch

from fusion_passes import _compat, variants
from fusion_passes.backends import thresholds
from fusion_passes.backends.contract import Call, Slower, platform_reason
from fusion_passes.backends.fallback import VendorBackend, not_installed
from fusion_passes.variants import FusedArgs, FusedOutputs

LIMITS = thresholds.FLASHINFER
VARIANTS = frozenset(
    {"add_rmsnorm", "add_rmsnorm_fp8_static", "add_rmsnorm_fp8_per_token", "add_rmsnorm_nvfp4"}
)
DTYPES = (torch.bfloat16, torch.float16)
RESIDUAL_ROUNDED = ("flashinfer normalizes the residual sum rounded to the activation dtype "
                    "(trtllm_allreduce_fusion.cuh vec_add); the graph normalizes the unrounded fp32 sum "
                    "(residual_in_fp32)")


@functools.lru_cache(maxsize=None)
def _sm() -> int:
    major, minor = torch.cuda.get_device_capability()
    return major * 10 + minor


def max_input_bytes(sm: int, world_size: int) -> float | None:
    """vLLM's measured crossover for this SM and world size, in bytes (None: not measured)."""
    mib = LIMITS["max_input_mib"].get(sm, {}).get(world_size)
    return None if mib is None else mib * 1024 * 1024


def unsupported(call: Call, sm: int | None = None, installed: bool | None = None) -> str | None:
    """Why FlashInfer's fused kernels cannot (or should not) run *call* (*sm*, *installed*: for tests)."""
    platform = platform_reason(call, DTYPES, LIMITS["world_sizes"],
                               "the process group spans several nodes: the multi-node (MNNVL) path needs NVLink multicast, kept off",
                               device="cuda", device_need="needs an NVIDIA CUDA GPU")
    if platform is not None:
        return platform
    itemsize = torch.empty((), dtype=call.dtype).element_size()
    if (call.hidden * itemsize) % LIMITS["bytes_per_access"]:
        return f"hidden*itemsize {call.hidden * itemsize} not a multiple of {LIMITS['bytes_per_access']} bytes"
    if call.flags.promote_out:
        return "flashinfer writes the norm in the activation dtype; the graph's is wider (promote_out: an fp32 weight)"
    if call.flags.carry_fp32 or call.flags.quant_unrounded or call.flags.sum_stored or call.flags.amax_unrounded:
        return ("flashinfer rounds the sum and the quant input to the activation dtype "
                "(carry_fp32, quant_unrounded, sum_stored, amax_unrounded)")
    if not call.flags.weight_in_fp32 and not call.flags.gemma:
        return ("flashinfer multiplies the weight in fp32 before the cast; the graph multiplies after "
                "it (weight_in_fp32=False), which rounds differently")
    if call.flags.residual_in_fp32:
        return RESIDUAL_ROUNDED
    sm = _sm() if sm is None else sm
    if call.variant == "add_rmsnorm_nvfp4" and sm < LIMITS["fp4_min_sm"]:
        return f"NVFP4 quant needs SM{LIMITS['fp4_min_sm']}+, this GPU is SM{sm}"
    limit = max_input_bytes(sm, call.world_size)
    if limit is None:
        return f"no measured crossover for SM{sm} at world size {call.world_size}"
    if call.tokens is not None and call.tokens * call.hidden * itemsize > limit:
        return Slower(f"{call.tokens * call.hidden * itemsize} input bytes > {int(limit)}: slower than unfused "
                      "(vLLM's crossover)")
    return not_installed("flashinfer", "flashinfer is not installed (pip install flashinfer-python; needs nvcc "
                         "for its JIT)", installed)


class FlashInferBackend(VendorBackend):
    name = "flashinfer"
    variants = VARIANTS

    def __init__(self, comm=None) -> None:
        super().__init__(comm)  # flashinfer.comm unless given
        self._workspaces: dict[tuple, object] = {}

    def _import_comm(self):
        import flashinfer.comm  # heavy; JIT-builds its kernels on first use (nvcc)

        return flashinfer.comm

    def unsupported(self, call: Call) -> str | None:
        return unsupported(call)

    def declines(self, call: Call) -> str | None:
        """Why the kernel would compute this call's arguments differently (see the module
        docstring), or None; the selector then runs it unfused."""
        if call.weight_dtype is not None and not call.flags.weight_in_fp32 and not call.flags.gemma:
            return ("flashinfer multiplies the weight in fp32 before the cast (vLLM order); the Hugging "
                    "Face order (weight_in_fp32=False) would round differently")
        if call.flags.residual_in_fp32 and call.residual:
            return RESIDUAL_ROUNDED
        if call.residual_dtype is not None and call.residual_dtype != call.dtype:
            return (f"flashinfer reads the residual as the activation dtype {call.dtype}, "
                    f"the call gives a {call.residual_dtype} one (a carried fp32 sum)")
        if call.weight_dtype is not None and call.weight_dtype != call.dtype:
            return (f"flashinfer reads the norm weight as the activation dtype {call.dtype}, "
                    f"the graph multiplies a {call.weight_dtype} weight")
        if call.variant == "add_rmsnorm_fp8_per_token" and call.quant_arg("scale_ub") is not None:
            return "flashinfer's dynamic FP8 epilogue has no scale upper bound"
        return None

    # -- workspace ------------------------------------------------------------------------
    def _workspace(self, group: str, x: torch.Tensor):
        import torch.distributed as dist

        from fusion_passes import groups
        from fusion_passes.backends import symm

        hidden = x.shape[-1]
        key = (group, hidden, x.dtype, x.device.index)
        ws = self._workspaces.get(key)
        if ws is not None:
            return ws
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"fusion_passes: flashinfer workspace for {group!r} (hidden {hidden}) must be created "
                "by an eager call before CUDA-graph capture"
            )
        pg = _compat.resolve_process_group(symm.c10d_group_name(group))
        world = groups.world_size(group)
        limit = max_input_bytes(_sm(), world) or 0
        max_tokens = max(1, int(limit // (hidden * x.element_size())))
        ws = self._comm.create_allreduce_fusion_workspace(
            backend="trtllm", world_size=world, rank=dist.get_rank(pg), max_token_num=max_tokens,
            hidden_dim=hidden, dtype=x.dtype, group=pg,
        )
        self._workspaces[key] = ws
        return ws

    # -- argument mapping -----------------------------------------------------------------
    def _prepare(self, a: FusedArgs):
        hidden = a.input.shape[-1]
        x = a.input.reshape(-1, hidden).contiguous()  # allreduce_fusion takes [token_num, hidden_dim]
        res = torch.zeros_like(x) if a.residual is None else a.residual.reshape(-1, hidden).contiguous()
        w = torch.ones(hidden, dtype=x.dtype, device=x.device) if a.weight is None else a.weight
        return x, res, w

    def _call(self, pattern, a: FusedArgs, x, res, w, **outs):
        res_out = torch.empty_like(x)
        self._comm.allreduce_fusion(
            input=x,
            workspace=self._workspace(a.group, x),
            pattern=pattern,
            launch_with_pdl=False,
            residual_out=res_out,
            residual_in=res,
            rms_gamma=w,
            rms_eps=float(a.eps),
            fp32_acc=True,
            weight_bias=1.0 if a.flags.gemma else 0.0,
            **outs,
        )
        return res_out

    def add_rmsnorm(self, a: FusedArgs) -> FusedOutputs:
        x, res, w = self._prepare(a)
        norm = torch.empty_like(x)
        res_out = self._call(self._comm.AllReduceFusionPattern.kARResidualRMSNorm, a, x, res, w, norm_out=norm)
        return FusedOutputs(res_out.view(a.input.shape), norm.view(a.input.shape))

    def add_rmsnorm_fp8_static(self, a: FusedArgs) -> FusedOutputs:
        P = self._comm.AllReduceFusionPattern
        x, res, w = self._prepare(a)
        q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
        norm = torch.empty_like(x) if a.return_norm else None
        pattern = P.kARResidualRMSNormOutFP8Quant if a.return_norm else P.kARResidualRMSNormFP8Quant
        res_out = self._call(pattern, a, x, res, w, quant_out=q, norm_out=norm,
                             scale_factor=a.quant["scale"].reshape(-1).to(torch.float32))
        return _shaped(a, FusedOutputs(res_out, norm, q))

    def add_rmsnorm_fp8_per_token(self, a: FusedArgs) -> FusedOutputs:
        P = self._comm.AllReduceFusionPattern
        x, res, w = self._prepare(a)
        q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
        scales = torch.empty((x.shape[0], 1), dtype=torch.float32, device=x.device)
        norm = torch.empty_like(x) if a.return_norm else None
        pattern = P.kARResidualRMSNormOutDynamicFP8Quant if a.return_norm else P.kARResidualRMSNormDynamicFP8Quant
        res_out = self._call(pattern, a, x, res, w, quant_out=q, scale_out=scales, norm_out=norm)
        return _shaped(a, FusedOutputs(res_out, norm, q, scales.view(*a.input.shape[:-1], 1)))

    def add_rmsnorm_nvfp4(self, a: FusedArgs) -> FusedOutputs:
        P = self._comm.AllReduceFusionPattern
        layouts = self._comm.QuantizationSFLayout
        swizzle = a.quant["swizzle"]
        x, res, w = self._prepare(a)
        t, h = x.shape
        packed = torch.empty((t, h // 2), dtype=torch.uint8, device=x.device)
        # 128x4 tiles: rows padded to 128, block columns to 4 (QuantizationSFLayout doc)
        scales = torch.empty(variants.nvfp4_scale_shape(t, h, swizzle), dtype=torch.float8_e4m3fn, device=x.device)
        norm = torch.empty_like(x) if a.return_norm else None
        pattern = P.kARResidualRMSNormOutFP4Quant if a.return_norm else P.kARResidualRMSNormFP4Quant
        res_out = self._call(pattern, a, x, res, w, quant_out=packed, scale_out=scales, norm_out=norm,
                             scale_factor=a.quant["global_scale"].reshape(-1).to(torch.float32),
                             layout_code=layouts.SWIZZLED_128x4 if swizzle else layouts.LINEAR)
        return _shaped(a, FusedOutputs(res_out, norm, packed, scales))  # FP4 outputs are [T, ...] (the fakes)


def _shaped(a: FusedArgs, out: FusedOutputs) -> FusedOutputs:
    """The [T, H] results as the op's fakes shape them: input.shape (the FP8 data too)."""
    shape = a.input.shape
    out.residual_out = out.residual_out.view(shape)
    if out.norm_out is not None:
        out.norm_out = out.norm_out.view(shape)
    if out.q is not None and out.q.shape[-1] == shape[-1]:
        out.q = out.q.view(shape)
    return out
