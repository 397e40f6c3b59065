"""Decide what a candidate region computes: evaluate it on probes, compare every node with
every hypothesis, and cut out the largest part whose values read outside it are all ones
the fused op returns.

A node *matches* a role (``"norm"``, ``"sum"``, ``"q"``, ``"scales"``) when its value
equals the canonical one on every probe, bit for bit in its dtype (up to a reshape, or for
NVFP4 after decoding the packed E2M1 codes, or after an exact upcast: an *adapter* the
rewrite inserts). The *cut*
starts from the whole region and peels every node that is read outside it without
matching a role, together with what it feeds, until each value leaving the cut is one the
fused op returns. Hypotheses are tried in order; the first whose cut holds the norm wins,
with its quantization if one matches too.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch.fx import Node

from fusion_passes.recognize.meaning import conventions as C, probe_sizes, probes, safe_eval
from fusion_passes.recognize.fx import val
from fusion_passes.recognize.meaning.region import Region, shape_of


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What a region computes. ``roles``: exit node -> ``(role, adapter)``; ``fused``: the
    nodes the fused op replaces; ``y``: the norm output node; ``miss``: why nothing fuses
    ``(reason, blocking node, deep)`` (deep: the values matched and the cut failed, so the
    reason names the real blocker); ``quant_miss``: why the quant part stays unfused."""

    norm: C.NormH | None = None
    quant: C.QuantH | None = None
    roles: dict = dataclasses.field(default_factory=dict)
    fused: frozenset = frozenset()
    y: Node | None = None
    miss: tuple | None = None
    quant_miss: tuple | None = None


@dataclasses.dataclass
class Probe:
    """The region and its leaves, with the probe environments it was evaluated on."""

    region: Region
    known: list[Node]
    stat: Node
    envs: list[dict]
    leafset: set[Node]
    starts: list = dataclasses.field(default_factory=list)  # (first env index, probe_sizes.Sizes) per count


def norm_envs(region: Region, plan: probe_sizes.Plan) -> tuple[list[dict], list] | str:
    """``(envs, starts)``: probe environments at each of the plan's token counts (enough
    that every row kind of :func:`probes.norm_probes` occurs, at least two per count),
    every region node evaluated, and ``(first env index, sizes)`` per count; or why the
    region cannot be probed.

    Leaves are computed from their bases where every op on the way is one probes run
    (:mod:`fusion_passes.recognize.meaning.safe_eval`); a leaf that is not gets a fresh probe value of its
    shape and dtype, as a graph input does (a leaf is any replicated value the chain reads:
    the fused op reads the same node)."""
    envs, starts = [], []
    budget = safe_eval.Budget()
    for rows in plan.tokens:
        sizes = plan.at(rows)
        shape = sizes.shape(tuple(val(region.root).shape))
        starts.append((len(envs), sizes))
        # every row kind at the first count; one probe set at the others (they test that
        # the chain computes the same at that size; seed 4: a random row first, not zeros)
        for seed in range(probes.sets_for(shape, 7)) if len(starts) == 1 else (4,):
            env = _norm_env(region, sizes, shape, seed, budget)
            if isinstance(env, str):
                return env
            envs.append(env)
    return envs, starts


def _norm_env(region: Region, sizes, shape: tuple, seed: int, budget) -> dict | str:
    root, dtype = region.root, val(region.root).dtype
    x, res = probes.norm_probes(shape, dtype, seed)
    env: dict = {root: x}
    for i, b in enumerate(region.bases):
        env[b] = _input_probe(b, i, sizes, shape, dtype, seed, res)
    refused: dict = {}
    probes.evaluate(region.leaf_nodes, env, refused, sizes, budget)
    for i, leaf in enumerate(region.leaves):
        if leaf not in env:
            env[leaf] = _input_probe(leaf, len(region.bases) + i, sizes, shape, dtype, seed, res)
    for n in [*region.bases, *region.leaves]:
        if isinstance(env.get(n), str):
            return env[n]
    probes.evaluate(region.nodes, env, refused, sizes, budget)
    for n in region.nodes:
        if n in refused:
            return f"{n.name} ({n.target}) is not evaluated on probes: {refused[n]}"
        want = sizes.value_shapes(n)
        if isinstance(env.get(n), torch.Tensor) and want and tuple(env[n].shape) not in want:
            return (f"{n.name}: its shape does not follow the token count (probed at {sizes.rows} tokens: "
                    f"{list(env[n].shape)}, expected {list(want[0])})")
    return env


