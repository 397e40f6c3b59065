"""Structural alignment of two graph dumps: what ``fusion-passes diff`` computes.

Not a line diff: nodes are paired by op target and topology, then the unpaired nodes are
grouped into *sites*, each a chain of ``A`` that became a fused op of ``B``.

Pairing (``A`` -> ``B``), in this order; each step only pairs nodes with the same op and
target:

1. placeholders by name (our passes never touch graph inputs), and the outputs;
2. forward, value numbering: a ``B`` node pairs with an ``A`` node whose arguments are the
   partners of its own arguments, constants equal (same computation on the same values);
3. by name: a node our passes kept but rewired (hoisting moves an all-reduce: same node,
   new input) keeps its name;
4. backward: two unpaired nodes in the same argument slot of a paired pair;
5. forward again, for nodes whose inputs steps 3 and 4 just paired.

A paired node is *unchanged* when its arguments are its partner's partners, else *rewired*.
The rest of ``A`` is *removed*, the rest of ``B`` *added*. Sites: every removed collective
of ``A`` claims the removed nodes it reaches first (forward, nearest wins: in a residual
stream the next layer's add is nearer to its own all-reduce), every fused op of ``B``
(``fusion_passes.*``) the added nodes it reaches; the two sides pair by the paired
neighbours they share, then by op sequence (:mod:`.site_match`), which is what a person
means by "this chain became that op". Every step is linear or n log n in the graph's size
(a 4,400-site graph, the most the loader's node cap admits, is diffed in seconds).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import heapq
import json
from typing import Any

import networkx as nx

from fusion_passes.cli.graphio import GraphDump, NodeRecord, resolve_target
from fusion_passes.cli.site_match import match as match_sites

FUSED_PREFIX = "torch.ops.fusion_passes."
COLLECTIVE_PREFIXES = ("torch.ops._c10d_functional.", "torch.ops.c10d_functional.")
VLLM_COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast")
NO_LAUNCH_TARGETS = {
    "operator.getitem",
    "torch.ops._c10d_functional.wait_tensor.default",
    "torch.ops.c10d_functional.wait_tensor.default",
    "torch.ops.aten.sym_size.int", "torch.ops.aten.sym_numel.default", "torch.ops.aten.sym_stride.int",
    "torch.ops.aten._assert_scalar.default", "torch.ops.aten._assert_tensor_metadata.default",
}
GENERATED_NAMESPACES = ("torch.ops.aten.", "torch.ops.prims.")


def kind(node: NodeRecord) -> str:
    """How a node launches work, for the kernel estimate:

    ``none`` (graph inputs/outputs, getitem, wait_tensor, views: no kernel),
    ``collective`` (a cross-rank collective: one launch), ``fused`` (our fused ops: one
    launch that is also the collective), ``extern`` (matmuls and other library or custom
    ops Inductor calls as they are: one launch each), ``generated`` (aten / prims compute
    that Inductor lowers into its own kernels, fusing neighbours).
    """
    t = node.target
    if node.op != "call_function":
        return "none" if node.op in ("placeholder", "output", "get_attr") else "extern"
    if t in NO_LAUNCH_TARGETS or t.startswith("operator.") or t.startswith("builtins."):
        return "none"
    if t.startswith(FUSED_PREFIX):
        return "fused"
    if t.startswith(COLLECTIVE_PREFIXES):
        return "collective"
    if t.startswith("torch.ops.vllm.") and t.split(".")[3] in VLLM_COLLECTIVES:
        return "collective"
    if t.startswith(GENERATED_NAMESPACES):
        if _is_view(t):
            return "none"
        if t.split(".")[3] in EXTERN_ATEN:
            return "extern"
        return "generated"
    return "extern"


@functools.lru_cache(maxsize=None)
def _is_view(target: str) -> bool:
    """Whether the aten/prims op named *target* returns a view (its schema says it aliases)."""
    return bool(getattr(resolve_target(target), "is_view", False))


EXTERN_ATEN = {
    # aten ops Inductor hands to a library (cuBLAS / hipBLASLt / oneDNN) or a fallback kernel
    "mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "_int_mm", "convolution", "_weight_int8pack_mm",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_flash_attention_forward", "sort", "topk", "nonzero",
}


@dataclasses.dataclass
class Counts:
    """Work one graph launches.

    ``kernels`` ESTIMATES what Inductor would launch: one per collective, fused op and
    extern op, plus one per group of generated aten/prims ops that Inductor's scheduler
    can fuse into one kernel. A producer and its consumer (directly or through views /
    getitem) are in one group unless a collective or extern op separates them (the
    producer reaches a launch that the consumer depends on: a kernel cannot contain work
    on both sides of it). Inductor may split a group further (reductions over different
    sizes, too many inputs), so this is a lower bound. ``ops`` counts every launching
    node as if nothing fused (an upper bound).
    """

    collectives: int
    fused: int
    extern: int
    generated: int
    generated_groups: int

    @property
    def kernels(self) -> int:
        return self.collectives + self.fused + self.extern + self.generated_groups

    @property
    def ops(self) -> int:
        return self.collectives + self.fused + self.extern + self.generated

    def to_dict(self) -> dict[str, int]:
        return {"collectives": self.collectives + self.fused, "fused_ops": self.fused,
                "kernels_estimate": self.kernels, "compute_ops": self.ops}


LAUNCHES = ("collective", "fused", "extern")


def counts(dump: GraphDump) -> Counts:
    """The :class:`Counts` of one graph (see its docstring for the kernel estimate)."""
    kinds = {n.name: kind(n) for n in dump.nodes}
    c = collections.Counter(kinds.values())
    launches = {n: 1 << i for i, n in enumerate(x for x, k in kinds.items() if k in LAUNCHES)}
    inputs = {n.name: set(n.inputs()) for n in dump.nodes}
    before: dict[str, int] = {}  # bitset of the launches each node depends on
    for n in dump.nodes:  # nodes are in topological order
        before[n.name] = 0
        for i in inputs[n.name]:
            before[n.name] |= before[i] | launches.get(i, 0)
    after: dict[str, int] = collections.defaultdict(int)  # launches that depend on each node
    for n in reversed(dump.nodes):
        for i in inputs[n.name]:
            after[i] |= after[n.name] | launches.get(n.name, 0)
    fusible = {n.name for n in dump.nodes if kinds[n.name] in ("generated", "none")
               and n.op not in ("placeholder", "output", "get_attr")}
    g = nx.Graph()
    g.add_nodes_from(fusible)
    for n in dump.nodes:
        if n.name in fusible:
            g.add_edges_from((n.name, i) for i in inputs[n.name] if i in fusible and not after[i] & before[n.name])
    groups = sum(1 for comp in nx.connected_components(g) if any(kinds[x] == "generated" for x in comp))
    return Counts(c["collective"], c["fused"], c["extern"], c["generated"], groups)


@dataclasses.dataclass
class Site:
    """One chain of ``A`` and what it became in ``B``."""

    removed: list[str]  # A names, graph order
    added: list[str]  # B names, graph order
    fused_op: str | None  # the B fused node, if the chain became one
    collective: str | None  # the A collective that headed the chain

    @property
    def fused(self) -> bool:
        return self.fused_op is not None


@dataclasses.dataclass
class Alignment:
    """The structural diff of two graphs."""

    a: GraphDump
    b: GraphDump
    pairs: dict[str, str]  # A name -> B name
    rewired: list[str]  # B names paired but with other arguments
    removed: list[str]  # A names
    added: list[str]  # B names
    sites: list[Site]
    counts_a: Counts
    counts_b: Counts

    @property
    def unchanged(self) -> int:
        return len(self.pairs) - len(self.rewired)

    def other_removed(self) -> list[str]:
        used = {n for s in self.sites for n in s.removed}
        return [n for n in self.removed if n not in used]

    def other_added(self) -> list[str]:
        used = {n for s in self.sites for n in s.added}
        return [n for n in self.added if n not in used]


def _key(node: NodeRecord, rename: dict[str, str] | None) -> str | None:
    """The node's computation with node references renamed (None if one is unpaired)."""
    missing = False

    def sub(v: Any) -> Any:
        nonlocal missing
        if isinstance(v, list):
            return [sub(x) for x in v]
        if isinstance(v, dict):
            if set(v) == {"node"}:
                if rename is None:
                    return v
                if v["node"] not in rename:
                    missing = True
                    return None
                return {"node": rename[v["node"]]}
            return {k: sub(x) for k, x in v.items()}
        return v

    text = json.dumps([node.op, node.target, sub(node.args), sub(node.kwargs)], sort_keys=True)
    return None if missing else text


