"""The MEASURED table: what ``fusion-passes tune`` timed on this machine, read before the shipped one.

``fusion-passes tune`` (and only it) writes one JSON file, by default
``$XDG_CACHE_HOME/fusion_passes/tuned.json`` (``~/.cache/...`` without ``XDG_CACHE_HOME``);
``$FUSION_PASSES_TUNED`` names another file (``off`` disables the measured table). The file
holds one table per machine key::

    {"format": "fusion-passes measured table", "version": 2, "tables": [
      {"key": {"gpu": "NVIDIA H100 80GB HBM3", "world_size": 1, "single_node": true,
               "torch": "2.11.0+cu130", "triton": "3.6.0", "driver": "12080"},
       "command": "fusion-passes tune ...", "written": "2026-12-06T21:00:00Z",
       "entries": [{"variant": "add_rmsnorm", "hidden": 7168, "dtype": "bfloat16", "tokens": 1, "pick": "fused",
                    "path": "local", "num_warps": 16, "rows": 1, "num_stages": null,
                    "fused_us": 2.2, "unfused_us": 3.0, "best_unfused": "none+static"}, ...]}]}

An entry is one token *bucket* of one (variant, hidden, activation dtype): ``pick`` ``fused`` (the kernel,
on ``path``, at its fastest launch config: ``num_warps``, ``rows`` per program at world size 1
and ``num_stages``; the last two optional, absent meaning one row and Triton's default) or
``unfused`` (the best unfused chain was faster). A token
count is served by the smallest measured bucket at or above it (the largest above them
all). Where the table has no entry for a (variant, hidden, dtype), the shipped table
(:mod:`fusion_passes.backends.thresholds`) decides, as it would without the file: a call in
float16 is never decided by what was timed in bfloat16. Version 1 files (before the dtype
key) are read as bfloat16, the only dtype ``tune`` timed then.

The file is data: parsed as JSON, every field checked (types, names, finite numbers);
nothing in it is executed. A corrupt file, a format version this library does not read,
or a table for this GPU and world size written by other torch / Triton / driver versions
(stale) gives ONE warning naming the file and the problem, and the shipped table is used.

SHIPPED per-GPU tables: ``fusion_passes/backends/tables/*.json``, in the same format, hold
tables that ``fusion-passes tune`` measured on a GPU kind we could run (merged over several
runs by ``tools/merge_tuned.py``; each file names its runs). One applies where its GPU name,
world size and one-host flag are this machine's; its versions are where it was measured, not
a condition. This machine's own file takes precedence per (variant, hidden, dtype): :func:`local`
returns the two combined, each pair labelled with the table it came from
(:meth:`Table.label`). ``$FUSION_PASSES_TUNED=off`` turns off this machine's file only.

A table is identified by its digest (:attr:`Table.digest`); the selector's
:class:`~fusion_passes.backends.contract.Call` carries it (``table``), so a decision names
the table that made it. Which digest a call may use at world size > 1 is agreed across
the group first (:mod:`fusion_passes.backends.agree`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import pathlib

FORMAT = "fusion-passes measured table"
VERSION = 2
READS = (1, 2)  # the format versions read (1: entries without "dtype", all timed in bfloat16)
DTYPES = ("bfloat16", "float16")  # an entry's activation dtype (torch's name): those ``tune`` times
ENV = "FUSION_PASSES_TUNED"
PICKS = ("fused", "unfused")
PATHS = ("local", "barrier", "lamport", "twoshot")
VERSION_KEYS = ("torch", "triton", "driver")
# The launch configs an entry may name besides its warps, and their values: the ones
# ``fusion-passes tune`` times (fusion_passes/cli/tune.py ROWS, STAGES, CHUNKS, TILES), each a valid Triton launch.
LAUNCH = {"rows": (1, 2, 4, 8), "num_stages": (1, 2, 3, 4), "chunk": (256, 512, 1024, 2048, 4096),
          "tile": (1, 2, 4, 8)}

_log = logging.getLogger("fusion_passes")
_warned: set[str] = set()


def path() -> pathlib.Path | None:
    """Where the measured table lives (None: ``$FUSION_PASSES_TUNED=off``)."""
    env = os.environ.get(ENV, "").strip()
    if env.lower() == "off":
        return None
    if env:
        return pathlib.Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(cache) / "fusion_passes" / "tuned.json"


@functools.lru_cache(maxsize=1)
def _gpu() -> str | None:
    """This process's GPU name (None without an NVIDIA GPU: no measured table applies)."""
    import torch

    if not torch.cuda.is_available() or torch.version.hip is not None:
        return None
    return torch.cuda.get_device_name()


