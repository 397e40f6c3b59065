"""``fusion-passes explain TARGET``: for every all-reduce, fused or not, and why.

TARGET is a graph dump (``*.json`` from ``fusion-passes dump``) or a callable spec as
``dump`` takes it. For a dump, the graph is rebuilt (as data, see
:func:`fusion_passes.graphio.to_fx`) and our pass runs on it; for a spec, the model is
compiled and the report of the real compile is used. Either way each all-reduce gets:
fused (the variant, the backend, the ops hoisting moved it across) or not fused (the
reason, the node that blocked it and the model source line that node came from).
``--json`` prints the :meth:`FusionReport.to_dict` shape, each site with extras
(``graph``, ``blocker``, ``blocker_op``, ``source``, ``code``).
"""

from __future__ import annotations

import json
import os
import sys

from fusion_passes.tools.cli import UsageError, use_colour

RED, GREEN, BOLD, RESET = "\033[31m", "\033[32m", "\033[1m", "\033[0m"


def add_arguments(parser) -> None:
    from fusion_passes.tools.dump import add_compile_arguments

    parser.add_argument("target", help="a graph dump (.json) or module:function / file.py:function")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    add_compile_arguments(parser)


def explain_graph(dump, hoist: bool = True, backend: str = "auto"):
    """Run the pass on a dump's graph: ``(report, pre-match dump, pre-fused sites)``.

    The pre-match dump is the graph as matching saw it (after hoisting), to look blockers
    up in. Fused ops already in the dump are returned as sites of their own.
    """
    from fusion_passes import FusionPass, graphio
    from fusion_passes.report import SiteReport

    graph = graphio.to_fx(dump)
    seen: list = []
    fusion = FusionPass(hoist=hoist, backend=backend)
    fusion.after_hoist = lambda g: seen.append(graphio.from_dict(graphio.graph_to_dict(g, stage="hoisted")))
    fusion(graph)
    pre = seen[0] if seen else dump
    already = [SiteReport(n.name, fused=True, variant=n.short_target.split(".")[1],
                          backend=_backend_arg(n), reason="already fused in this dump")
               for n in dump.nodes if n.target.startswith("torch.ops.fusion_passes.")]
    return fusion.report, pre, already


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


def explanations(target: str, args) -> list[dict]:
    """Every all-reduce of *target* (dump file or spec) as a dict (``--json`` site shape)."""
    from fusion_passes import graphio

    out: list[dict] = []
    if target.endswith(".json") or os.path.isfile(target):
        try:
            dump = graphio.load(target)
        except graphio.DumpError as e:
            raise UsageError(str(e)) from None
        report, pre, already = explain_graph(dump, args.hoist, args.backend)
        for s in already + report.sites:
            out.append({**s.to_dict(), "graph": dump.graph, **site_extras(s, pre)})
        return out
    if ":" not in target:
        raise UsageError(f"{target!r} is neither a file nor a module:function spec")
    from fusion_passes.tools.dump import record_spec

    for rec in record_spec(target, args):
        pre = graphio.from_dict(rec.docs.get("hoisted") or rec.docs["before"])
        for s in rec.report.sites:
            out.append({**s.to_dict(), "graph": rec.name, **site_extras(s, pre)})
        if rec.report.errors:
            out.append({"graph": rec.name, "errors": list(rec.report.errors)})
    return out


def render_text(sites: list[dict], colour: bool = False) -> str:
    """One block per all-reduce, then a summary line."""

    def c(code: str, text: str) -> str:
        return f"{code}{text}{RESET}" if colour else text

    lines: list[str] = []
    graph = None
    real = [s for s in sites if "all_reduce" in s]
    for s in sites:
        if s.get("graph") != graph:
            graph = s.get("graph")
            n = sum(1 for x in real if x["graph"] == graph)
            lines.append(c(BOLD, f"{graph}: {n} all-reduce{'s' if n != 1 else ''}"))
        if "errors" in s:
            lines += [f"  internal error (graph left unchanged): {err}" for err in s["errors"]]
            continue
        if s["fused"]:
            lines.append(f"  {s['all_reduce']}: {c(GREEN, 'fused')} as {s['variant']} (backend {s['backend']})")
            if s["hoisted_over"]:
                lines.append(f"      hoisted over: {', '.join(s['hoisted_over'])}")
            if s["reason"]:
                lines.append(f"      note: {s['reason']}")
        else:
            blocked = f" by {s['blocker']} ({s['blocker_op']})" if s["blocker"] and s["blocker_op"] else ""
            lines.append(f"  {s['all_reduce']}: {c(RED, 'NOT fused')}, blocked{blocked}")
            lines.append(f"      reason: {s['reason']}")
            if s["hoisted_over"]:
                lines.append(f"      hoisted over: {', '.join(s['hoisted_over'])}")
        if s["source"]:
            lines.append(f"      source: {s['source']}")
            if s["code"]:
                lines.append(f"              {s['code']}")
    fused = sum(1 for s in real if s["fused"])
    lines.append(f"{fused}/{len(real)} all-reduces fused")
    return "\n".join(lines)


def run(args) -> int:
    sites = explanations(args.target, args)
    if args.json:
        errors = [e for s in sites if "errors" in s for e in s["errors"]]
        print(json.dumps({"sites": [s for s in sites if "all_reduce" in s], "errors": errors}, indent=2))
    else:
        print(render_text(sites, use_colour(sys.stdout)))
    return 0
