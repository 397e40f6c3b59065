"""THE table of numbers that gate backends. Every entry names its source.

Nothing else in the library holds a size, token or world-size limit. A kernel's
documented limit names the file it comes from; a measured crossover names the benchmark
command and machine that measured it.

This is the SHIPPED table. Where ``fusion-passes tune`` measured this machine, its table
(:mod:`fusion_passes.backends.measured`) is read first, per (world size, variant, hidden, dtype),
and then a shipped per-GPU table of this GPU kind (``backends/tables/``, measured by ``tune``
on that kind); this one decides everything they do not hold.
"""

from __future__ import annotations

MiB = 1024 * 1024

# AITER (ROCm gfx942/gfx950), written against ROCm/aiter commit e4048607a535 (2026-08-22).
AITER: dict[str, object] = {
    # gfx942 (MI300) and gfx950 (MI350): the targets of AITER's custom all-reduce kernels
    # (csrc/kernels/custom_all_reduce.cu); gcnArchName prefix.
    "archs": ("gfx942", "gfx950"),
    # CustomAllreduce._SUPPORTED_WORLD_SIZES = [2, 4, 6, 8]
    # (aiter/dist/device_communicators/custom_all_reduce.py); the FUSED AR+RMSNorm kernels
    # are instantiated for 2/4/8 only (csrc/include/custom_all_reduce.cuh,
    # dispatchFusedAllReduceRMSNorm[Quant]: switch over world sizes 8, 4, 2).
    "world_sizes": (2, 4, 8),
    # 16-byte packed accesses of 8 bf16/fp16 (csrc/include/custom_all_reduce.cuh, pack_size = 16 / sizeof(T)).
    "hidden_multiple": 8,
    # 1-stage kernel: n <= 8192; 2-stage kernel: 512 <= n <= 16384 (csrc/include/
    # custom_all_reduce.cuh, dispatchFusedAllReduceRMSNorm: 1-stage needs n / pack_size <= 1024;
    # step 2 needs n_packs >= 64 and runs at most 4 loops of 512 packs).
    "one_stage_max_hidden": 8192,
    "two_stage_hidden": (512, 16384),
    # Per-token FP8 epilogue only for these n (aiter/dist/device_communicators/communicator_cuda.py,
    # fused_allreduce_rmsnorm_quant: hidden_dim in [512, 1024, 2048, 4096] or [7168, 6144]).
    "per_token_fp8_hidden": (512, 1024, 2048, 4096, 6144, 7168),
    # Per-group FP8: group size 128 (``fused_ar_rms_per_group_quant(group_size=128)``;
    # _validate_per_group_size in custom_all_reduce.py), fp32 scales.
    "per_group_sizes": (128,),
    # Custom AR runs only up to _DEFAULT_CAR_MAX_SIZE = 8192 * 8192 bytes (64 MiB) of input
    # (custom_all_reduce.py); above, ``should_custom_ar`` is False and the fused call returns None.
    "max_input_bytes": 8192 * 8192,
    # 1-stage chosen automatically only for small sizes: about 16 tokens at TP8, hidden 7168
    # = 16 * 7168 * 2 bytes * 8 ranks (communicator_cuda.py, fused_allreduce_rmsnorm: 1-stage
    # when the input bytes are <= 128 * 7168 * 2 // world_size).
    "one_stage_max_bytes_x_ranks": 16 * 7168 * 2 * 8,
}

# FlashInfer (CUDA), checked against flashinfer-python 0.7.2.post1 (the pin of pyproject's
# cuda extra; build commit beabf5004585 in flashinfer/_build_meta.py), read from the wheel:
# flashinfer/comm/trtllm_ar.py and flashinfer/data/include/flashinfer/comm/trtllm_allreduce_fusion.cuh.
FLASHINFER: dict[str, object] = {
    # allreduce_fusion_kernel dispatch: "Supported ranks: 2, 4, 8, 16"
    # (trtllm_allreduce_fusion.cuh, switch over params.nranks).
    "world_sizes": (2, 4, 8, 16),
    # FLASHINFER_CHECK(params.hidden_dim % VEC_SIZE == 0) with VEC_SIZE = kBytesPerAccess /
    # sizeof(T), kBytesPerAccess = 16: 8 elements of bf16/fp16 (trtllm_allreduce_fusion.cuh).
    "bytes_per_access": 16,
    # FP4 quant patterns need SM100+ (trtllm_allreduce_fusion.cuh: cvt_warp_fp16_to_fp4 is
    # compiled only for __CUDA_ARCH__ >= 1000).
    "fp4_min_sm": 100,
    # Fused path only below these input sizes (MiB) per SM version and world size: vLLM's
    # crossovers vs. NCCL + unfused norm, measured by vLLM on H100/B200/B300
    # (FI_ALLREDUCE_FUSION_MAX_SIZE_MB in vllm/compilation/passes/fusion/allreduce_rms_fusion.py,
    # vLLM 0.33; its world-size-16 entries are for the multi-node MNNVL path, which the
    # platform check refuses).
    "max_input_mib": {
        90: {2: 64, 4: 2, 8: 0.5},
        100: {2: 64, 4: 32, 8: 1},
        103: {2: 64, 4: 64, 8: 4},
        107: {2: 64, 4: 64, 8: 2},
    },
}

