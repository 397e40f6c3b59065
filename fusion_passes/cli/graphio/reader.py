"""Reading: a dump file, bounded and validated, as :class:`GraphDump` records.

:func:`load` reads JSON only (never pickle, never ``eval``/``exec``). The file's size and
its count of JSON values are checked on the raw bytes, its node count right after
parsing, and every field after that, each before anything larger is built from it
(limits in :mod:`.format`). Anything wrong raises :class:`DumpError` naming it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import stat
from typing import Any

import torch

from fusion_passes.cli.graphio.format import (
    FORMAT, MAX_BYTES, MAX_DEPTH, MAX_NODES, MAX_NUMEL, MAX_VALUES, NAME, OPS, STAGES, SYM_SIZE, TAGS, VERSION,
    DumpError,
    short_target,
)


@dataclasses.dataclass
class NodeRecord:
    """One node of a loaded dump (validated; ``args`` still in the tagged JSON form)."""

    name: str
    op: str
    target: str
    args: list
    kwargs: dict
    val: Any = None
    source: str | None = None
    code: str | None = None
    stack_trace: str | None = None
    _inputs: list[str] | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def inputs(self) -> list[str]:
        """Names of the nodes this one reads, in argument order (with repeats; computed once,
        the record is read-only)."""
        if self._inputs is None:
            out: list[str] = []
            _collect_refs(self.args, out)
            _collect_refs(self.kwargs, out)
            self._inputs = out
        return list(self._inputs)

    @property
    def short_target(self) -> str:
        """The target without ``torch.ops.`` (how reports name ops)."""
        return short_target(self.target)


@dataclasses.dataclass
class GraphDump:
    """A loaded, validated dump: one graph at one stage."""

    model: str | None
    graph: str
    stage: str
    torch_version: str
    nodes: list[NodeRecord]
    report: dict | None = None
    path: str | None = None

    def by_name(self) -> dict[str, NodeRecord]:
        """Every node by its name."""
        return {n.name: n for n in self.nodes}

    def signature(self) -> list[tuple[str, Any]]:
        """The graph inputs (placeholder names and metadata): our passes never change them,
        so two stages of one graph share it and two different models almost never do."""
        return [(n.name, n.val) for n in self.nodes if n.op == "placeholder"]


def _collect_refs(value: Any, out: list[str]) -> None:
    if isinstance(value, list):
        for v in value:
            _collect_refs(v, out)
    elif isinstance(value, dict):
        if "node" in value and len(value) == 1:
            out.append(value["node"])
        else:
            for v in value.values():
                _collect_refs(v, out)


# ------------------------------------------------------------------------ values


def _is_dim(d: Any) -> bool:
    return (isinstance(d, int) and not isinstance(d, bool)) or (
        isinstance(d, dict) and set(d) == {"sym"} and isinstance(d["sym"], str))


def _check_dtype(name: Any, where: str) -> None:
    if not isinstance(name, str) or not isinstance(getattr(torch, name, None), torch.dtype):
        raise DumpError(f"{where}: unknown dtype {name!r}")


def _check_device(name: Any, where: str) -> None:
    """A device string torch parses (``cpu``, ``cuda:0``, ``meta``, ...); parsing runs no code."""
    if not isinstance(name, str) or len(name) > 64:
        raise DumpError(f"{where}: device must be a short string, got {name!r:.80}")
    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        raise DumpError(f"{where}: unknown device {name!r}") from None


def _check_tensor(value: dict, where: str) -> None:
    """Tensor metadata: known dtype and device, and a shape and strides a tensor can have."""
    shape, stride = value["shape"], value.get("stride")
    for key, dims in (("shape", shape), ("stride", stride)):
        if dims is not None and (not isinstance(dims, list) or not all(_is_dim(d) for d in dims)):
            raise DumpError(f"{where}: tensor {key} must be a list of ints or {{'sym': str}}")
    if stride is not None and len(stride) != len(shape):
        raise DumpError(f"{where}: tensor stride has {len(stride)} entries for a shape of {len(shape)}")
    sizes = [d if isinstance(d, int) else SYM_SIZE for d in shape]  # a symbol counts as SYM_SIZE
    steps = [s for s in stride or () if isinstance(s, int)]
    if any(d < 0 for d in sizes + steps):
        raise DumpError(f"{where}: tensor shape {shape} / stride {stride} has a negative entry")
    if math.prod(sizes) > MAX_NUMEL or any(s > MAX_NUMEL for s in sizes + steps):
        raise DumpError(f"{where}: tensor shape {shape} / stride {stride} is larger than any device holds "
                        f"(limit 2**{MAX_NUMEL.bit_length() - 1} elements, a symbolic size counted as "
                        f"2**{SYM_SIZE.bit_length() - 1})")
    _check_dtype(value["dtype"], where)
    _check_device(value.get("device", "cpu"), where)


def _check_tagged(tag: str, inner: Any, where: str, known: set[str] | None, depth: int) -> None:
    """One ``{tag: inner}`` value (see the package docstring for the tags)."""
    if tag == "node":
        if not isinstance(inner, str):
            raise DumpError(f"{where}: node reference must be a name")
        if known is not None and inner not in known:
            raise DumpError(f"{where}: reference to node {inner!r} that is not defined before it")
    elif tag in ("tuple", "slice"):
        if not isinstance(inner, list):
            raise DumpError(f"{where}: {tag} must hold a list")
        _check_value(inner, where, known, depth + 1)
    elif tag == "dict":
        if not isinstance(inner, dict):
            raise DumpError(f"{where}: dict must hold an object")
        for v in inner.values():
            _check_value(v, where, known, depth + 1)
    elif tag == "float":
        if inner not in ("inf", "-inf", "nan"):
            raise DumpError(f"{where}: bad float {inner!r}")
    elif tag == "dtype":
        _check_dtype(inner, where)
    elif tag == "device":
        _check_device(inner, where)
    elif not isinstance(inner, str):
        raise DumpError(f"{where}: {tag} must be a string")


def _check_value(value: Any, where: str, known: set[str] | None, depth: int = 0) -> None:
    """Validate one tagged value; *known* are the node names it may reference."""
    if depth > MAX_DEPTH:
        raise DumpError(f"{where}: values nested deeper than {MAX_DEPTH}")
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, list):
        for v in value:
            _check_value(v, where, known, depth + 1)
        return
    if not isinstance(value, dict):
        raise DumpError(f"{where}: unexpected JSON value {type(value).__name__}")
    if set(value) >= {"shape", "dtype"}:
        _check_tensor(value, where)
        return
    if len(value) != 1 or next(iter(value)) not in TAGS:
        raise DumpError(f"{where}: unknown value object with keys {sorted(value)[:5]}")
    _check_tagged(*next(iter(value.items())), where, known, depth)


# ------------------------------------------------------------------------- documents


def _check_header(doc: Any, what: str) -> None:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise DumpError(f"{what} is not a fusion-passes graph dump (no \"format\": \"{FORMAT}\" marker); "
                        "write one with `fusion-passes dump`")
    if doc.get("version") != VERSION:
        raise DumpError(f"{what}: dump format version {doc.get('version')!r}; this fusion-passes reads version {VERSION}")
    for key, kinds in (("model", (str, type(None))), ("graph", (str,)), ("stage", (str,)), ("torch", (str,)),
                       ("nodes", (list,)), ("report", (dict, type(None)))):
        if not isinstance(doc.get(key), kinds):
            raise DumpError(f"{what}: field {key!r} is missing or has the wrong type")
    if doc["stage"] not in STAGES:
        raise DumpError(f"{what}: stage {doc['stage']!r} is not one of {', '.join(STAGES)}")
    if len(doc["nodes"]) > MAX_NODES:
        raise DumpError(f"{what}: {len(doc['nodes'])} nodes; a dump is read up to {MAX_NODES} nodes "
                        "(the limit bounds the time and memory spent on one file)")


def _node(raw: Any, i: int, what: str, seen: set[str]) -> NodeRecord:
    """Node #*i*, validated; *seen* holds the names defined before it."""
    where = f"{what}: node #{i}"
    if not isinstance(raw, dict):
        raise DumpError(f"{where} is not an object")
    name, op, target = raw.get("name"), raw.get("op"), raw.get("target")
    if not isinstance(name, str) or not NAME.match(name):
        raise DumpError(f"{where}: bad node name {name!r:.80}")
    where = f"{what}: node {name}"
    if name in seen:
        raise DumpError(f"{where}: defined twice")
    if op not in OPS:
        raise DumpError(f"{where}: unknown op {op!r:.80} (expected one of {', '.join(OPS)})")
    if not isinstance(target, str) or len(target) > 500:
        raise DumpError(f"{where}: target must be a qualified name string")
    args, kwargs, meta = raw.get("args", []), raw.get("kwargs", {}), raw.get("meta", {})
    if not isinstance(args, list) or not isinstance(kwargs, dict) or not isinstance(meta, dict):
        raise DumpError(f"{where}: args must be a list, kwargs and meta objects")
    _check_value(args, where, seen)
    _check_value(list(kwargs.values()), where, seen)
    _check_value(meta.get("val"), where + " meta.val", None)
    for key in ("source", "code", "stack_trace"):
        if not isinstance(meta.get(key), (str, type(None))):
            raise DumpError(f"{where}: meta.{key} must be a string")
    return NodeRecord(name, op, target, args, kwargs, meta.get("val"), meta.get("source"), meta.get("code"),
                      meta.get("stack_trace"))


