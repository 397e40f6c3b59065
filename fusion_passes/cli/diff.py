"""``fusion-passes diff A B``: a structural diff of two graph dumps (see :mod:`.graph_align`).

Prints which chains became which fused ops, collectives and an estimate of the kernels
launched before and after, nodes added and removed, and how many stayed as they were.
``--json`` for scripts, ``--html FILE`` for a self-contained page (:mod:`.html_diff`),
checked before the dumps are read and written only when complete. Text read from the
dumps is escaped (:func:`fusion_passes.cli.terminal.printable`).
"""

from __future__ import annotations

import contextlib
import gc
import json
import sys

from fusion_passes.cli.arguments import path_argument
from fusion_passes.cli import UsageError
from fusion_passes.cli.terminal import printable_data, use_colour

RED, GREEN, GREY, BOLD, RESET = "\033[31m", "\033[32m", "\033[90m", "\033[1m", "\033[0m"


def add_arguments(parser) -> None:
    """The command's options."""
    parser.add_argument("a", help="graph dump before (e.g. graph_0.before.json)")
    parser.add_argument("b", help="graph dump after (e.g. graph_0.fused.json)")
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print JSON for scripts")
    out.add_argument("--html", metavar="FILE", type=path_argument, help="write a self-contained HTML page to FILE")


def load_pair(path_a: str, path_b: str):
    """Both dumps, validated, and refused when they are not the same graph of one model."""
    from fusion_passes.cli import graphio

    try:
        a, b = graphio.load(path_a), graphio.load(path_b)
    except graphio.DumpError as e:
        raise UsageError(str(e)) from None
    if a.model != b.model and a.model is not None and b.model is not None:
        raise UsageError(f"graphs of different models: {path_a} is {a.model!r}, {path_b} is {b.model!r}")
    if a.signature() != b.signature():
        raise UsageError(f"graphs of different models: the graph inputs of {path_a} ({a.graph}) and "
                         f"{path_b} ({b.graph}) differ; our passes never change a graph's inputs")
    return a, b


def to_dict(al) -> dict:
    """The diff as JSON-ready data (the ``--json`` shape)."""
    na, nb = al.a.by_name(), al.b.by_name()
    return {
        "model": al.a.model, "graph": al.a.graph,
        "a": {"path": al.a.path, "stage": al.a.stage, "nodes": len(al.a.nodes), **al.counts_a.to_dict()},
        "b": {"path": al.b.path, "stage": al.b.stage, "nodes": len(al.b.nodes), **al.counts_b.to_dict()},
        "sites": [{
            "fused_op": s.fused_op,
            "fused_target": nb[s.fused_op].short_target if s.fused_op else None,
            "collective": s.collective,
            "removed": [{"name": n, "target": na[n].short_target} for n in s.removed],
            "added": [{"name": n, "target": nb[n].short_target} for n in s.added],
        } for s in al.sites],
        "removed": [{"name": n, "target": na[n].short_target} for n in al.other_removed()],
        "added": [{"name": n, "target": nb[n].short_target} for n in al.other_added()],
        "rewired": [{"name": n, "target": nb[n].short_target} for n in al.rewired],
        "unchanged": al.unchanged,
    }


def render_text(d: dict, colour: bool = False) -> str:
    """The plain-text diff (colour: removed red, added green, unchanged grey); text from the
    dumps is escaped."""

    def c(code: str, text: str) -> str:
        return f"{code}{text}{RESET}" if colour else text

    d = printable_data(d)
    a, b = d["a"], d["b"]
    lines = [c(BOLD, f"{d['graph']} of {d['model'] or '(unnamed model)'}: {a['stage']} -> {b['stage']}"),
             f"  A {a['path']} ({a['nodes']} nodes)", f"  B {b['path']} ({b['nodes']} nodes)", ""]
    rows = [("", "A", "B"), ("collectives", a["collectives"], b["collectives"]),
            ("fused ops", a["fused_ops"], b["fused_ops"]),
            ("kernels (estimate)", a["kernels_estimate"], b["kernels_estimate"]),
            ("compute ops", a["compute_ops"], b["compute_ops"])]
    for name, x, y in rows:
        lines.append(f"  {name:<20}{x!s:>6}{y!s:>6}")
    fused = [s for s in d["sites"] if s["fused_op"]]
    other = [s for s in d["sites"] if not s["fused_op"]]
    lines += ["", c(BOLD, f"fused sites ({len(fused)}):")]
    for i, s in enumerate(fused, 1):
        removed = ", ".join(r["name"] for r in s["removed"])
        lines.append(f"  [{i}] {c(GREEN, s['fused_op'])} = {s['fused_target']}")
        lines.append(f"      replaces {len(s['removed'])} nodes: {c(RED, removed or '-')}")
        extra = [x["name"] for x in s["added"] if x["name"] != s["fused_op"]]
        if extra:
            lines.append(f"      with {c(GREEN, ', '.join(extra))}")
    if other:
        lines += ["", c(BOLD, f"collectives removed without a fused op ({len(other)}):")]
        for s in other:
            lines.append(f"  {c(RED, s['collective'])}: {', '.join(r['name'] for r in s['removed'])}")
    for title, key, code in (("other nodes removed", "removed", RED), ("other nodes added", "added", GREEN),
                             ("rewired (same op, new inputs)", "rewired", None)):
        if d[key]:
            names = ", ".join(f"{x['name']} ({x['target']})" for x in d[key])
            lines += ["", c(BOLD, f"{title} ({len(d[key])}):"), "  " + (c(code, names) if code else names)]
    lines += ["", c(GREY, f"unchanged: {d['unchanged']} nodes")]
    return "\n".join(lines)


def run(args) -> int:
    """Check the page's path, read both dumps, align them, print or write the diff."""
    from fusion_passes.cli.graph_align import align
    from fusion_passes.cli.outputs import OutputFile

    with OutputFile(args.html, "--html") if args.html else _no_output() as page, _no_cycle_collection():
        a, b = load_pair(args.a, args.b)
        al = align(a, b)
        d = to_dict(al)
        if args.json:
            print(json.dumps(d, indent=2))
        elif page is not None:
            from fusion_passes.cli.html_diff import render_html

            page.commit(render_html(al, d))
            n = len([s for s in d["sites"] if s["fused_op"]])
            print(f"wrote {args.html}: {n} fused site{'s' if n != 1 else ''}")
        else:
            print(render_text(d, use_colour(sys.stdout)))
    return 0


@contextlib.contextmanager
def _no_cycle_collection():
    """The cyclic garbage collector off while the dumps are read and aligned: they are
    trees of JSON values and records (reference counting frees them), and at 40,000 nodes
    its passes over millions of live objects took half the diff's time (4,400-site graph:
    21 s with it, 11 s without, `fusion-passes diff` on 2 loaded CPU cores)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextlib.contextmanager
def _no_output():
    yield None