def _input_probe(b: Node, i: int, sizes, shape: tuple, dtype: torch.dtype, seed: int, res: torch.Tensor):
    """The probe value of a chain input *b* (the ``i``-th) at *sizes*: a size's value, a
    constant's own value (a copy), a residual-like probe for a tensor of the activation's
    shape and dtype, else one by shape; a ``str`` when it would be too large."""
    v = b.meta.get("val")
    if not isinstance(v, torch.Tensor):
        return sizes.size(v) if isinstance(v, torch.SymInt) else v
    if b.op == "get_attr" and b.graph.owning_module is not None:
        value = _attr(b)
        if isinstance(value, torch.Tensor) and value.numel() <= safe_eval.MAX_NUMEL:
            return value.detach().to("cpu", copy=True)  # the probe's own copy: never the module's tensor
    bshape = sizes.shape(tuple(v.shape))
    if math.prod(bshape) > safe_eval.MAX_NUMEL:
        return f"{b.name} would be a probe of {math.prod(bshape)} elements (at most {safe_eval.MAX_NUMEL})"
    if bshape == shape and v.dtype == dtype:
        return probes.norm_probes(shape, dtype, seed + 10 + i)[1] if i else res
    return probes.base_probe(bshape, v.dtype, seed + i)


def _attr(node: Node):
    obj = node.graph.owning_module
    for part in node.target.split("."):
        obj = getattr(obj, part)
    return obj


def match(nodes, envs: list[dict], canon: list, allow_e2m1: bool = False) -> dict[Node, str]:
    """Nodes equal to *canon* on every env -> adapter: ``""`` (as is), ``"e2m1"`` (packed
    codes decoded to values), ``"cast"`` (an exact upcast), each optionally ``"+view"``."""
    out = {}
    for n in nodes:
        adapter = _adapter(n, envs, canon, allow_e2m1)
        if adapter is not None:
            out[n] = adapter
    return out


def _adapter(n: Node, envs, canon, allow_e2m1: bool) -> str | None:
    first = envs[0].get(n)
    if not isinstance(first, torch.Tensor) or canon[0] is None:
        return None
    kinds = ["", *(["e2m1"] if allow_e2m1 else []), *(["cast"] if _widens(canon[0].dtype, first.dtype) else [])]
    for kind in kinds:
        if kind == "" and first.dtype != canon[0].dtype or kind == "e2m1" and canon[0].dtype != torch.uint8:
            continue
        if first.numel() != canon[0].numel() * (2 if kind == "e2m1" else 1):
            continue
        values = [C.decode_e2m1(c, first.dtype) if kind == "e2m1" else c.to(first.dtype) if kind == "cast" else c
                  for c in canon]
        if all(probes.same(e.get(n), v) for e, v in zip(envs, values)):
            return kind
        if all(probes.same_flat(e.get(n), v) for e, v in zip(envs, values)):
            return f"{kind}+view" if kind else "view"
    return None


def _widens(src: torch.dtype, dst: torch.dtype) -> bool:
    """An exact float upcast (every *src* value is a *dst* value)."""
    return (src != dst and src.is_floating_point and dst.is_floating_point
            and torch.finfo(dst).bits > torch.finfo(src).bits and dst in (torch.float32, torch.float64))


def witnessed(nodes, envs: list[dict], values: list) -> bool:
    """Whether some node holds *values* (the canonical fp32 intermediate) on every env: the
    chain rounds its intermediates as the epilogue does, not only its outputs (an output
    dtype's resolution hides most one-ulp differences of its fp32 inputs)."""
    return any(all(probes.same_flat(e.get(n), v) for e, v in zip(envs, values)) for n in nodes
               if getattr(envs[0].get(n), "dtype", None) == values[0].dtype)


def descendants(region: Region, start: Node) -> list[Node]:
    """Region nodes computed from *start*, in graph order."""
    reach = {start}
    for n in region.nodes:
        if any(a in reach for a in n.all_input_nodes):
            reach.add(n)
    return [n for n in region.nodes if n in reach and n is not start]