@functools.lru_cache(maxsize=1)
def _versions() -> dict[str, str]:
    """The torch / Triton / driver versions a measurement depends on."""
    import importlib.metadata

    import torch

    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = "none"
    return {"torch": torch.__version__, "triton": triton, "driver": _driver()}


def _driver() -> str:
    """The NVIDIA driver's version (``"580.159.04"``, through NVML when ``pynvml`` is there),
    else the CUDA version the driver supports (``"cuda 13000"``, ``cuDriverGetVersion``),
    else ``"none"``."""
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # noqa: BLE001 - no NVML: ask the CUDA driver instead
        pass
    try:
        import ctypes

        out = ctypes.c_int(0)
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(out)) == 0:
            return f"cuda {out.value}"
    except Exception:  # noqa: BLE001 - no driver library
        pass
    return "none"


def machine_key(world_size: int, single_node: bool = True) -> dict | None:
    """The key of this machine's table at *world_size*, or None without an NVIDIA GPU."""
    gpu = _gpu()
    if gpu is None:
        return None
    return {"gpu": gpu, "world_size": int(world_size), "single_node": bool(single_node or world_size == 1),
            **_versions()}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One measured token bucket of one (variant, hidden, dtype)."""

    tokens: int
    pick: str
    path: str = "local"
    num_warps: int | None = None
    rows: int | None = None  # rows per program (world size 1; None: one)
    num_stages: int | None = None  # Triton's pipelining depth (None: Triton's default)
    fused_us: float | None = None
    unfused_us: float | None = None
    best_unfused: str | None = None
    evict: bool | None = None  # world size 1: streamed loads evict_first (None: off)
    chunk: int | None = None  # world size 1: the row in pieces of this many elements, two passes (None: whole)
    tile: int | None = None  # world size 1: rows per program at once, a [tile, H] block (None: one)


def dtype_name(dtype) -> str:
    """The table's name of an activation dtype: a torch dtype (``torch.bfloat16``) or its
    name (``"bfloat16"``) -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def pair(variant: str, hidden: int, dtype) -> tuple[str, int, str]:
    """What a table is indexed by: (variant, hidden, :func:`dtype_name`)."""
    return variant, hidden, dtype_name(dtype)


@dataclasses.dataclass(eq=False)
class Table:
    """One machine key's entries, indexed by (variant, hidden, dtype name), buckets in
    increasing order. Every query names the activation dtype (a torch dtype or its name)."""

    source: str  # the file it was read from
    key: dict
    buckets: dict[tuple[str, int, str], tuple[Entry, ...]]  # :func:`pair` -> its buckets
    digest: str
    shipped: bool = False  # a shipped per-GPU table (fusion_passes/backends/tables), not this machine's
    # (variant, hidden, dtype) -> the table it came from, where two were combined (:func:`combine`)
    origin: dict = dataclasses.field(default_factory=dict)

    def has(self, variant: str, hidden: int, *, dtype) -> bool:
        return pair(variant, hidden, dtype) in self.buckets

    def label(self, variant: str, hidden: int, *, dtype) -> str:
        """Which table decides (variant, hidden, dtype): ``measured table FILE`` (this machine's,
        written by ``fusion-passes tune``) or ``shipped table for GPU (FILE)``."""
        table = self.origin.get(pair(variant, hidden, dtype), self)
        if table.shipped:
            return f"shipped table for {table.key.get('gpu')} ({table.source})"
        return f"measured table {table.source}"

    def measured_here(self, variant: str, hidden: int, *, dtype) -> bool:
        """Whether this machine's own file holds (variant, hidden, dtype) (calibration fills the rest)."""
        p = pair(variant, hidden, dtype)
        return p in self.buckets and not self.origin.get(p, self).shipped

    def lookup(self, variant: str, hidden: int, tokens: int, *, dtype) -> Entry | None:
        """The bucket serving *tokens* (the smallest measured at or above it), or None."""
        entries = self.buckets.get(pair(variant, hidden, dtype))
        if not entries:
            return None
        return next((e for e in entries if e.tokens >= tokens), entries[-1])

    def in_range(self, variant: str, hidden: int, lo: int, hi: int | None, *, dtype) -> tuple[Entry, ...]:
        """Every bucket serving some token count in ``[lo, hi]`` (hi None: no upper end)."""
        entries = self.buckets.get(pair(variant, hidden, dtype), ())
        out, below = [], 0
        for i, e in enumerate(entries):
            top = math.inf if i == len(entries) - 1 else e.tokens
            if below < (math.inf if hi is None else hi) and top >= lo:
                out.append(e)
            below = e.tokens
        return tuple(out)