class _Pairing:
    """The node pairs ``A -> B`` built up by the steps of the module docstring."""

    def __init__(self, a: GraphDump, b: GraphDump):
        self.a, self.b = a, b
        self.na, self.nb = a.by_name(), b.by_name()
        self.pairs: dict[str, str] = {}
        self.back: dict[str, str] = {}
        self.users_a: dict[str, list[str]] = collections.defaultdict(list)
        for r in a.nodes:
            for i in dict.fromkeys(r.inputs()):
                self.users_a[i].append(r.name)

    def pair(self, x: str, y: str) -> None:
        self.pairs[x], self.back[y] = y, x

    def inputs_and_output(self) -> None:
        """Step 1: placeholders by name, and the outputs."""
        for r in self.a.nodes:
            if r.op == "placeholder" and r.name in self.nb and self.nb[r.name].op == "placeholder":
                self.pair(r.name, r.name)
        self.pair(self.a.nodes[-1].name, self.b.nodes[-1].name)

    def forward(self) -> None:
        """Steps 2 and 5: value numbering, a B node pairs with an A node computing the same."""
        index: dict[str, list[str]] = collections.defaultdict(list)
        for r in self.a.nodes:
            if r.name not in self.pairs and (k := _key(r, self.pairs)) is not None:
                index[k].append(r.name)
        for r in self.b.nodes:
            if r.name in self.back:
                continue
            cands = [x for x in index.get(_key(r, None), []) if x not in self.pairs]
            if not cands:
                continue
            x = r.name if r.name in cands else cands[0]
            self.pair(x, r.name)
            for u in self.users_a[x]:  # users whose inputs are now all paired become candidates
                if u not in self.pairs and (ku := _key(self.na[u], self.pairs)) is not None and u not in index[ku]:
                    index[ku].append(u)

    def by_name(self) -> None:
        """Step 3: a kept node that was rewired keeps its name."""
        for r in self.b.nodes:
            x = self.na.get(r.name)
            if r.name not in self.back and x is not None and r.name not in self.pairs \
                    and x.target == r.target and x.op == r.op:
                self.pair(r.name, r.name)

    def backward(self) -> None:
        """Step 4: two unpaired nodes in the same argument slot of a paired pair."""
        work = list(self.pairs.items())
        while work:
            x, y = work.pop()
            ia, ib = self.na[x].inputs(), self.nb[y].inputs()
            if len(ia) != len(ib):
                continue
            for p, q in zip(ia, ib):
                if p not in self.pairs and q not in self.back and self.na[p].target == self.nb[q].target \
                        and self.na[p].op == self.nb[q].op:
                    self.pair(p, q)
                    work.append((p, q))