def cut(p: Probe, roles: dict[Node, tuple], residual: bool) -> tuple[frozenset, list] | tuple:
    """``(fused nodes, peel log)``: the largest part of the region whose outside-read values
    all have roles (the root's outside users need the ``sum`` role: no residual)."""
    region, fused, log = p.region, set(p.region.nodes), []
    live = {n for n in region.nodes if n.users}  # dead nodes are erased with the cut
    changed = True
    while changed:
        changed = False
        for n in reversed(region.nodes):
            if n not in fused:
                continue
            outside = [u for u in n.users if u not in fused and (u in live or u not in region.nodes)]
            bad_input = any(a not in fused and a is not region.root and a not in p.leafset
                            for a in n.all_input_nodes)
            if bad_input or (outside and n not in roles):
                fused.discard(n)
                changed = True
                if outside and not bad_input:
                    log.append((n, outside[0]))
    return frozenset(_needed(region, fused, roles)), log


def _needed(region: Region, fused: set[Node], roles) -> set[Node]:
    exits = [n for n in fused if any(u not in fused for u in n.users)]
    need = set()
    todo = [n for n in exits if n in roles]
    while todo:
        n = todo.pop()
        if n in need or n not in fused:
            continue
        need.add(n)
        todo.extend(n.all_input_nodes)
    # dead nodes computed only from the cut (an unused max index) go with it
    for n in region.nodes:
        if n in fused and not n.users and all(a in need or a not in fused for a in n.all_input_nodes):
            need.add(n)
    return need


# ------------------------------------------------------------------------------- decide


def decide(p: Probe, eps_candidates: list[float]) -> Verdict:
    """The first norm reading whose cut holds the norm, with the best quant reading."""
    root = p.region.root
    first_fail = None
    for h in C.norm_hypotheses(root, p.known, eps_candidates):
        first = C.canonical_norm(h, p.envs[0], root, p.known)
        if not witnessed(p.region.nodes, p.envs[:1], [first[2]]):
            continue  # most readings fail on the first probe: the rest are not computed
        canon = [first] + [C.canonical_norm(h, env, root, p.known) for env in p.envs[1:]]
        if not witnessed(p.region.nodes, p.envs, [c[2] for c in canon]):
            continue
        norm_nodes = {n: a for n, a in match(p.region.nodes, p.envs, [c[0] for c in canon]).items() if a == ""}
        if not norm_nodes:
            continue
        roles = {n: ("norm", a) for n, a in norm_nodes.items()}
        roles.update({n: ("sum", a) for n, a in match(p.region.nodes, p.envs, [c[1] for c in canon]).items()
                      if n not in roles and a == ""})
        y = _norm_output(p.region, norm_nodes)
        verdict = _with_quant(p, h, y, roles)
        if verdict.miss is None:
            return verdict
        first_fail = first_fail or verdict
    return first_fail or Verdict(miss=_no_norm(p))


def _norm_output(region: Region, norm_nodes: dict[Node, str]) -> Node:
    """Of the nodes equal to the norm output, the one most of the region is computed from."""
    exact = [n for n, a in norm_nodes.items() if a == ""] or list(norm_nodes)
    return max(exact, key=lambda n: len(descendants(region, n)))


def _with_quant(p: Probe, h: C.NormH, y: Node, roles: dict) -> Verdict:
    """The verdict for norm reading *h*: with a quant when one matches, else norm only."""
    below = descendants(p.region, y)
    facts = quant_facts(p, y, below)
    quant_miss = None
    if facts is not None:
        found = _quant(p, h, y, below, facts, roles)
        if isinstance(found, Verdict):
            return found
        quant_miss = found
    verdict = _finish(p, h, None, y, roles)
    return dataclasses.replace(verdict, quant_miss=quant_miss) if verdict.miss is None else verdict