class Invalid(ValueError):
    """The file is not a measured table this library reads (the message says why)."""


def _entry(raw) -> tuple[tuple[str, int, str], Entry]:
    from fusion_passes import variants

    if not isinstance(raw, dict):
        raise Invalid(f"an entry is {type(raw).__name__}, not an object")
    variant, hidden, tokens, pick = raw.get("variant"), raw.get("hidden"), raw.get("tokens"), raw.get("pick")
    if variant not in variants.NAMES:
        raise Invalid(f"unknown variant {variant!r}")
    for name, v in (("hidden", hidden), ("tokens", tokens)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise Invalid(f"{name} must be a positive integer, got {v!r}")
    if raw.get("dtype") not in DTYPES:
        raise Invalid(f"dtype must be one of {DTYPES}, got {raw.get('dtype')!r}")
    if pick not in PICKS:
        raise Invalid(f"pick must be one of {PICKS}, got {pick!r}")
    path_ = raw.get("path", "local")
    if path_ not in PATHS:
        raise Invalid(f"path must be one of {PATHS}, got {path_!r}")
    warps = raw.get("num_warps")
    if warps is not None and (not isinstance(warps, int) or isinstance(warps, bool) or warps not in (1, 2, 4, 8, 16, 32)):
        raise Invalid(f"num_warps must be a power of two up to 32, got {warps!r}")
    launch = {name: _launch_int(raw, name, allowed) for name, allowed in LAUNCH.items()}
    if launch["rows"] is not None and launch["rows"] > 1 and path_ != "local":
        raise Invalid(f"rows per program {launch['rows']} on path {path_!r}: only the world-size-1 kernel takes it")
    if launch["chunk"] is not None and path_ != "local":
        raise Invalid(f"chunk {launch['chunk']} on path {path_!r}: only the world-size-1 kernel takes it")
    if launch["tile"] is not None and launch["tile"] > 1:
        if path_ != "local":
            raise Invalid(f"tile {launch['tile']} on path {path_!r}: only the world-size-1 kernel takes it")
        if launch["chunk"] is not None or (launch["rows"] or 1) > 1:
            raise Invalid(f"tile {launch['tile']} with rows {launch['rows']} or chunk {launch['chunk']}: "
                          "a launch is one of the three")
    times = {}
    for name in ("fused_us", "unfused_us"):
        v = raw.get(name)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0):
            raise Invalid(f"{name} must be a positive finite number, got {v!r}")
        times[name] = None if v is None else float(v)
    best = raw.get("best_unfused")
    evict = raw.get("evict")
    if evict is not None and (not isinstance(evict, bool) or (evict and path_ != "local")):
        raise Invalid(f"evict must be true or false, and true only on path 'local', got {evict!r} on {path_!r}")
    entry = Entry(tokens, pick, path_, warps, best_unfused=best if isinstance(best, str) else None, evict=evict,
                  **launch, **times)
    return pair(variant, hidden, raw["dtype"]), entry


def _launch_int(raw: dict, name: str, allowed: tuple[int, ...]) -> int | None:
    v = raw.get(name)
    if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v not in allowed):
        raise Invalid(f"{name} must be one of {allowed}, got {v!r}")
    return v