def align(a: GraphDump, b: GraphDump) -> Alignment:
    """Pair the nodes of *a* and *b* and group the rest into sites (see the module docstring)."""
    p = _Pairing(a, b)
    p.inputs_and_output()
    p.forward()
    p.by_name()
    p.backward()
    p.forward()
    pairs = p.pairs
    rewired = {y for x, y in pairs.items() if _key(p.na[x], pairs) != _key(p.nb[y], None)}
    removed = [r.name for r in a.nodes if r.name not in pairs]
    added = [r.name for r in b.nodes if r.name not in p.back]
    sites = _sites(a, b, removed, added, pairs)
    return Alignment(a, b, pairs, [r.name for r in b.nodes if r.name in rewired], removed, added, sites,
                     counts(a), counts(b))


def _claim(dump: GraphDump, changed: list[str], seeds: list[str]) -> dict[str, str]:
    """Assign each changed node to the nearest seed: forward first, then backward."""
    changed_set = set(changed)
    g = nx.DiGraph()
    g.add_nodes_from(changed)
    for r in dump.nodes:
        if r.name in changed_set:
            g.add_edges_from((i, r.name) for i in r.inputs() if i in changed_set)
    owner: dict[str, str] = {}
    for graph in (g, g.reverse(copy=False)):
        best = _nearest(graph, seeds)
        owner.update({n: s for n, s in best.items() if n not in owner})
    # a side input of a chain (the weight cast a fused op absorbed) is reachable from no
    # seed: it joins the site that consumed it
    for n in reversed(list(nx.topological_sort(g))):
        if n not in owner:
            claimed = [owner[u] for u in g.successors(n) if u in owner]
            if claimed:
                owner[n] = claimed[0]
    return owner