def _finish(p: Probe, h: C.NormH, qh, y: Node, roles: dict) -> Verdict:
    """Cut with *roles*; a :class:`Verdict` (``miss`` set when the cut loses the norm)."""
    fused, log = cut(p, roles, h.residual is not None)
    if p.stat not in fused or not any(roles.get(n, ("",))[0] in ("norm", "q") for n in fused
                                      if any(u not in fused for u in n.users)):
        if log:
            node, user = log[0]
            return Verdict(miss=(f"{{node}} is also read by {user.name} outside the chain, and the fused "
                                 "op does not return that value", node, True))
        return Verdict(miss=("{node}: the chain's result is not used", y, True))
    outside_root = [u for u in p.region.root.users if u not in fused]
    if outside_root and h.residual is not None:
        return Verdict(miss=(f"all-reduce output {{node}} has a second user {outside_root[0].name} outside "
                             "the chain: a second user blocks fusion", p.region.root, False))
    exits = {n: roles[n] for n in fused if any(u not in fused for u in n.users)}
    return Verdict(norm=h, quant=qh, roles=exits, fused=fused, y=y)


def _no_norm(p: Probe) -> tuple:
    """Why no reading matched: name the chain's first value read outside it after the norm."""
    below = descendants(p.region, p.stat)
    exits = [n for n in below if any(u not in p.region.nodes for u in n.users)]
    node = exits[0] if exits else p.stat
    return ("{node}: no RMSNorm convention computes this value bit for bit on probe inputs "
            "(residual in the activation dtype or fp32, weight before or after the cast back, "
            "Gemma's 1 + w, every eps in the chain)", node, False)


# -------------------------------------------------------------------------------- quant


def quant_facts(p: Probe, y: Node, below: list[Node]) -> C.QuantFacts | None:
    """What the structure after the norm output says the quantization may be (None: none)."""
    from fusion_passes import epilogue

    facts = C.QuantFacts()
    hidden = shape_of(y)[-1] if shape_of(y) else None
    for n in below:
        v = n.meta.get("val")
        if isinstance(v, torch.Tensor) and v.dtype in C.FP8_DTYPES and v.dtype not in facts.fp8_dtypes:
            facts.fp8_dtypes.append(v.dtype)
        _read_reduction(n, hidden, facts)
        _read_constants(n, p, facts)
    facts.fp8_maxes = sorted({epilogue.fp8_max(d) for d in facts.fp8_dtypes if d != torch.float8_e5m2})
    facts.e2m1 = 16 in facts.groups and torch.float8_e4m3fn in facts.fp8_dtypes
    if not facts.fp8_dtypes:
        return None
    facts.groups = [g for g in facts.groups if g is None or (hidden and hidden % g == 0)]
    return facts


def _read_reduction(n: Node, hidden, facts: C.QuantFacts) -> None:
    name = str(n.target)
    if name in ("aten.amax.default", "aten.amin.default", "aten.max.dim", "aten.max.default",
                "aten.aminmax.default"):
        src = n.args[0].meta.get("val")
        dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", [])
        dims = [dims] if isinstance(dims, int) else list(dims or [])
        if not dims and name != "aten.max.dim" or isinstance(src, torch.Tensor) and len(dims) >= src.dim() > 1:
            group = None  # every element: one scale per tensor (amax(x, []) reduces all dims)
        elif isinstance(src, torch.Tensor) and dims and dims[-1] in (-1, src.dim() - 1):
            group = int(src.shape[-1])
        else:
            return
        if group not in facts.groups:
            facts.groups.append(group)
    if name in ("aten.log2.default",):
        facts.pow2 = sorted(set(facts.pow2) | {"ceil", "floor"})


def _read_constants(n: Node, p: Probe, facts: C.QuantFacts) -> None:
    name = str(n.target)
    for a in (*n.args, *n.kwargs.values()):
        if isinstance(a, Node) and a in p.leafset and a in p.known:
            v = a.meta.get("val")
            i = p.known.index(a)
            if isinstance(v, torch.Tensor) and v.numel() == 1 and v.dtype.is_floating_point:
                if name.startswith(("aten.clamp", "aten.minimum")):
                    facts.ubs.append(i) if i not in facts.ubs else None
                    continue
                if name.startswith(("aten.mul", "aten.div")) and _parameter_like(a):
                    for j in [*_scalar_sources(a, p.known), i]:  # the raw parameter first
                        if j not in facts.scales:
                            facts.scales.append(j)
        elif isinstance(a, float) and not isinstance(a, bool):
            if 0.0 < a < 1e-2 and a not in facts.small:
                facts.small.append(a)
            if name.startswith(("aten.mul", "aten.div")) and a not in (0.0, 1.0) and a not in facts.scales \
                    and abs(a) not in (448.0, 224.0, 240.0, 57344.0):
                facts.scales.append(a)


