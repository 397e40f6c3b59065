"""Argument types the subcommands share: every bad value is refused while parsing, with
the valid range or the known values in the one-line error, before any work starts."""

from __future__ import annotations

import argparse
from typing import Callable


MAX_LAYERS = 128
"""Most decoder layers of a traced or benchmarked model: the deepest real decoder we know,
Llama 3.1 405B, has 126 (``num_hidden_layers`` in meta-llama/Llama-3.1-405B's
config.json; DeepSeek-V3 has 61). ``--layers 1000000`` grew to 2.8 GB before any output."""
MAX_TP = 72
"""Largest tensor-parallel world (``--tp``, ``WORLD_SIZE``): one NVLink domain, the 72 GPUs
of a GB200 NVL72, the most a tensor-parallel all-reduce spans in a real deployment."""
MAX_SEQS = 1024
"""Most sequences one decode step batches: vLLM's largest default ``max_num_seqs``
(1,024 on H100/H200/B200, ``vllm/engine/arg_utils.py``)."""
MAX_CONTEXT = 40_960
"""Most tokens of one sequence (a prefill, a decode's cached context): the longer
``max_position_embeddings`` of the two models ``bench model`` builds (Qwen3-30B-A3B's
40,960; Llama-3-8B's is 8,192; ``fusion_passes/cli/models.py``)."""
MAX_STEP_TOKENS = 131_072
"""Most tokens one fused-kernel call takes (``bench kernels --tokens``): a whole 128K
prompt in one step (Llama 3.1's ``max_position_embeddings``, 131,072, with chunked
prefill off); vLLM's default step is 8,192 to 16,384 tokens."""

MAX_REPLAYS = 1_000
"""Most timed replays per point: 1,000 replays of the longest step ``bench model`` takes
(a 40,960-token prefill, about 150 ms by scaling the 14.9 ms of a 4,096-token prefill on
1x H200, results/bench_model_h200_ws1_llama_bf16.json) is 2.5 minutes per form; a
kernel point is microseconds a replay."""
MAX_ROUNDS = 100
"""Most interleaved rounds per point (``bench model --rounds``): with the default 10
replays a round, 100 rounds are 1,000 replays per form, :data:`MAX_REPLAYS`'s bound."""


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
    """``--tp``, ``--dtype``, ``--quant``, ``--layers`` of a traced vLLM model (fusion_passes/cli/capture.py)."""
    from fusion_passes.cli.tiny_configs import DTYPES, QUANT_NAMES, TP_SIZES

    if with_tp:
        parser.add_argument("--tp", type=int, default=2, choices=TP_SIZES,
                            help="tensor-parallel size, fake ranks (default: 2)")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    parser.add_argument("--quant", default="none", choices=QUANT_NAMES, help="FP8 checkpoint format (default: none)")
    parser.add_argument("--layers", type=int_range(1, MAX_LAYERS), default=2, help="decoder layers (default: 2)")


def world_size_from_env() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 when unset); a bad value is a usage error naming it."""
    import os

    from fusion_passes.cli import UsageError

    text = os.environ.get("WORLD_SIZE", "1")
    try:
        return int_range(1, MAX_TP)(text)
    except argparse.ArgumentTypeError as e:
        raise UsageError(f"environment variable WORLD_SIZE {e} (torchrun sets it; unset it for one process)") from None
