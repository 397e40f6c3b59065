"""Argument types the subcommands share: every bad value is refused while parsing, with
the valid range or the known values in the one-line error, before any work starts."""

from __future__ import annotations

import argparse
from typing import Callable


def int_range(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer in ``[lo, hi]`` (no upper bound when *hi* is None)."""
    valid = f"an integer >= {lo}" if hi is None else f"an integer from {lo} to {hi}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {valid}, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {valid}, got {value}")
        return value

    parse.__name__ = valid
    return parse


def backend_name(text: str) -> str:
    """An argparse ``type``: ``auto`` or a registered backend (:data:`fusion_passes.backends.ORDER`)."""
    from fusion_passes import backends

    known = ["auto", *backends.ORDER]
    if text not in known:
        raise argparse.ArgumentTypeError(f"unknown backend {text!r}; known: {', '.join(known)}")
    return text


def path_argument(text: str) -> str:
    """An argparse ``type``: a non-empty path (``--html ""`` is a mistake, not "no page")."""
    if not text:
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return text


def add_backend_options(parser) -> None:
    """``--no-hoist`` and ``--backend``, as :class:`fusion_passes.FusionOptions` takes them."""
    parser.add_argument("--no-hoist", dest="hoist", action="store_false", help="run fusion without hoisting")
    parser.add_argument("--backend", default="auto", type=backend_name,
                        help="force a fused-op backend: auto (default) or a backend name")


def add_vllm_model_options(parser, *, with_tp: bool = True) -> None:
    """``--tp``, ``--dtype``, ``--quant``, ``--layers`` of a traced vLLM model (tools/capture.py)."""
    from fusion_passes.tools.tiny_configs import DTYPES, QUANT_NAMES, TP_SIZES

    if with_tp:
        parser.add_argument("--tp", type=int, default=2, choices=TP_SIZES,
                            help="tensor-parallel size, fake ranks (default: 2)")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    parser.add_argument("--quant", default="none", choices=QUANT_NAMES, help="FP8 checkpoint format (default: none)")
    parser.add_argument("--layers", type=int_range(1), default=2, help="decoder layers (default: 2)")