def from_dict(doc: Any, path: str | None = None) -> GraphDump:
    """Validate a parsed dump document; :class:`DumpError` names the first problem."""
    what = path or "dump"
    _check_header(doc, what)
    nodes: list[NodeRecord] = []
    seen: set[str] = set()
    for i, raw in enumerate(doc["nodes"]):
        nodes.append(_node(raw, i, what, seen))
        seen.add(nodes[-1].name)
    outputs = [n for n in nodes if n.op == "output"]
    if len(outputs) != 1 or nodes[-1].op != "output":
        raise DumpError(f"{what}: a graph has exactly one output node, last")
    return GraphDump(doc["model"], doc["graph"], doc["stage"], doc["torch"], nodes, doc.get("report"), path)


def _check_regular(path: str, info: os.stat_result) -> os.stat_result:
    if not stat.S_ISREG(info.st_mode):
        raise DumpError(f"{path} is not a regular file (a graph dump is a file `fusion-passes dump` wrote)")
    return info


def _read_bounded(path: str) -> bytes:
    """The file's bytes, refused before reading when it is not a regular file (a FIFO or a
    device would block or never end: checked before it is opened, and again once opened,
    without blocking, in case it was swapped) or too large."""
    try:
        _check_regular(path, os.stat(path))
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with open(fd, "rb") as f:
            size = _check_regular(path, os.fstat(f.fileno())).st_size
            if size > MAX_BYTES:
                raise DumpError(f"{path} is {size / 2**20:.0f} MiB; a dump is read up to {MAX_BYTES >> 20} MiB "
                                "(the limit bounds the time and memory spent on one file)")
            data = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise DumpError(f"cannot read {path}: {e.strerror or e}") from None
    if len(data) > MAX_BYTES:
        raise DumpError(f"{path} is larger than {MAX_BYTES >> 20} MiB; not a graph dump")
    return data


def load(path: str) -> GraphDump:
    """Read and validate the dump at *path* (JSON only; see the module docstring)."""
    data = _read_bounded(path)
    # every JSON value but the first follows a comma or opens a container: an upper bound
    # on the values the parser would build, counted before it builds any
    values = data.count(b",") + data.count(b"[") + data.count(b"{") + 1
    if values > MAX_VALUES:
        raise DumpError(f"{path} holds up to {values} JSON values; a dump is read up to {MAX_VALUES} "
                        f"({MAX_NODES} nodes; the limit bounds the time and memory spent on one file)")
    try:
        text = data.decode("utf-8")
        del data
        doc = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise DumpError(f"{path}: JSON nested deeper than the parser's recursion limit; a graph dump nests "
                        f"values at most {MAX_DEPTH} deep") from None
    except (UnicodeDecodeError, json.JSONDecodeError, DumpError) as e:
        raise DumpError(f"{path} is not a fusion-passes graph dump (not JSON: {e})") from None
    return from_dict(doc, path)


def _reject_constant(name: str):
    raise DumpError(f"non-standard JSON constant {name}")
