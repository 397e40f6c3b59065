"""``fusion-passes patterns``: the catalogue, one row per family (text or ``--json``)."""

from __future__ import annotations

import json


def add_arguments(parser) -> None:
    """The command's options."""
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def rows() -> list[dict]:
    """One dict per catalogue family: what it matches, becomes, where, which backends run it."""
    from fusion_passes import backends
    from fusion_passes.patterns import CATALOGUE

    out = []
    for f in CATALOGUE:
        able = []
        for name in backends.ORDER:
            try:
                if f.variant in backends.get(name).variants:
                    able.append(name)
            except Exception:  # noqa: BLE001 - a backend whose library is missing still lists
                able.append(f"{name} (unavailable here)")
        out.append({"family": f.name, "matches": f.matches, "becomes": f"{f.becomes} [{f.variant}]",
                    "where": f.where, "backends": able})
    return out


def run(args) -> int:
    """Print the catalogue."""
    table = rows()
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    for r in table:
        print(f"{r['family']}\n  matches:  {r['matches']}\n  becomes:  {r['becomes']}\n"
              f"  where:    {r['where']}\n  backends: {', '.join(r['backends'])}")
    return 0