# Triton backend (ours): fusion_passes/backends/triton_kernels.py.
TRITON: dict[str, object] = {
    # tl.arange(0, WORLD_SIZE) in the barrier needs a power of two; 1 = no collective;
    # 8 = the largest NVLink clique of one host we target.
    "world_sizes": (1, 2, 4, 8),
    # One row lives in registers: BLOCK = next_pow2(hidden) fp32 values over at most 16
    # warps = 32 values per thread at 16384 (kernel design limit).
    "max_hidden": 16384,
    # Rows start 16-byte aligned in the symmetric buffer and are read with 16-byte
    # vector loads: hidden * itemsize % 16 == 0 (kernel design limit).
    "row_alignment_bytes": 16,
    # Warps per program: next_pow2(hidden) // elements_per_warp clamped to [1, 16]. add + RMSNorm
    # takes 512 (16 warps at hidden 7168); the quant variants 1024 (8 warps at 7168): the second
    # row reduction (absmax) costs a cross-warp exchange per warp. Source: A/B of 4, 8, 16 warps
    # on 1x H200, world size 1, bf16, hidden 7168, 1..16384 tokens (`tools/ab_warps.py`,
    # results/ab_warps_h200_ws1.json): 8 warps was fastest or within 2% for FP8 static,
    # per-token and per-group at every token count (e.g. static 2.41 vs 2.58 us at 1 token,
    # 198 vs 201 us at 16384) and for NVFP4 / MXFP4 below 1024 tokens; add + RMSNorm at
    # 16 warps was within 3% of the best at every hidden size (4096 / 7168 / 8192).
    "elements_per_warp": 512,
    "elements_per_warp_quant": 1024,
    "max_warps": 16,
    # Resident programs per SM for the persistent one-shot grid: 2048 threads per SM on
    # Hopper (CUDA occupancy limit) / (32 * num_warps).
    "threads_per_sm": 2048,
    # FP4 epilogues (NVFP4 / MXFP4) from this many tokens on run with at most this many
    # warps per row: more rows in flight per SM. Source: the same A/B (`tools/ab_warps.py`,
    # results/ab_warps_h200_ws1.json; 4 / 8 / 16 warps, bf16, hidden 7168): 4 warps was the
    # fastest at 1024 and 4096 tokens (NVFP4 16.4 / 59.5 us against 17.1 / 60.6 with 8
    # warps, MXFP4 16.1 / 56.4 against 16.9 / 57.0) and within 1% of the best at 16384
    # (NVFP4 201 / 202 / 251 us, MXFP4 190 / 189 / 234); below 1024 tokens 4 and 8 warps
    # were within 5% of each other either way, and num_warps_for stays. At world size 2 the
    # rule was measured only as shipped (results/bench_kernels_h200_fp4_ws2.json: NVFP4
    # 825 us at 16384 tokens, 72 at 1024).
    "fp4_many_tokens": 1024,
    "fp4_many_tokens_warps": {"add_rmsnorm_nvfp4": 4, "add_rmsnorm_mxfp4": 4},
    # Per-group FP8 group sizes the kernel reshapes a row into (powers of two).
    "per_group_sizes": (64, 128),
    # One symmetric workspace per group, grown to the largest call; above this the
    # one-shot path declines (16384 tokens x 16384 hidden x 2 bytes).
    "max_workspace_bytes": 512 * MiB,
    # Which multi-rank path runs a call: "barrier" (the one-shot with two signal-pad barriers,
    # measured at world size 2), "lamport" (wait-free one-shot: the data is the flag) or
    # "twoshot" (reduce-scatter to the row's owner + gather of the sums, both wait-free).
    # Per world size, ((max tokens or None, path), ...), first match wins. The wait-free paths
    # passed their protocol check at world sizes 2, 4 and 8 as processes on ONE H200
    # (tests/gpu/lamport_check.py) but have never been timed on several GPUs (no such machine
    # lent), so no entry selects them: FUSION_PASSES_TRITON_PATH=lamport|twoshot|barrier
    # forces one for benchmarking (read at each call, never while capturing).
    "paths": {2: ((None, "barrier"),), 4: ((None, "barrier"),), 8: ((None, "barrier"),)},
    # The wait-free paths' three-slot buffer per rank: 3 x (world + 1) x tokens x hidden
    # elements; above this many bytes the call takes the barrier path (a memory budget we
    # chose: 16 tokens at TP8, hidden 7168, bf16 take 7 MB; 2048 tokens 0.8 GB).
    "lamport_max_workspace_bytes": 1024 * MiB,
    # Token ranges where the fused kernel is FASTER than the unfused chain (NCCL
    # all-reduce, or none at world size 1, + the Inductor-compiled epilogue), per
    # (world_size, variant). Each value is one of:
    #   None: wins at every measured size (any hidden, any token count);
    #   an int N: wins up to N tokens at every measured hidden size (declines above);
    #   a dict {hidden: ((lo, hi), ...), None: ((lo, hi), ...)}: per hidden size, the
    #     token ranges (inclusive; hi None = no upper end) where it wins, which need not
    #     be contiguous; () = slower everywhere; the None key serves any hidden size not
    #     listed (no None key: unlisted hidden sizes are declined).
    # `fusion-passes bench kernels --derive-table results/<run>.json` prints the dict
    # form from a run of `fusion-passes bench kernels`. A (world size, variant) not listed
    # was not measured, so the backend declines it.
    # Source: `fusion-passes bench kernels` on 1x / 2x NVIDIA H200 (results/*.json).
    "max_tokens_faster": {
        # World size 1, 1x H200 (torch 2.11, Triton 3.6), `fusion-passes bench kernels`
        # (results/bench_kernels_h200_ws1.json: add_rmsnorm at hidden 4096/7168/8192, FP8 static
        # and per-token at 7168) and `--variants add_rmsnorm_fp8_per_group add_rmsnorm_nvfp4
        # add_rmsnorm_mxfp4` (results/bench_kernels_h200_ws1_quant.json), 1..16384 tokens,
        # derived by `fusion-passes bench kernels --derive-table` on the two files: a range is
        # where the fused call beat the BEST unfused chain (Inductor's epilogue compiled with
        # hidden static, per token count or token-dynamic) in both of its timings; elsewhere
        # the selector declines and Inductor compiles the epilogue itself. ``None`` (as a
        # hidden key) = a hidden size not measured: the intersection of the measured ones.
        (1, "add_rmsnorm"): {
            4096: ((1, 256), (1024, 8192)),
            7168: ((1, 256), (2048, None)),
            8192: ((1, 16), (64, 512), (2048, None)),
            None: ((1, 16), (64, 256), (2048, 8192)),
        },
        (1, "add_rmsnorm_fp8_static"): {7168: ((1, 512), (2048, 8192)), None: ((1, 512), (2048, 8192))},
        (1, "add_rmsnorm_fp8_per_token"): None,
        (1, "add_rmsnorm_fp8_per_group"): None,
        (1, "add_rmsnorm_nvfp4"): None,
        (1, "add_rmsnorm_mxfp4"): None,
        # World size 2: NOT re-measured against the strongest baselines (no 2-GPU machine was
        # lent after the baselines changed). The entries rest on 2x H200 runs
        # (results/bench_kernels_h200_ws2.json, _fp4_ws2.json): the fused call was faster than
        # NCCL + the epilogue compiled with dynamic=True at every point, and faster than torch
        # symm-mem one-shot + that epilogue. Replacing that epilogue by the static one measured
        # on 1x H200 (at most 3.4 us at <= 256 tokens, 246 us at 16384x7168, against 5.2-7.8 and
        # 385 us for dynamic=True) still leaves the fused call ahead at every row of those files
        # (e.g. 7.6 vs about 9.5 us at 1 token, 834 vs about 1156 us at 16384 tokens), a
        # composite of two runs, not a measurement: to be re-measured on several GPUs, with
        # symm-mem two-shot included.
        (2, "add_rmsnorm"): None,
        (2, "add_rmsnorm_fp8_static"): None,
        (2, "add_rmsnorm_fp8_per_token"): None,
        (2, "add_rmsnorm_fp8_per_group"): None,
        (2, "add_rmsnorm_nvfp4"): None,
        (2, "add_rmsnorm_mxfp4"): None,
        # World sizes 4 and 8: never measured (no machine of 4+ GPUs lent), so declined.
    },
}
