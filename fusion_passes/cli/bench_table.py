"""The selector's crossover table, derived from ``bench kernels`` JSON files.

``fusion-passes bench kernels --derive-table results/a.json [results/b.json ...]``
prints the ``max_tokens_faster`` entry of ``fusion_passes/backends/thresholds.py`` in its
per-hidden form::

    (world_size, variant): {hidden: ((lo, hi), ...), ..., None: ((lo, hi), ...)}

A range is inclusive; ``hi = None`` means no upper end. Rules, per (world size, variant,
hidden), over the measured token counts in increasing order:

* a point is a win when the fused call beat the best unfused baseline in BOTH of its
  timings (``speedup_worst > 1 + margin``);
* consecutive wins form one range from the first to the last winning count (token counts
  between two winning points are admitted); a loss ends it, so counts between a win and
  the next loss are declined, and counts below the smallest measured one are declined;
* a range that reaches the largest measured count stays open (``hi = None``);
* the ``None`` key (any hidden size not measured) is the intersection of the measured
  hidden sizes' ranges: a token count is admitted only where every measured size won.
"""

from __future__ import annotations

import json
import pathlib

Range = tuple[int, "int | None"]


def win_ranges(points: list[tuple[int, bool]]) -> tuple[Range, ...]:
    """Ranges from ``(tokens, won)`` points (any order; one point per token count)."""
    points = sorted(points)
    counts = [t for t, _ in points]
    if len(set(counts)) != len(counts):
        raise ValueError(f"token counts measured twice (two files of one world size, variant and hidden "
                         f"size?): {counts}")
    out: list[list] = []
    prev_won = False
    for tokens, won in points:
        if won and prev_won:
            out[-1][1] = tokens
        elif won:
            out.append([tokens, tokens])
        prev_won = won
    if out and points and points[-1][1]:
        out[-1][1] = None
    return tuple((lo, hi) for lo, hi in out)


def intersect(a: tuple[Range, ...], b: tuple[Range, ...]) -> tuple[Range, ...]:
    """Token counts in both range sets."""
    out = []
    for lo1, hi1 in a:
        for lo2, hi2 in b:
            lo = max(lo1, lo2)
            hi = hi2 if hi1 is None else hi1 if hi2 is None else min(hi1, hi2)
            if hi is None or lo <= hi:
                out.append((lo, hi))
    return tuple(sorted(out))


def derive(results: list[dict], margin: float = 0.0) -> dict:
    """``{(world_size, variant): {hidden: ranges, None: ranges}}`` from bench JSON dicts."""
    points: dict[tuple[int, str, int], list[tuple[int, bool]]] = {}
    for res in results:
        ws = int(res["world_size"])
        for row in res["rows"]:
            key = (ws, row["variant"], int(row["hidden"]))
            points.setdefault(key, []).append((int(row["tokens"]), row["speedup_worst"] > 1.0 + margin))
    table: dict[tuple[int, str], dict] = {}
    for (ws, variant, hidden), pts in sorted(points.items()):
        table.setdefault((ws, variant), {})[hidden] = win_ranges(pts)
    for entry in table.values():
        sizes = list(entry.values())
        common = sizes[0]
        for r in sizes[1:]:
            common = intersect(common, r)
        entry[None] = common
    return table


def load(paths: list[str]) -> list[dict]:
    """Read bench JSON files; a clear error for anything that is not one."""
    out = []
    for p in paths:
        path = pathlib.Path(p)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{p}: not a readable JSON file ({e})") from None
        rows = data.get("rows") if isinstance(data, dict) else None
        need = ("variant", "hidden", "tokens", "speedup_worst")
        if "world_size" not in data or not isinstance(rows, list) or not rows or any(
                not isinstance(r, dict) or any(k not in r for k in need) for r in rows):
            raise ValueError(f"{p}: not a `fusion-passes bench kernels` result with speedup_worst per row "
                             "(files written before the best-of baselines cannot be used)")
        out.append({**data, "_path": p})
    return out


def _ranges_text(ranges: tuple[Range, ...]) -> str:
    if not ranges:
        return "()"
    return "(" + ", ".join(f"({lo}, {hi})" for lo, hi in ranges) + ("," if len(ranges) == 1 else "") + ")"


def _source_lines(results: list[dict], margin: float) -> list[str]:
    lines = [f"# Derived by `fusion-passes bench kernels --derive-table {' '.join(r['_path'] for r in results)}`"
             + (f" --margin {margin:g}" if margin else "") + ":"]
    for r in results:
        m, v = r.get("machine", {}), r.get("versions", {})
        lines.append(f"#   {r['_path']}: {r['world_size']}x {m.get('gpu', '?')} (host {m.get('host', '?')}), torch "
                     f"{v.get('torch', r.get('torch', '?'))}, triton {v.get('triton', r.get('triton', '?'))}; "
                     f"`{r.get('command', '?')}`")
    lines.append("# A range is where the fused call beat the best unfused chain (best of the baselines in "
                 "the file) in both of its timings; None = any hidden size not listed (the intersection).")
    return lines


def render(table: dict, results: list[dict], margin: float = 0.0) -> str:
    """The dict as Python source, with comments naming its source files and runs."""
    lines = _source_lines(results, margin) + ['"max_tokens_faster": {']
    for (ws, variant), entry in sorted(table.items()):
        lines.append(f"    ({ws}, {variant!r}): {{")
        for hidden in sorted(h for h in entry if h is not None):
            lines.append(f"        {hidden}: {_ranges_text(entry[hidden])},")
        lines.append(f"        None: {_ranges_text(entry[None])},")
        lines.append("    },")
    lines.append("},")
    return "\n".join(lines)