def digest_of(table: dict) -> str:
    """A short hash of one table (its key and entries, canonical JSON)."""
    body = json.dumps({"key": table.get("key"), "entries": table.get("entries")}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def parse_table(raw: dict, source: str) -> Table:
    """One table of the file, checked and indexed."""
    if not isinstance(raw, dict) or not isinstance(raw.get("key"), dict) or not isinstance(raw.get("entries"), list):
        raise Invalid("a table needs a 'key' object and an 'entries' list")
    buckets: dict[tuple[str, int, str], dict[int, Entry]] = {}
    for item in raw["entries"]:
        where, entry = _entry(item)
        if entry.tokens in buckets.setdefault(where, {}):
            raise Invalid(f"{where[0]} hidden {where[1]} {where[2]}: token bucket {entry.tokens} listed twice")
        buckets[where][entry.tokens] = entry
    indexed = {k: tuple(v[t] for t in sorted(v)) for k, v in buckets.items()}
    return Table(source, dict(raw["key"]), indexed, digest_of(raw))


def read_file(file: pathlib.Path) -> list[dict]:
    """The tables of *file* as raw dicts ([] when it does not exist); Invalid if it is not one."""
    if not file.exists():
        return []
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise Invalid(f"not readable JSON ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise Invalid(f"not a measured table (no \"format\": {FORMAT!r})")
    if data.get("version") not in READS:
        raise Invalid(f"format version {data.get('version')!r}; this library reads versions {READS} "
                      "(run `fusion-passes tune` again)")
    if not isinstance(data.get("tables"), list):
        raise Invalid("'tables' must be a list")
    if data["version"] == 1:  # before the dtype key: every entry was timed in bfloat16
        return [_as_bfloat16(t) for t in data["tables"]]
    return data["tables"]


def _as_bfloat16(table):
    """A version-1 table read as version 2: its entries' dtype ``bfloat16`` (the only one
    ``tune`` timed before the key existed)."""
    if not isinstance(table, dict) or not isinstance(table.get("entries"), list):
        return table  # parse_table says what is wrong
    return {**table, "entries": [{"dtype": "bfloat16", **e} if isinstance(e, dict) else e for e in table["entries"]]}


def _warn(source: str, why: str) -> None:
    text = f"fusion_passes: measured table {source}: {why}; the shipped table is used"
    if text not in _warned:
        _warned.add(text)
        _log.warning(text)


_BY_DIGEST: dict[str, Table] = {}


def by_digest(digest: str) -> Table | None:
    """A table read in this process, by its digest."""
    return _BY_DIGEST.get(digest)


@functools.lru_cache(maxsize=None)
def _local(file: str | None, key_json: str | None) -> Table | None:
    if file is None or key_json is None:
        return None
    key = json.loads(key_json)
    try:
        raws = read_file(pathlib.Path(file))
        tables = [parse_table(t, file) for t in raws]
    except Invalid as e:
        _warn(file, str(e))
        return None
    same = [t for t in tables if t.key == key]
    if same:
        _BY_DIGEST[same[0].digest] = same[0]
        return same[0]
    where = {k: key[k] for k in ("gpu", "world_size", "single_node")}
    stale = [t for t in tables if {k: t.key.get(k) for k in where} == where]
    if stale:
        differ = ", ".join(f"{k} {stale[0].key.get(k)!r} there, {key[k]!r} here" for k in VERSION_KEYS
                           if stale[0].key.get(k) != key[k])
        _warn(file, f"stale: measured with other versions ({differ}); run `fusion-passes tune` again")
    elif tables and not any(t.key.get("gpu") == key["gpu"] for t in tables):
        _warn(file, f"no table for this GPU ({key['gpu']!r}; it holds "
                    f"{sorted({str(t.key.get('gpu')) for t in tables})})")
    return None


SHIPPED_DIR = pathlib.Path(__file__).with_name("tables")
MATCH_KEYS = ("gpu", "world_size", "single_node")  # what a shipped table must share with this machine


def same_gpu(table_key: dict, key: dict | None) -> bool:
    """Whether a shipped table of *table_key* applies to the machine *key* (:data:`MATCH_KEYS`)."""
    return key is not None and all(table_key.get(k) == key.get(k) for k in MATCH_KEYS)


def shipped_tables() -> list[tuple[dict, Table]]:
    """Every shipped per-GPU table, ``(raw, table)``. Our own files: one that does not parse
    is a bug of the library, and raises."""
    return [(raw, dataclasses.replace(parse_table(raw, f"fusion_passes/backends/tables/{file.name}"), shipped=True))
            for file in sorted(SHIPPED_DIR.glob("*.json")) for raw in read_file(file)]


@functools.lru_cache(maxsize=None)
def shipped(key_json: str | None) -> Table | None:
    """The shipped per-GPU table for this machine key (:data:`SHIPPED_DIR`), or None."""
    if key_json is None:
        return None
    key = json.loads(key_json)
    table = next((t for _, t in shipped_tables() if same_gpu(t.key, key)), None)
    if table is not None:
        _BY_DIGEST[table.digest] = table
    return table


def combine(own: Table | None, ship: Table | None) -> Table | None:
    """This machine's table over the shipped one: its pairs replace the shipped table's."""
    if own is None or ship is None:
        return own or ship
    buckets = {**ship.buckets, **own.buckets}
    origin = {p: own if p in own.buckets else ship for p in buckets}
    digest = hashlib.sha256(f"{own.digest}+{ship.digest}".encode()).hexdigest()[:16]
    table = Table(own.source, own.key, buckets, digest, origin=origin)
    _BY_DIGEST[digest] = table
    return table


_LOCAL: dict[tuple, Table | None] = {}  # (env, world size, one host) -> the answer: a dict hit per call


def local(world_size: int, single_node: bool = True) -> Table | None:
    """The table that decides at *world_size*: this machine's from the file, over the
    shipped per-GPU table (:func:`combine`), or None (then thresholds.py decides). Read once
    per process (:func:`reset` forgets it); later calls cost a dict lookup."""
    memo = (os.environ.get(ENV), os.environ.get("XDG_CACHE_HOME"), world_size, single_node)
    if memo in _LOCAL:
        return _LOCAL[memo]
    file = path()
    key = machine_key(world_size, single_node)
    key_json = None if key is None else json.dumps(key, sort_keys=True)
    found = combine(_local(None if file is None else str(file), key_json), shipped(key_json))
    _LOCAL[memo] = found
    return found


def file_digest() -> str:
    """A hash of the measured-table file as it is now (``"none"`` without one): part of the
    pass's cache key."""
    file = path()
    try:
        return hashlib.sha256(file.read_bytes()).hexdigest()[:16] if file is not None else "none"
    except OSError:
        return "none"


def reset() -> None:
    """Forget what was read (after ``tune`` wrote the file, or in tests)."""
    _local.cache_clear()
    shipped.cache_clear()
    _LOCAL.clear()
    _BY_DIGEST.clear()
    _warned.clear()


def dump(tables: list[dict]) -> str:
    """The file's text holding *tables* (raw dicts), as :func:`read_file` reads it."""
    return json.dumps({"format": FORMAT, "version": VERSION, "tables": tables}, indent=1)


def write(table: dict, file: pathlib.Path | None = None) -> pathlib.Path:
    """Store *table* (``key``, ``entries``, ...) in the file, replacing the table of the same
    key and merging entries of other (variant, hidden, dtype) triples kept from it. Only ``tune``
    calls this. A file this library cannot read is replaced (the old one kept as ``.bad``)."""
    file = file or path()
    if file is None:
        raise ValueError(f"fusion_passes: ${ENV}=off: no measured table to write")
    parse_table(table, str(file))  # never write what could not be read back
    try:
        tables = read_file(file)
    except Invalid:
        file.replace(file.with_suffix(file.suffix + ".bad"))
        tables = []
    kept = [t for t in tables if t.get("key") != table["key"]]
    old = next((t for t in tables if t.get("key") == table["key"]), None)
    if old is not None:
        fresh = {(e["variant"], e["hidden"], e["dtype"]) for e in table["entries"]}
        table = {**table, "entries": [e for e in old["entries"]
                                      if (e.get("variant"), e.get("hidden"), e.get("dtype")) not in fresh]
                 + list(table["entries"])}
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(file.suffix + ".tmp")
    tmp.write_text(dump(kept + [table]))
    tmp.replace(file)
    reset()
    return file
