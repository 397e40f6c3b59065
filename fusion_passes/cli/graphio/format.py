"""The dump format's constants and limits, and the error every reader raises.

The limits bound what reading one file may cost, whatever it holds: a file over
:data:`MAX_BYTES`, with more than :data:`MAX_VALUES` JSON values or more than
:data:`MAX_NODES` nodes is refused before it is parsed into a graph.
"""

from __future__ import annotations

import re

FORMAT = "fusion-passes-graph"
"""The format marker every dump starts with."""
VERSION = 1
"""The format version this reader understands (and the writer writes)."""
STAGES = ("before", "hoisted", "fused")
"""Stages of one graph: as Inductor handed it to us, after hoisting, after fusion."""

MAX_NODES = 40_000
"""Most nodes a dump may hold: 8x the largest real graph we know. vLLM's DeepSeek-V3 at
61 layers has 4,912 post-grad nodes (results/bench_compile_pass_only_after_fix.json).
Rebuilding costs about 0.5 ms per node and the pass a few more, so the cap bounds the
work on an accepted file to about a minute on 2 CPU cores."""
MAX_BYTES = 64 * 2**20
"""Largest file read: :data:`MAX_NODES` nodes at 1.6 KB each, the size of a node of a
vLLM Llama dump with its stack trace (``fusion-passes dump capture:llama``: 271 KB for
169 nodes)."""
MAX_VALUES = 4_000_000
"""Most JSON values (numbers, strings, lists, objects) a file may hold: 100 per node at
:data:`MAX_NODES`; the Llama dump above has 25 per node (45 by the pre-parse count, which
also counts commas and brackets inside strings). Parsing costs up to about 75 bytes of
memory per value (an empty object in a list), so with the file's own text this keeps a
hostile file under 500 MB."""
MAX_DEPTH = 32
"""Deepest nesting of tagged values (real graphs need 4: a list of tuples of nodes)."""
MAX_NUMEL = 2**48
"""Most elements one tensor's metadata may describe (and largest size or stride): 2000
times what an H200's 141 GB could hold at one byte per element. Larger (or negative)
shapes cannot come from a real graph and would overflow the int64 size arithmetic that
rebuilding and the passes do."""

SYM_SIZE = 2**14
"""What each symbolic dimension (``{"sym": "s0"}``) counts as in the :data:`MAX_NUMEL`
bound: what the pass sees, since rebuilding gives each symbol a concrete stand-in of
8,191 + 2 per distinct symbol (``fusion_passes/cli/graphio/rebuild.py``), under 2**14 for a dump's
first 4,096 symbols. A real token count is of that order (vLLM's engine defaults
``max_num_batched_tokens`` to 16,384 on a large GPU, ``vllm/engine/arg_utils.py``). So
``[2**40, {"sym": "s0"}, 64]`` is refused, ``[s0, s1, 128256]`` (Llama 3's vocabulary) is not."""

OPS = ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output")
"""Node kinds of an FX graph."""
TAGS = ("node", "tuple", "dict", "float", "dtype", "device", "op", "sym", "slice", "enum", "repr")
"""Keys of the one-key tagged values (see the package docstring)."""
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
"""What a node name may be (FX names are Python identifiers)."""


class DumpError(ValueError):
    """A file that is not a valid fusion-passes graph dump (the message says why)."""


def short_target(target: str) -> str:
    """``torch.ops.aten.add.Tensor`` -> ``aten.add.Tensor`` (how reports name ops)."""
    return target[len("torch.ops."):] if target.startswith("torch.ops.") else target
