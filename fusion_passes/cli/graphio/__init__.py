"""A JSON form of an FX graph: what ``fusion-passes dump`` writes and ``diff`` / ``explain`` read.

One file holds one graph at one stage of our passes::

    {"format": "fusion-passes-graph", "version": 1,
     "model": "pkg.mod:make" | null,       # what was compiled (diff refuses two models)
     "graph": "graph_0",                   # which graph of that model (graph breaks make several)
     "stage": "before" | "hoisted" | "fused",
     "torch": "2.14.0",
     "nodes": [{"name": "add", "op": "call_function", "target": "torch.ops.aten.add.Tensor",
                "args": [...], "kwargs": {...},
                "meta": {"val": {"shape": [8, 64], "stride": [64, 1], "dtype": "bfloat16",
                                 "device": "cpu"},
                         "source": "File \\"m.py\\", line 12, in forward", "code": "x = a + b",
                         "stack_trace": "..."}}, ...],
     "report": {...}}                      # optional: the FusionReport of the "fused" stage

Values in ``args`` / ``kwargs`` / ``meta.val`` are JSON scalars, JSON lists (Python
lists), or one-key tagged objects: ``{"node": name}``, ``{"tuple": [...]}``,
``{"dict": {...}}``, ``{"float": "inf"}``, ``{"dtype": "bfloat16"}``, ``{"device":
"cuda:0"}``, ``{"op": "torch.ops.aten.add.Tensor"}``, ``{"sym": "s0"}``, ``{"slice":
[a, b, c]}``, ``{"enum": "torch.contiguous_format"}``, ``{"repr": "..."}`` (anything
else, kept only as text), and for tensor metadata ``{"shape", "stride", "dtype", "device"}``.

SAFETY: a dump is data, and may come from anyone. :func:`load` parses JSON (never pickle,
never ``eval``/``exec``), bounds the work by the file's size, its count of JSON values
and its node count before building anything (:mod:`.format`), validates every field, and
raises :class:`DumpError` with a one-line message naming what is wrong. :func:`to_fx`
turns a dump back into an FX graph for analysis only: targets resolve by NAME LOOKUP in
``torch.ops`` (or a fixed table of Python operators); anything else becomes an
:class:`Opaque` stand-in that carries the name and refuses to run. Nothing here imports
a module named by a file or opens a socket. Text read from a dump (sources, targets)
may hold terminal control characters: the commands escape it before printing
(:func:`fusion_passes.cli.terminal.printable`).

Modules: :mod:`.format` (constants, limits, :class:`DumpError`), :mod:`.writer` (graph ->
document -> text), :mod:`.reader` (file -> validated :class:`GraphDump`),
:mod:`.rebuild` (:class:`GraphDump` -> FX graph).
"""

from fusion_passes.cli.graphio.format import (
    FORMAT, MAX_BYTES, MAX_DEPTH, MAX_NODES, MAX_NUMEL, MAX_VALUES, STAGES, VERSION, DumpError, short_target,
)
from fusion_passes.cli.graphio.reader import GraphDump, NodeRecord, from_dict, load
from fusion_passes.cli.graphio.rebuild import PYTHON_TARGETS, Opaque, resolve_target, to_fx
from fusion_passes.cli.graphio.writer import (
    dumps, encode, graph_to_dict, node_to_dict, readable, source_of, target_string, write,
)

__all__ = [
    "FORMAT", "VERSION", "STAGES", "MAX_BYTES", "MAX_VALUES", "MAX_NODES", "MAX_DEPTH", "MAX_NUMEL", "DumpError",
    "short_target", "GraphDump", "NodeRecord", "from_dict", "load", "PYTHON_TARGETS", "Opaque", "resolve_target",
    "to_fx", "dumps", "encode", "graph_to_dict", "node_to_dict", "readable", "source_of", "target_string", "write",
]
