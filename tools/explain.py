"""``fusion-passes explain TARGET``: for every all-reduce, fused or not, and why.

TARGET is a graph dump (``*.json`` from ``fusion-passes dump``) or a SPEC as ``dump``
takes it. For a dump, the graph is rebuilt (as data, see
:func:`fusion_passes.tools.graphio.to_fx`) and our pass runs on it; for a spec, the model
is compiled and the report of the real compile is used. Either way each all-reduce gets:
fused (the variant, the backend, the ops hoisting moved it across) or not fused (the
reason, the node that blocked it and the model source line that node came from).
``--json`` prints the :meth:`FusionReport.to_dict` shape, each site with extras
(``graph``, ``blocker``, ``blocker_op``, ``source``, ``code``).

If the pass hit an internal error (it then leaves the graph unchanged), every all-reduce
is listed as not fused, the error is printed (``"errors"`` in JSON), and the exit status
is 1.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

from fusion_passes.tools.cli import UsageError
from fusion_passes.tools.terminal import printable_data, use_colour

RED, GREEN, BOLD, RESET = "\033[31m", "\033[32m", "\033[1m", "\033[0m"


def add_arguments(parser) -> None:
    """The command's options."""
    from fusion_passes.tools.dump import add_compile_arguments

    parser.add_argument("target", help="a graph dump (.json) or module:function / file.py:function")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    add_compile_arguments(parser)


@dataclasses.dataclass
class GraphExplanation:
    """One graph: every all-reduce as a ``--json`` site dict, and the pass's internal errors."""

    graph: str
    sites: list[dict]
    errors: list[str]


def _all_reduces(graph) -> list[str]:
    from fusion_passes.recognize import all_reduce

    return [n.name for n in graph.nodes if all_reduce(n) is not None]


def _complete(report, all_reduces: list[str]):
    """After an internal error the report may list only the sites reached before it: add
    the others, not fused, so every all-reduce of the graph is accounted for."""
    from fusion_passes.report import SiteReport

    if report.errors:
        listed = {s.all_reduce for s in report.sites}
        report.sites += [SiteReport(n, reason="pass failed: graph unchanged") for n in all_reduces if n not in listed]
    return report


def explain_graph(dump, hoist: bool = True, backend: str = "auto"):
    """Run the pass on a dump's graph: ``(report, pre-match dump, pre-fused sites)``.

    The pre-match dump is the graph as matching saw it (after hoisting), to look blockers
    up in. Fused ops already in the dump are returned as sites of their own.
    """
    from fusion_passes import FusionPass
    from fusion_passes.report import SiteReport
    from fusion_passes.tools import graphio

    graph = graphio.to_fx(dump)
    all_reduces = _all_reduces(graph)
    seen: list = []
    fusion = FusionPass(hoist=hoist, backend=backend)
    fusion.after_hoist = lambda g: seen.append(graphio.from_dict(graphio.graph_to_dict(g, stage="hoisted")))
    fusion(graph)
    pre = seen[0] if seen and not fusion.report.errors else dump
    already = [SiteReport(n.name, fused=True, variant=n.short_target.split(".")[1],
                          backend=_backend_arg(n), reason="already fused in this dump")
               for n in dump.nodes if n.target.startswith("torch.ops.fusion_passes.")]
    return _complete(fusion.report, all_reduces), pre, already


def _backend_arg(n) -> str | None:
    args = n.args
    return args[7] if len(args) > 7 and isinstance(args[7], str) else n.kwargs.get("backend", "auto")


def site_extras(site, pre) -> dict:
    """Blocker node (the pass names the op that stopped the site), its op and source."""
    nodes = pre.by_name() if pre is not None else {}
    name = site.blocker
    rec = nodes.get(name) if name else None
    where = rec if rec is not None and rec.source else nodes.get(site.all_reduce)
    return {
        "blocker": None if site.fused else name,
        "blocker_op": rec.short_target if rec is not None and not site.fused else None,
        "source": where.source if where is not None and where.source else site.source,
        "code": where.code if where is not None else None,
    }


