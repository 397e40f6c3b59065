"""``fusion-passes tune --show``: the measured table and where each entry came from.

With an NVIDIA GPU it marks the table this process would use (this GPU and versions,
world size 1, or ``$WORLD_SIZE``); without one it lists every table of the file. Pairs
the file does not hold are decided by the shipped table
(``fusion_passes/backends/thresholds.py``).
"""

from __future__ import annotations

import pathlib


def render(out: str | None = None) -> str:
    """This machine's file (or *out*), then the shipped per-GPU tables."""
    from fusion_passes.cli.arguments import world_size_from_env

    from fusion_passes.backends import measured

    here = measured.machine_key(world_size_from_env())
    lines = _file_lines(pathlib.Path(out) if out else measured.path(), here)
    shipped = measured.shipped_tables()
    if shipped:
        lines.append(f"shipped per-GPU tables ({', '.join(sorted({t.source for _, t in shipped}))}),"
                     " used for the pairs this machine's file does not hold:")
        for raw, table in shipped:
            k = table.key
            if measured.same_gpu(k, here):
                lines += _table_lines(raw, table, used=True)
            else:  # another GPU's: one line
                pairs = sorted(table.buckets)
                lines.append(f"- {k.get('gpu')}, world size {k.get('world_size')}: "
                             f"{sum(len(v) for v in table.buckets.values())} buckets of "
                             f"{', '.join(sorted({v for v, _, _ in pairs}))} at hidden "
                             f"{' '.join(str(h) for h in sorted({h for _, h, _ in pairs}))} in "
                             f"{' '.join(sorted({d for _, _, d in pairs}))} (not this machine)")
    lines.append("every (world size, variant, hidden, dtype) not listed: the shipped table "
                 "(fusion_passes/backends/thresholds.py)")
    return "\n".join(lines)


def _file_lines(file: pathlib.Path | None, here: dict | None) -> list[str]:
    from fusion_passes.backends import measured

    if file is None:
        return [f"${measured.ENV}=off: no measured table of this machine"]
    try:
        raws = measured.read_file(file)
        tables = [(raw, measured.parse_table(raw, str(file))) for raw in raws]
    except measured.Invalid as e:
        return [f"{file}: unreadable ({e}); not used"]
    if not tables:
        return [f"{file}: no measured table (run `fusion-passes tune`)"]
    lines = [f"measured tables in {file}:"]
    for raw, table in tables:
        lines += _table_lines(raw, table, used=here is not None and table.key == here)
    return lines


def _table_lines(raw: dict, table, used: bool) -> list[str]:
    """One table's key, source and entries; ``[used here]`` where this machine reads it."""
    k = table.key
    lines = [f"- {k.get('gpu')}, world size {k.get('world_size')}, torch {k.get('torch')}, triton {k.get('triton')}, "
             f"driver {k.get('driver')}{' [used here]' if used else ''}",
             f"  from `{raw.get('command', '?')}` at {raw.get('written', '?')} (digest {table.digest})",
             "  variant                    hidden  dtype     tokens  pick     path     warps  fused us  unfused us  "
             "best unfused"]
    for (variant, hidden, dtype), entries in sorted(table.buckets.items()):
        for e in entries:
            lines.append(f"  {variant:26s} {hidden:6d}  {dtype:8s} {e.tokens:7d}  {e.pick:7s}  {e.path:7s}  "
                         f"{e.num_warps or '-':>5}  {_num(e.fused_us):>8}  {_num(e.unfused_us):>10}  {e.best_unfused or '-'}{_launch(e)}")
    return lines


def launch_options(rows=None, num_stages=None, chunk=None, tile=None, evict=None) -> list[str]:
    """A launch's options beyond warps, where they are not the defaults, in words: ``2 rows``
    (one after another), ``stages 1``, ``pieces of 2048``, ``2 rows at once``, ``evict_first``
    (``tune``'s lines, ``tune --show``, tests/gpu/parity_check.py)."""
    return (([f"{rows} rows"] if rows and rows > 1 else []) + ([f"stages {num_stages}"] if num_stages else [])
            + ([f"pieces of {chunk}"] if chunk else []) + ([f"{tile} rows at once"] if tile and tile > 1 else [])
            + (["evict_first"] if evict else []))


def _launch(e) -> str:
    """The entry's launch options beyond warps (:func:`launch_options`), in brackets."""
    parts = launch_options(e.rows, e.num_stages, e.chunk, e.tile, e.evict)
    return f"  ({', '.join(parts)})" if parts else ""


def _num(v) -> str:
    return "-" if v is None else f"{v:.2f}"
