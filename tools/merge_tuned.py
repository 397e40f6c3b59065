"""Merge tables written by ``fusion-passes tune`` on one GPU kind into one SHIPPED table.

    python -m tools.merge_tuned RUN1.json RUN2.json [...] --out fusion_passes/backends/tables/NAME.json

Every input must hold exactly one table, all of one GPU name and world size, timed in one
``tune --context``, and the same
(variant, hidden, dtype, tokens) buckets (a version-1 run's entries read as bfloat16). A bucket
picks ``fused`` only where EVERY run picked it (the fused call at its tuned config beat the
best unfused epilogue in each), with the launch config and times of the run whose fused call
was fastest there; elsewhere ``unfused``, with the times of the run where the unfused chain was
fastest. One run's pick of a bucket flips between runs where the two sides are within about 3%
(results/README.md, "Issue 22 closed on the GPU, and the tuned table read back"), so a fused
pick that holds in every run is the one shipped. The output's key carries the GPU name, world
size and one host, and the versions of the first run; its ``command`` names this merge and its
``sources`` the input files.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from fusion_passes.backends import measured


def merge(runs: list[tuple[str, dict]]) -> dict:
    """The merged table of *runs* (``(source name, raw table)``); ValueError when they disagree
    on the GPU, the world size or the buckets."""
    keys = {(t["key"].get("gpu"), t["key"].get("world_size"), t["key"].get("single_node")) for _, t in runs}
    if len(keys) != 1:
        raise ValueError(f"the runs are of different machines: {sorted(map(str, keys))}")
    contexts = {t.get("context", "alone") for _, t in runs}  # a table before --context timed alone
    if len(contexts) != 1:
        raise ValueError(f"the runs timed their options in different contexts (tune --context): {sorted(contexts)}")
    by_run = [{(e["variant"], e["hidden"], e["dtype"], e["tokens"]): e for e in t["entries"]} for _, t in runs]
    buckets = set(by_run[0])
    if any(set(b) != buckets for b in by_run[1:]):
        raise ValueError("the runs measured different (variant, hidden, dtype, tokens) buckets")
    entries = []
    for bucket in sorted(buckets):
        seen = [b[bucket] for b in by_run]
        if all(e["pick"] == "fused" for e in seen):
            entries.append(dict(min(seen, key=lambda e: e["fused_us"])))
        else:
            best = dict(min(seen, key=lambda e: e["unfused_us"]))
            entries.append({**best, "pick": "unfused"})
    first = runs[0][1]
    written = max((str(t.get("written")) for _, t in runs if t.get("written")), default=None)
    return {"key": dict(first["key"]), "command": "python -m tools.merge_tuned " + " ".join(n for n, _ in runs),
            **({"written": written} if written else {}),  # the last run's: when it was measured
            "sources": [{"file": n, "command": t.get("command"), "written": t.get("written")} for n, t in runs],
            **({} if contexts == {"alone"} else {"context": contexts.pop()}), "entries": entries}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.merge_tuned", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="files written by `fusion-passes tune` (one table each)")
    ap.add_argument("--out", required=True, help="the merged file")
    args = ap.parse_args(argv)
    runs = []
    for name in args.runs:
        tables = measured.read_file(pathlib.Path(name))
        if len(tables) != 1:
            print(f"{name}: holds {len(tables)} tables, expected one", file=sys.stderr)
            return 2
        measured.parse_table(tables[0], name)  # checked as the library reads it
        runs.append((name, tables[0]))
    merged = merge(runs)
    measured.parse_table(merged, args.out)
    pathlib.Path(args.out).write_text(measured.dump([merged]) + "\n")  # replaced whole: a shipped file is one run set
    fused = sum(e["pick"] == "fused" for e in merged["entries"])
    print(f"wrote {args.out}: {len(merged['entries'])} buckets, {fused} fused")
    return 0


if __name__ == "__main__":
    sys.exit(main())