def quant_envs(p: Probe, y: Node, below: list[Node]) -> list[dict]:
    """At each probed token count, its first norm environment with the norm output *y*
    replaced by each quant probe."""
    dtype = val(y).dtype
    out = []
    budget = safe_eval.Budget()
    for i, (first, sizes) in enumerate(p.starts):
        base = p.envs[first]
        if not isinstance(base.get(y), torch.Tensor):
            continue
        for probe in probes.quant_probes(tuple(base[y].shape), dtype, every_kind=i == 0):
            env = {k: x for k, x in base.items() if k not in below}
            env[y] = probe
            out.append(probes.evaluate(below, env, None, sizes, budget))
    return out


def _quant(p: Probe, h: C.NormH, y: Node, below: list[Node], facts: C.QuantFacts, roles: dict):
    """A :class:`Verdict` with the first quant reading whose cut keeps the quant, else the
    ``(reason, node)`` why none did."""
    envs = quant_envs(p, y, below)
    if not envs:
        return ("{node}: the norm output was not evaluated on probes", y, False)
    hidden = shape_of(y)[-1]
    candidates = [n for n in below if isinstance(envs[0].get(n), torch.Tensor)]
    tried = 0
    for qh in C.quant_hypotheses(y, hidden, facts):
        tried += 1
        first = C.canonical_quant(qh, envs[0][y], envs[0], p.known)
        if first[0] is None or not match(candidates, envs[:1], [first[0]], qh.kind == "nvfp4") \
                or not witnessed(candidates, envs[:1], [first[2]]):
            continue
        canon = [first] + [C.canonical_quant(qh, e[y], e, p.known) for e in envs[1:]]
        q_nodes = match(candidates, envs, [c[0] for c in canon], qh.kind == "nvfp4")
        if not q_nodes or not witnessed(candidates, envs, [c[2] for c in canon]):
            continue
        quant_roles = dict(roles)
        quant_roles.update({n: ("q", a) for n, a in q_nodes.items()})
        if canon[0][1] is not None:
            quant_roles.update({n: ("scales", a) for n, a in
                                match(candidates, envs, [c[1] for c in canon]).items() if n not in q_nodes})
        verdict = _finish(p, h, qh, y, quant_roles)
        if verdict.miss is None and any(r[0] == "q" for r in verdict.roles.values()):
            return verdict
    casts = [n for n in below if n.meta.get("val") is not None and getattr(n.meta["val"], "dtype", None)
             in C.FP8_DTYPES]
    return (f"{{node}}: no FP8/NVFP4 convention computes this quantization bit for bit on probe inputs "
            f"({tried} readings tried)", casts[0] if casts else y, False)


def _scalar_sources(leaf: Node, known: list[Node]) -> list[int]:
    """One-element float values *leaf* is computed from (``reciprocal(scale.float())`` ->
    ``scale``), outermost first: the parameter a kernel takes."""
    out, n = [], leaf
    while n.op == "call_function" and n.all_input_nodes:
        tensors = [a for a in n.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]
        if len(tensors) != 1 or tensors[0] not in known:
            break
        n = tensors[0]
        v = n.meta["val"]
        if v.numel() == 1 and v.dtype.is_floating_point:
            out.insert(0, known.index(n))
    return out


def _parameter_like(node: Node, depth: int = 8) -> bool:
    """A scale that is a parameter or a constant (through one-element arithmetic and casts),
    not one the graph computes from a larger tensor (which may differ across ranks, and is
    no static scale a kernel may take)."""
    if node.op in ("placeholder", "get_attr"):
        return True
    if node.op != "call_function" or depth == 0:
        return False
    inputs = node.all_input_nodes
    return all(isinstance(v := a.meta.get("val"), torch.Tensor) and v.numel() == 1 and _parameter_like(a, depth - 1)
               for a in inputs)
