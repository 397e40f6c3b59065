"""``fusion-passes demo``: a real HF tensor-parallel model, compiled with and without the pass.

Two gloo processes on CPU load a tiny random Hugging Face model with ``tp_plan="auto"``
(:mod:`fusion_passes.cli.hf_tp`), compile it with Inductor (``fullgraph=True``) once
without and once with :class:`fusion_passes.FusionPass`, run both on the same tokens and
compare the logits. Prints a per-site table, the max abs difference, parity, and the time
spent in our pass against the whole compile. Exits 1 if parity fails. ``--json`` prints
one JSON object on one line, last. The tiny model and each rank's Inductor cache live in
temporary folders that are removed when the demo ends.
"""

from __future__ import annotations

import json
import time

import torch

from fusion_passes.cli import hf_tp, terminal
from fusion_passes.cli.arguments import int_range

# Parity tolerance on the logits, per dtype. Source: the unfused Inductor kernel computes
# add + RMSNorm in fp32 registers without rounding the residual sum to the activation
# dtype, while the fused op rounds it as eager PyTorch does (the reference epilogue is the
# eager math). So they may differ by rounding of that sum, propagated through the layers:
# a few ulps of the dtype at the logits' magnitude (|logits| < 2 for the tiny model).
# fp32: 1e-4 (fp32 ulp 1.2e-7, generous for 2 layers). bf16: 0.0625 = 8 bf16 ulps at 1.0.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.0625, torch.float16: 8e-3}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


TP_SIZES = (2,)
"""Tensor-parallel sizes the demo runs at. The tiny Llama (fusion_passes/cli/hf_tp.py) has 2 KV heads:
at TP 4 its attention fails to trace ("shape '[1, 13, -1, 32]' is invalid for input of
size 208", `fusion-passes demo --tp 4 -v`, measured on CPU)."""
MAX_TOKENS = 64
"""Longest prompt: the tiny models' ``max_position_embeddings`` (fusion_passes/cli/hf_tp.py)."""


def add_arguments(parser) -> None:
    """The command's options."""
    parser.add_argument("--model", default="llama", choices=sorted(hf_tp.MODELS), help="tiny random HF model")
    parser.add_argument("--tp", type=int, default=2, choices=TP_SIZES, help="tensor-parallel size (processes), default 2")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--tokens", type=int_range(1, MAX_TOKENS), default=13,
                        help="prompt length (default 13: odd on purpose)")
    parser.add_argument("--json", action="store_true", help="print one JSON object, on one line, instead of text")


def worker(rank: int, directory: str, dtype_name: str, tokens: int) -> dict:
    """One rank: load sharded, compile unfused and fused, compare. Rank 0's dict is the result."""
    import fusion_passes
    from fusion_passes import _compat

    config = _compat.inductor_config

    config.fx_graph_cache = False  # time real compiles, never a cache hit from an earlier run
    dtype = DTYPES[dtype_name]
    model = hf_tp.load_tp(directory, dtype)
    ids = (torch.arange(tokens) * 7 % model.config.vocab_size).view(1, tokens)
    with torch.no_grad():
        t0 = time.perf_counter()
        unfused = torch.compile(model, fullgraph=True)(ids).logits
        unfused_seconds = time.perf_counter() - t0
        torch.compiler.reset()
        with fusion_passes.enabled() as fusion:
            t0 = time.perf_counter()
            out, codes = _compat.run_and_get_code(torch.compile(model, fullgraph=True), ids)
            compile_seconds = time.perf_counter() - t0
        fused = out.logits
    report = fusion_passes.FusionReport()
    for r in fusion.reports:
        report.merge(r)
    diff = (fused.float() - unfused.float()).abs().max().item()
    return {
        "model": directory,
        "dtype": dtype_name,
        "sites_total": len(report.sites),
        "sites_fused": len(report.fused),
        "max_abs_diff": diff,
        "tolerance": TOLERANCE[dtype],
        "parity": diff <= TOLERANCE[dtype],
        "pass_seconds": report.seconds,
        "compile_seconds": compile_seconds,
        "unfused_compile_seconds": unfused_seconds,
        "fused_op_in_code": any("fusion_passes.allreduce_add_rmsnorm" in c for c in codes),
        "sites": report.to_dict()["sites"],
        "errors": report.errors,
        "table": report.table(),
    }


def demo(model: str = "llama", tp: int = 2, dtype: str = "bfloat16", tokens: int = 13) -> dict:
    """Run the demo and return rank 0's result (all ranks must agree on the report)."""
    with hf_tp.tiny_model(model) as directory:
        results = hf_tp.spawn(worker, tp, directory, dtype, tokens)
    first = results[0]
    first["ranks_agree"] = all(r["sites"] == first["sites"] for r in results)
    first["parity"] = all(r["parity"] for r in results)
    first["max_abs_diff"] = max(r["max_abs_diff"] for r in results)
    first["model"] = model
    first["tp"] = tp
    return first


def run(args) -> int:
    """Run the demo; 1 if parity fails or the pass reported an internal error."""
    t0 = time.perf_counter()
    with terminal.step(f"tiny random HF {args.model} on {args.tp} gloo processes ({args.dtype}, {args.tokens} "
                       "tokens): load sharded, compile without and with fusion-passes, compare"):
        result = demo(args.model, args.tp, args.dtype, args.tokens)
    result["wall_seconds"] = time.perf_counter() - t0
    table = result.pop("table")
    if args.json:
        keys = ("sites_total", "sites_fused", "max_abs_diff", "parity", "pass_seconds", "compile_seconds", "sites")
        print(json.dumps({k: result[k] for k in keys} | {k: v for k, v in result.items() if k not in keys}))
    else:
        _print_text(result, table)
    return 0 if result["parity"] and not result["errors"] else 1


def _print_text(result: dict, table: str) -> None:
    print(table)
    print()
    print(f"fused {result['sites_fused']}/{result['sites_total']} all-reduces "
          f"(fused op in Inductor's code: {result['fused_op_in_code']}, ranks agree: {result['ranks_agree']})")
    print(f"max |fused - unfused| over logits: {result['max_abs_diff']:.3g} "
          f"(tolerance {result['tolerance']:g}) -> parity {'OK' if result['parity'] else 'FAILED'}")
    share = 100 * result["pass_seconds"] / result["compile_seconds"]
    print(f"time in fusion-passes: {result['pass_seconds'] * 1e3:.1f} ms of a {result['compile_seconds']:.1f} s "
          f"compile ({share:.2f}%)")
    for e in result["errors"]:
        print(f"internal error (graph left unchanged): {e}")
