"""Which chain of ``A`` became which fused op of ``B``: the site pairing of ``diff``.

Each side's site has a head (a removed collective of ``A``, a fused op of ``B``) and a
*boundary*: the paired nodes its members read and feed, named as in ``B``. Pairing, in
about n log n for n sites:

1. **Shared neighbours.** Two heads are candidates when their boundaries share a node,
   weighted by how many they share. A node that borders more than :data:`MAX_SHARED`
   sites on one side (a tied weight, an input every layer reads) tells no site from
   another and is not counted; so each node adds at most ``MAX_SHARED**2`` candidates.
2. **Small ambiguous groups.** Candidates connect into groups (connected components); a
   group of at most :data:`MAX_GROUP` heads a side is paired by maximum-weight matching
   (networkx), exactly what a person means by "this chain became that op". A larger group
   is paired greedily: most shared neighbours first, then nearest in op sequence.
3. **Op sequence and source.** Heads still unpaired (their only shared neighbours were
   common ones) are paired in order between the pairs already made: the pass replaces a
   chain in place, so the k-th unpaired collective between two anchors became the k-th
   unpaired fused op between their partners. Where those counts differ, only heads with
   the same source line pair (the fused op carries its norm's), in order.
"""

from __future__ import annotations

import bisect
import collections

import networkx as nx

MAX_SHARED = 16
"""Most sites a boundary node may border on one side and still tell them apart. In a
real graph a node borders one or two sites (the op before a layer's norm, the one after
it); 16 is 8x that, and bounds the candidate pairs one node adds to 256."""
MAX_GROUP = 64
"""Most heads a side of one group paired by maximum-weight matching (networkx's is cubic
in the group): 64 + 64 heads with every pair a candidate, random weights 1 to 4, take
0.025 s (``nx.max_weight_matching`` on that complete bipartite graph, 2 CPU cores at load
5), so a graph of n sites spends at most n / 64 x 0.025 s there."""


def match(heads_a: list[str], heads_b: list[str], bound_a: dict[str, set], bound_b: dict[str, set],
          sources_a: dict[str, set[str]], source_b: dict[str, str | None]) -> dict[str, str]:
    """``{A head: B head}`` by the steps of the module docstring (heads in graph order)."""
    weights = _candidates(heads_a, heads_b, bound_a, bound_b)
    chosen: dict[str, str] = {}
    rank_a = {h: i for i, h in enumerate(heads_a)}
    rank_b = {h: i for i, h in enumerate(heads_b)}
    for edges in _groups(weights):
        chosen.update(_pair_group(edges, rank_a, rank_b))
    chosen.update(_by_sequence(heads_a, heads_b, chosen, sources_a, source_b))
    return chosen


def _candidates(heads_a, heads_b, bound_a, bound_b) -> dict[tuple[str, str], int]:
    """``{(A head, B head): shared boundary nodes}``, common nodes left out (step 1)."""
    post_a: dict = collections.defaultdict(list)
    post_b: dict = collections.defaultdict(list)
    for heads, bound, post in ((heads_a, bound_a, post_a), (heads_b, bound_b, post_b)):
        for h in heads:
            for e in bound[h]:
                post[e].append(h)
    weights: dict[tuple[str, str], int] = collections.Counter()
    for e, ha in post_a.items():
        hb = post_b.get(e)
        if hb and len(ha) <= MAX_SHARED and len(hb) <= MAX_SHARED:
            for x in ha:
                for y in hb:
                    weights[x, y] += 1
    return weights


def _groups(weights: dict[tuple[str, str], int]) -> list[list[tuple[str, str, int]]]:
    """The candidate edges, split into connected groups (step 2)."""
    g = nx.Graph()
    g.add_edges_from((("A", x), ("B", y)) for x, y in weights)
    groups = []
    for comp in nx.connected_components(g):
        heads_a = [n for side, n in comp if side == "A"]
        groups.append([(x, y, weights[x, y]) for x in heads_a for _, y in g.adj[("A", x)]])
    return groups


def _pair_group(edges, rank_a, rank_b) -> dict[str, str]:
    """One group: maximum-weight matching when small, else greedy (step 2)."""
    if max(len({x for x, _, _ in edges}), len({y for _, y, _ in edges})) <= MAX_GROUP:
        g = nx.Graph()
        for x, y, w in edges:
            g.add_edge(("A", x), ("B", y), weight=w)
        out = {}
        for p, q in nx.max_weight_matching(g):
            (_, x), (_, y) = (p, q) if p[0] == "A" else (q, p)
            out[x] = y
        return out
    out, taken = {}, set()
    for x, y, _ in sorted(edges, key=lambda e: (-e[2], abs(rank_a[e[0]] - rank_b[e[1]]), rank_a[e[0]])):
        if x not in out and y not in taken:
            out[x] = y
            taken.add(y)
    return out


def _by_sequence(heads_a, heads_b, chosen, sources_a, source_b) -> dict[str, str]:
    """Unpaired heads between two anchors, in order (step 3)."""
    rank_b = {h: i for i, h in enumerate(heads_b)}
    taken = set(chosen.values())
    free_b = [h for h in heads_b if h not in taken]
    free_ranks = [rank_b[h] for h in free_b]
    out: dict[str, str] = {}
    segment: list[str] = []
    low = -1  # the B rank of the last anchor
    for h in [*heads_a, None]:
        if h is not None and h not in chosen:
            segment.append(h)
            continue
        high = rank_b[chosen[h]] if h is not None else len(heads_b)
        if segment and high > low:
            window = free_b[bisect.bisect_right(free_ranks, low):bisect.bisect_left(free_ranks, high)]
            out.update(_zip_segment(segment, window, sources_a, source_b))
        segment = []
        low = max(low, high)
    return out


def _zip_segment(segment, window, sources_a, source_b) -> dict[str, str]:
    """Equal counts: in order. Else each A head takes the next B head with one of its
    members' source lines (in order, so pairs never cross)."""
    if len(segment) == len(window):
        return dict(zip(segment, window))
    at: dict[str, list[int]] = collections.defaultdict(list)
    for k, y in enumerate(window):
        if source_b.get(y) is not None:
            at[source_b[y]].append(k)
    out, j = {}, 0
    for x in segment:
        found = [ks[i] for src in sources_a.get(x, ()) if (ks := at.get(src))
                 and (i := bisect.bisect_left(ks, j)) < len(ks)]
        if found:
            k = min(found)
            out[x], j = window[k], k + 1
    return out