def _explain_dump(path: str, args) -> list[GraphExplanation]:
    from fusion_passes.tools import graphio

    try:
        dump = graphio.load(path)
    except graphio.DumpError as e:
        raise UsageError(str(e)) from None
    report, pre, already = explain_graph(dump, args.hoist, args.backend)
    sites = [{**s.to_dict(), "graph": dump.graph, **site_extras(s, pre)} for s in already + report.sites]
    return [GraphExplanation(dump.graph, sites, list(report.errors))]


def _explain_spec(spec: str, args) -> list[GraphExplanation]:
    from fusion_passes.tools import graphio
    from fusion_passes.tools.recorder import record_spec

    out = []
    for rec in record_spec(spec, args):
        pre = graphio.from_dict(rec.docs.get("hoisted") or rec.docs["before"])
        report = rec.report
        if report.errors:  # the recorded graph is the restored one: count its all-reduces
            report = _complete(report, _all_reduces(graphio.to_fx(graphio.from_dict(rec.docs["before"]))))
        sites = [{**s.to_dict(), "graph": rec.name, **site_extras(s, pre)} for s in report.sites]
        out.append(GraphExplanation(rec.name, sites, list(report.errors)))
    return out


def explanations(target: str, args) -> list[GraphExplanation]:
    """Every graph of *target* (a dump file or a spec), explained."""
    if target.endswith(".json") or os.path.isfile(target):
        return _explain_dump(target, args)
    if ":" not in target:
        raise UsageError(f"{target!r} is neither a file nor a module:function spec")
    return _explain_spec(target, args)


def _site_lines(s: dict, c) -> list[str]:
    if s["fused"]:
        table = f", {s['table']}" if s.get("table") else ""
        lines = [f"  {s['all_reduce']}: {c(GREEN, 'fused')} as {s['variant']} (backend {s['backend']}{table})"]
        if s["hoisted_over"]:
            lines.append(f"      hoisted over: {', '.join(s['hoisted_over'])}")
        if s["reason"]:
            lines.append(f"      note: {s['reason']}")
    else:
        blocked = f" by {s['blocker']} ({s['blocker_op']})" if s["blocker"] and s["blocker_op"] else ""
        lines = [f"  {s['all_reduce']}: {c(RED, 'NOT fused')}, blocked{blocked}", f"      reason: {s['reason']}"]
        if s["hoisted_over"]:
            lines.append(f"      hoisted over: {', '.join(s['hoisted_over'])}")
    if s.get("token_range"):
        lo, hi = s["token_range"]
        lines.append(f"      compile range: {lo}-{'' if hi is None else hi} tokens")
    if s["source"]:
        lines.append(f"      source: {s['source']}")
        if s["code"]:
            lines.append(f"              {s['code']}")
    return lines


def render_text(graphs: list[GraphExplanation], colour: bool = False) -> str:
    """One block per all-reduce, then a summary line. Text from the dump is escaped."""

    def c(code: str, text: str) -> str:
        return f"{code}{text}{RESET}" if colour else text

    lines: list[str] = []
    for g in graphs:
        sites, errors = printable_data(g.sites), printable_data(g.errors)
        n = len(sites)
        lines.append(c(BOLD, f"{printable_data(g.graph)}: {n} all-reduce{'s' if n != 1 else ''}"))
        lines += [c(RED, f"  internal error (graph left unchanged): {err}") for err in errors]
        for s in sites:
            lines += _site_lines(s, c)
    every = [s for g in graphs for s in g.sites]
    fused = sum(1 for s in every if s["fused"])
    failed = sum(len(g.errors) for g in graphs)
    lines.append(f"{fused}/{len(every)} all-reduces fused" + (f"; the pass FAILED on {failed} graph(s)" if failed else ""))
    if fused < len(every) and not failed:
        lines.append(SPELLING_HINT)
    return "\n".join(lines)


SPELLING_HINT = ("how a chain is recognized, and what to do when yours is not: docs/spellings.md in the "
                 "fusion-passes repository")
"""Printed under the summary when a site did not fuse."""


def run(args) -> int:
    """Explain every all-reduce; 1 if the pass reported an internal error."""
    graphs = explanations(args.target, args)
    if args.json:
        print(json.dumps({"sites": [s for g in graphs for s in g.sites], "errors": [e for g in graphs for e in g.errors]},
                         indent=2))
    else:
        print(render_text(graphs, use_colour(sys.stdout)))
    return 1 if any(g.errors for g in graphs) else 0