def _nearest(graph: nx.DiGraph, seeds: list[str]) -> dict[str, str]:
    """Each node reachable from a seed: the seed with the least (distance, seed order).

    One multi-source search (Dijkstra on that pair, each edge adding (1, 0)), so linear
    in the graph where a search per seed was quadratic on a residual stream (every seed
    reaches every later chain)."""
    heap = [(0, order, s) for order, s in enumerate(seeds)]
    heapq.heapify(heap)
    best: dict[str, str] = {}
    while heap:
        d, order, n = heapq.heappop(heap)
        if n in best:
            continue
        best[n] = seeds[order]
        for m in graph.successors(n):
            if m not in best:
                heapq.heappush(heap, (d + 1, order, m))
    return best


def _sites(a: GraphDump, b: GraphDump, removed: list[str], added: list[str], pairs: dict[str, str]) -> list[Site]:
    na, nb = a.by_name(), b.by_name()
    heads_a = [n for n in removed if kind(na[n]) in ("collective", "fused")]
    heads_b = [n for n in added if kind(nb[n]) == "fused"]
    own_a, own_b = _claim(a, removed, heads_a), _claim(b, added, heads_b)
    group_a: dict[str, list[str]] = {h: [] for h in heads_a}
    group_b: dict[str, list[str]] = {h: [] for h in heads_b}
    for n in removed:
        if n in own_a:
            group_a[own_a[n]].append(n)
    for n in added:
        if n in own_b:
            group_b[own_b[n]].append(n)

    users_a: dict[str, set[str]] = collections.defaultdict(set)
    users_b: dict[str, set[str]] = collections.defaultdict(set)
    for r in a.nodes:
        for i in r.inputs():
            users_a[i].add(r.name)
    for r in b.nodes:
        for i in r.inputs():
            users_b[i].add(r.name)

    def boundary(dump_nodes, users, members: list[str], to_b) -> set[tuple[str, str]]:
        out = set()
        for m in members:
            for i in dump_nodes[m].inputs():
                if (p := to_b(i)) is not None:
                    out.add(("in", p))
            for u in users[m]:
                if (p := to_b(u)) is not None:
                    out.add(("out", p))
        return out

    bound_a = {h: boundary(na, users_a, ms, pairs.get) for h, ms in group_a.items()}
    added_set = set(added)
    bound_b = {h: boundary(nb, users_b, ms, lambda n: n if n not in added_set else None)
               for h, ms in group_b.items()}
    sources_a = {h: {na[m].source for m in ms if na[m].source} for h, ms in group_a.items()}
    chosen = match_sites(heads_a, heads_b, bound_a, bound_b, sources_a, {h: nb[h].source for h in heads_b})
    order_a = {r.name: i for i, r in enumerate(a.nodes)}
    order_b = {r.name: i for i, r in enumerate(b.nodes)}
    sites = [Site(sorted(group_a[ha], key=order_a.get), sorted(group_b[hb], key=order_b.get), hb, ha)
             for ha, hb in chosen.items()]
    sites += [Site(sorted(group_a[ha], key=order_a.get), [], None, ha) for ha in heads_a if ha not in chosen]
    taken = set(chosen.values())
    sites += [Site([], sorted(group_b[hb], key=order_b.get), hb, None) for hb in heads_b if hb not in taken]
    sites.sort(key=lambda s: (order_b.get(s.fused_op, 10**9) if s.fused_op else 10**9,
                              order_a.get(s.collective, 10**9) if s.collective else 10**9))
    return sites
