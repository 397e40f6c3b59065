"""``fusion-passes tune --show``: the measured table and where each entry came from.

With an NVIDIA GPU it marks the table this process would use (this GPU and versions,
world size 1, or ``$WORLD_SIZE``); without one it lists every table of the file. Pairs
the file does not hold are decided by the shipped table
(``fusion_passes/backends/thresholds.py``).
"""

from __future__ import annotations

import pathlib


def render(out: str | None = None) -> str:
    from fusion_passes.backends import measured
    from fusion_passes.cli.arguments import world_size_from_env

    file = pathlib.Path(out) if out else measured.path()
    if file is None:
        return f"${measured.ENV}=off: no measured table; the shipped table decides everywhere"
    try:
        raws = measured.read_file(file)
        tables = [(raw, measured.parse_table(raw, str(file))) for raw in raws]
    except measured.Invalid as e:
        return f"{file}: unreadable ({e}); the shipped table decides everywhere"
    if not tables:
        return f"{file}: no measured table (run `fusion-passes tune`); the shipped table decides everywhere"
    here = measured.machine_key(world_size_from_env())
    lines = [f"measured tables in {file}:"]
    for raw, table in tables:
        lines += _table_lines(raw, table, here)
    lines.append("every (world size, variant, hidden) not listed: the shipped table "
                 "(fusion_passes/backends/thresholds.py)")
    return "\n".join(lines)


def _table_lines(raw: dict, table, here: dict | None) -> list[str]:
    k = table.key
    used = " [used here]" if here is not None and k == here else ""
    lines = [f"- {k.get('gpu')}, world size {k.get('world_size')}, torch {k.get('torch')}, triton {k.get('triton')}, "
             f"driver {k.get('driver')}{used}",
             f"  from `{raw.get('command', '?')}` at {raw.get('written', '?')} (digest {table.digest})",
             "  variant                    hidden  tokens  pick     path     warps  fused us  unfused us  best unfused"]
    for (variant, hidden), entries in sorted(table.buckets.items()):
        for e in entries:
            lines.append(f"  {variant:26s} {hidden:6d} {e.tokens:7d}  {e.pick:7s}  {e.path:7s}  {e.num_warps or '-':>5}  "
                         f"{_num(e.fused_us):>8}  {_num(e.unfused_us):>10}  {e.best_unfused or '-'}{_launch(e)}")
    return lines


def _launch(e) -> str:
    """The entry's launch options beyond warps, where they are not the defaults."""
    parts = ([f"{e.rows} rows"] if e.rows and e.rows > 1 else []) + \
        ([f"stages {e.num_stages}"] if e.num_stages else []) + (["evict_first"] if e.evict else [])
    return f"  ({', '.join(parts)})" if parts else ""


def _num(v) -> str:
    return "-" if v is None else f"{v:.2f}"
