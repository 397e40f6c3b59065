"""``fusion-passes bench WHAT``: benchmarks, one module per thing measured (imported lazily).

Add a benchmark by adding one entry to :data:`BENCHMARKS`; its module has the same
``add_arguments(parser)`` / ``run(args)`` shape as a top-level subcommand.
"""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS: dict[str, tuple[str, str]] = {
    "compile": ("bench_compile", "our passes' share of a real vLLM Inductor compile (DeepSeek-V3 shape, 8-61 layers, CPU)"),
    "kernels": ("bench_kernels", "fused call vs the best unfused chain (NCCL / symm-mem one-shot / two-shot + "
                                 "Inductor epilogue, hidden static), under CUDA graphs"),
    "model": ("bench_model", "HF Llama-3-8B / Qwen3-MoE-shaped decoder step time without and with the pass, "
                             "CUDA graphs; --dry-run traces on CPU"),
}


def _module(name: str):
    return importlib.import_module(f"fusion_passes.cli.{BENCHMARKS[name][0]}")


def add_arguments(parser) -> None:
    parser.add_argument("benchmark", choices=sorted(BENCHMARKS), metavar="WHAT",
                        help="; ".join(f"{k}: {v[1]}" for k, v in BENCHMARKS.items()))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own options (WHAT --help)")


def run(args) -> int:
    """Import only the chosen benchmark, then parse its own options."""
    from fusion_passes.cli import Parser  # one-line errors, exit 2, as every other command

    module = _module(args.benchmark)
    sub = Parser(prog=f"fusion-passes bench {args.benchmark}", description=BENCHMARKS[args.benchmark][1])
    module.add_arguments(sub)
    return int(module.run(sub.parse_args(args.args)) or 0)
