"""``fusion-passes``: one entry point, subcommands imported lazily (like ``vllm``, ``torchrun``).

Each subcommand is a module of this package with ``add_arguments(parser)`` and
``run(args) -> int``; :data:`COMMANDS` maps its name to the module and a one-line help.
Importing torch costs seconds, so ``fusion-passes --help`` imports no subcommand.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("demo", "run a real HF tensor-parallel model on 2 gloo CPU processes, fused vs unfused"),
    "patterns": ("patterns_cmd", "list the pattern catalogue: what each family matches and becomes"),
    "bench": ("bench", "benchmarks: `bench kernels` times the fused kernels against the unfused chain"),
    "dump": ("dump", "compile a model; write its graphs before/after our passes (text + JSON)"),
    "diff": ("diff", "structural diff of two graph dumps: which chains became which fused ops"),
    "capture": ("capture", "trace real vLLM models on CPU (fake ranks); write post-grad graphs before/after our passes"),
    "explain": ("explain", "for every all-reduce: fused (variant, ops hoisted over) or the op that blocked it"),
}


def use_colour(stream=sys.stdout) -> bool:
    """Colour only on a terminal and only when NO_COLOR is not set (no-color.org)."""
    return stream.isatty() and not os.environ.get("NO_COLOR")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="fusion-passes",
        description="Fuse tensor-parallel all-reduce + residual add + RMSNorm (+ quant) in torch.compile graphs.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        args = parser.parse_args(argv)  # prints help / the unknown-command error
        parser.print_help()
        return 2
    name = argv[0]
    module = importlib.import_module(f"fusion_passes.tools.{COMMANDS[name][0]}")
    cmd = argparse.ArgumentParser(prog=f"fusion-passes {name}", description=COMMANDS[name][1])
    module.add_arguments(cmd)
    args = cmd.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except UsageError as e:
        print(f"fusion-passes {name}: error: {e}", file=sys.stderr)
        return 2


class UsageError(Exception):
    """Bad input from the user (a file that is not a dump, an unknown spec): exit 2 with the message."""


if __name__ == "__main__":
    # `python -m fusion_passes.tools.cli`: run the imported module's main, whose UsageError
    # is the class the subcommands raise (this file runs as __main__, a second copy)
    from fusion_passes.tools.cli import main as _main

    sys.exit(_main())
