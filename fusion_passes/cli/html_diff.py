"""The ``fusion-passes diff --html`` page: one self-contained file (inline CSS, no script,
no external resource), both graphs side by side: removed nodes red, added green,
rewired amber, unchanged grey; every fused site lists and links to its nodes. Text from
the dumps is HTML-escaped, and its control characters are shown escaped
(:func:`fusion_passes.cli.terminal.printable`), as in the text diff."""

from __future__ import annotations

import html

from fusion_passes.cli.graphio import NodeRecord
from fusion_passes.cli.terminal import printable

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; } h2 { font-size: 1.1em; margin-top: 1.4em; }
table.counts { border-collapse: collapse; } table.counts td, table.counts th { padding: 2px 12px; text-align: right; }
table.counts th:first-child, table.counts td:first-child { text-align: left; }
.legend span { padding: 1px 6px; margin-right: 8px; border-radius: 3px; }
ol.sites li { margin: 0.4em 0; }
.cols { display: flex; gap: 1.5em; align-items: flex-start; }
.cols section { flex: 1; min-width: 0; }
.graph { font: 12px/1.5 ui-monospace, monospace; border: 1px solid #ddd; padding: 6px; overflow-x: auto; }
.node { white-space: pre-wrap; overflow-wrap: anywhere; padding: 0 4px; border-radius: 2px; }
.removed { background: #fde2e2; color: #a40000; }
.added { background: #dcf5dc; color: #056005; }
.rewired { background: #fff1c9; color: #7a5200; }
.unchanged { color: #999; }
.node:target { outline: 2px solid #3367d6; }
a.n { text-decoration: none; font-family: ui-monospace, monospace; }
a.n.removed, a.n.added { padding: 0 3px; border-radius: 2px; }
.tag { font-size: 11px; color: #3367d6; margin-left: 6px; }
"""


def _arg(v) -> str:
    if isinstance(v, list):
        return "[" + ", ".join(_arg(x) for x in v) + "]"
    if isinstance(v, dict):
        if set(v) == {"node"}:
            return v["node"]
        if set(v) == {"tuple"}:
            return "(" + ", ".join(_arg(x) for x in v["tuple"]) + ")"
        if len(v) == 1:
            tag, inner = next(iter(v.items()))
            return str(inner) if tag != "op" else str(inner).removeprefix("torch.ops.")
        return "{" + ", ".join(f"{k}: {_arg(x)}" for k, x in v.items()) + "}"
    return repr(v)


def node_line(n: NodeRecord) -> str:
    """``add = aten.add.Tensor(wait_tensor, res_1)``: one node, as people read graphs."""
    if n.op == "placeholder":
        return f"{n.name} = input"
    args = [_arg(a) for a in n.args] + [f"{k}={_arg(v)}" for k, v in n.kwargs.items()]
    if n.op == "output":
        return f"return {', '.join(args)}"
    return f"{n.name} = {n.short_target}({', '.join(args)})"


def _e(text) -> str:
    return html.escape(printable(str(text)))


def _link(side: str, name: str, cls: str) -> str:
    return f'<a class="n {cls}" href="#{side}-{_e(name)}">{_e(name)}</a>'


def _head(d: dict) -> list[str]:
    out = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>fusion-passes diff: {_e(d['graph'])}</title><style>{CSS}</style></head><body>",
        f"<h1>fusion-passes diff: {_e(d['graph'])} of <code>{_e(d['model'] or '(unnamed model)')}</code>, "
        f"{_e(d['a']['stage'])} &rarr; {_e(d['b']['stage'])}</h1>",
        '<p class="legend"><span class="removed">removed</span><span class="added">added</span>'
        '<span class="rewired">rewired (same op, new inputs)</span><span class="unchanged">unchanged</span></p>',
        '<table class="counts"><tr><th></th><th>A</th><th>B</th></tr>',
    ]
    for label, key in (("collectives", "collectives"), ("fused ops", "fused_ops"),
                       ("kernels (estimate)", "kernels_estimate"), ("compute ops", "compute_ops"), ("nodes", "nodes")):
        out.append(f"<tr><td>{label}</td><td>{d['a'][key]}</td><td>{d['b'][key]}</td></tr>")
    out.append("</table>")
    return out


def _sites(al, fused: list) -> list[str]:
    out = [f'<h2 id="sites">Fused sites ({len(fused)})</h2><ol class="sites">']
    nb = al.b.by_name()
    for i, s in enumerate(fused, 1):
        out.append(
            f'<li class="site" id="site-{i}" data-fused-op="{_e(s.fused_op)}">'
            f"{_link('b', s.fused_op, 'added')} = <code>{_e(nb[s.fused_op].short_target)}</code> replaces "
            f"{len(s.removed)} nodes: " + " ".join(_link("a", n, "removed") for n in s.removed)
            + ("; adds " + " ".join(_link("b", n, "added") for n in s.added if n != s.fused_op)
               if len(s.added) > 1 else "") + "</li>")
    out.append("</ol>")
    others = [s for s in al.sites if not s.fused_op]
    if others:
        out.append(f"<h2>Collectives removed without a fused op ({len(others)})</h2><ul>")
        out += ["<li>" + " ".join(_link("a", n, "removed") for n in s.removed) + "</li>" for s in others]
        out.append("</ul>")
    return out


def _graphs(al, fused: list) -> list[str]:
    site_of = {"a": {n: i for i, s in enumerate(fused, 1) for n in s.removed},
               "b": {n: i for i, s in enumerate(fused, 1) for n in s.added}}
    changed = {"a": set(al.removed), "b": set(al.added)}
    rewired = set(al.rewired)
    out = ['<div class="cols">']
    for side, dump in (("a", al.a), ("b", al.b)):
        title = f"{side.upper()}: {dump.stage} ({len(dump.nodes)} nodes)"
        out.append(f'<section><h2>{_e(title)}</h2><div class="graph" id="graph-{side}">')
        for n in dump.nodes:
            if n.name in changed[side]:
                cls = "removed" if side == "a" else "added"
            elif (al.pairs.get(n.name) if side == "a" else n.name) in rewired:
                cls = "rewired"
            else:
                cls = "unchanged"
            i = site_of[side].get(n.name)
            tag = f'<a class="tag" href="#site-{i}">site {i}</a>' if i is not None else ""
            out.append(f'<div class="node {cls}" id="{side}-{_e(n.name)}">{_e(node_line(n))}{tag}</div>')
        out.append("</div></section>")
    out.append("</div>")
    return out


def render_html(al, d: dict) -> str:
    """The page for an :class:`~fusion_passes.cli.graph_align.Alignment` and its dict."""
    fused = [s for s in al.sites if s.fused_op]
    return "\n".join(_head(d) + _sites(al, fused) + _graphs(al, fused) + ["</body></html>"]) + "\n"
