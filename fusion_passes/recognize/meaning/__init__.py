"""Recognize a chain by what it computes, not by how it is spelled.

The structural recognizers (:mod:`fusion_passes.recognize`) know
the spellings of vLLM and Hugging Face and run first. When they miss, or leave a quant
after the norm unfused, this module takes over:

1. :func:`.region.grow` selects the candidate: the elementwise ops, casts and
   last-dim reductions computed from the all-reduced value, with its leaves (residual,
   weight, scales, constants: replicated values not computed from the sum);
2. one last-dim mean of squares must be among them (:func:`statistic`); eps candidates are
   the constants next to it;
3. :func:`.decide.decide` evaluates the region on probe inputs with edge values
   and compares it with the canonical epilogue under every reading
   (:mod:`.conventions`): which leaf is the residual and which the weight,
   residual add in the activation dtype or fp32, weight before or after the cast back,
   Gemma's ``1 + w``, and for the quant every FP8 form / group / scale and NVFP4. Only a
   bit-exact match is accepted, and the fused part is cut so that every value read
   outside it is one the fused op returns;
4. the verdict is cached per chain shape (:func:`shape_key`: ops, arguments, dtypes,
   shapes, which values leave the chain), so a model's layers are probed once.

A miss keeps a reason naming the blocking node. Docs: docs/spellings.md.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import weakref

import torch
from torch.fx import Graph, Node

from fusion_passes import _compat, epilogue
from fusion_passes.recognize.meaning import conventions as C, decide as D, probe_sizes
from fusion_passes.recognize.fx import dtype_of, op_name, short, val
from fusion_passes.recognize.meaning.region import Leaves, Region, grow, partial_values, shape_of
from fusion_passes.recognize.roles import AllReduce, Miss, Norm, Quant

CACHE_SIZE = 512  # distinct chain shapes kept; a model has a handful
_CACHE: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()
_PARTIAL: "weakref.WeakKeyDictionary[Graph, set]" = weakref.WeakKeyDictionary()


@dataclasses.dataclass
class Const:
    """A scalar the chain spells as a Python number where the fused op takes a tensor
    (a static scale): the rewrite materializes it as ``full([1], value)`` (fp32)."""

    value: float

    def materialize(self, graph: Graph, before: Node, fake_vals) -> Node:
        args = ([1], self.value)
        kwargs = {"dtype": torch.float32, "device": val(before).device}
        with graph.inserting_before(before):
            node = graph.call_function(torch.ops.aten.full.default, args, kwargs)
        fake_vals.update(node)
        return node


@dataclasses.dataclass
class SemanticQuant(Quant):
    """A :class:`~fusion_passes.recognize.roles.Quant` read by meaning; ``adapt``: output name ->
    adapter the rewrite inserts after the fused output (``"view"``: reshape to the graph's
    shape; ``"e2m1"``: decode packed NVFP4 codes to their float values)."""

    adapt: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Recognized:
    """A chain read by meaning: the norm (its ``nodes`` hold every node the fused op
    replaces; its ``aliases`` the nodes holding the very value of a fused output, redirected
    before the rewrite), the quant (or None), and why a quant stayed unfused."""

    norm: Norm
    quant: SemanticQuant | None
    note: str | None = None


@dataclasses.dataclass(frozen=True)
class DeepMiss(Miss):
    """A miss after the chain was read (its statistic found, its values compared): its
    reason names the real blocker, better than the structural recognizers' first refusal."""


def better_miss(structural: Miss, read: Miss) -> Miss:
    """The miss to report when both readings failed."""
    return read if isinstance(read, DeepMiss) or not isinstance(structural, Miss) else structural


def quantizes(y: Node, limit: int = 64) -> bool:
    """Whether an FP8 value is computed from norm output *y* within a few elementwise ops
    (a cheap test before recognition by meaning is tried for the quant)."""
    from fusion_passes.recognize.meaning.region import VOCAB

    seen, todo = set(), [y]
    while todo and len(seen) < limit:
        for u in todo.pop().users:
            if u in seen or u.op != "call_function" or op_name(u.target) not in VOCAB:
                continue
            seen.add(u)
            if getattr(val(u), "dtype", None) in C.FP8_DTYPES:
                return True
            todo.append(u)
    return False


def forget(graph: Graph) -> None:
    """Drop what was computed for *graph* (call when its nodes were replaced)."""
    _PARTIAL.pop(graph, None)


def partial_of(graph: Graph) -> set:
    """The graph's per-rank values (computed once per graph)."""
    if graph not in _PARTIAL:
        _PARTIAL[graph] = partial_values(graph)
    return _PARTIAL[graph]


def statistic(region: Region) -> Node | Miss:
    """The one last-dim mean (or sum) of squares in *region*: the RMSNorm statistic."""
    found, wrong = [], []
    for n in region.nodes:
        if op_name(n.target) not in ("aten.mean.dim", "aten.sum.dim_IntList") or not _is_square(n.args[0]):
            continue
        dims = list(n.args[1]) if len(n.args) > 1 and n.args[1] is not None else []
        rank = len(val(n.args[0]).shape)
        (found if dims in ([-1], [rank - 1]) else wrong).append(n)
    if len(found) == 1:
        return found[0]
    if found:
        return Miss(f"{short(found[1])}: a second mean of squares in the chain (one RMSNorm per all-reduce)",
                    found[1])
    if wrong:
        return Miss(f"{short(wrong[0])} reduces dims {list(wrong[0].args[1])}; RMSNorm needs the last dim",
                    wrong[0])
    stop = region.stops[0] if region.stops else None
    if stop is not None:
        return Miss(f"no RMSNorm after the all-reduce: {stop[1]}", stop[0])
    return Miss(f"no RMSNorm statistic (a last-dim mean of squares) computed from {region.root.name}",
                region.root)


def _is_square(n: object) -> bool:
    if not isinstance(n, Node):
        return False
    name = op_name(n.target)
    if name in ("aten.pow.Tensor_Scalar",):
        return n.args[1] == 2
    return name == "aten.square.default" or (name == "aten.mul.Tensor" and n.args[0] is n.args[1])


def eps_candidates(stat: Node) -> list[float]:
    """Constants within two ops after the statistic (``mean + eps``), plus 0.0."""
    found: list[float] = []
    layer = [stat]
    for _ in range(2):
        layer = [u for n in layer for u in n.users]
        for u in layer:
            for a in u.args:
                if isinstance(a, float) and 0.0 <= a < 1.0 and a not in found:
                    found.append(a)
    return found + ([0.0] if 0.0 not in found else [])


def _broadcast_add(region: Region, stat: Node) -> Miss | None:
    """A leaf of another shape added to the reduced value before the norm: not a residual."""
    shape = shape_of(region.root)
    for n in region.nodes:
        if n is stat or _compat.graph_order(n) > _compat.graph_order(stat):
            break
        if op_name(n.target) in ("aten.add.Tensor", "aten.sub.Tensor"):
            for a in n.args[:2]:
                if isinstance(a, Node) and a in region.leaves and shape_of(a) not in (shape, None) \
                        and shape_of(n) == shape:
                    return Miss(f"{short(n)} adds {a.name} of shape {list(shape_of(a))} to the all-reduce output "
                                "(a broadcast add), not a residual", n)
    return None


def known_nodes(region: Region) -> list[Node]:
    """Leaves, the bases they are computed from, and the nodes in between, that hold
    tensors: probe indices (sizes are not: a static graph has none)."""
    return [n for n in dict.fromkeys([*region.leaves, *region.bases, *region.leaf_nodes])
            if isinstance(val(n), torch.Tensor)]


def recognize(ar: AllReduce, graph: Graph) -> Recognized | Miss:
    """The chain after *ar* read by meaning, or why there is none (module docstring)."""
    region = grow(ar.value, ar.node, Leaves(ar.node, partial_of(graph)))
    if isinstance(region, Miss):
        return region
    stat = statistic(region)
    if isinstance(stat, Miss):
        return stat
    miss = _broadcast_add(region, stat)
    if miss is not None:
        return miss
    known = known_nodes(region)
    plan = probe_sizes.plan(region.root, [*region.bases, *region.leaf_nodes, *region.nodes])
    if isinstance(plan, str):
        return Miss(plan, region.root)
    key = shape_key(region, known, plan)
    cached = _CACHE.get(key)
    if cached is None:
        with _one_thread():
            envs = D.norm_envs(region, plan)
            if isinstance(envs, str):
                return Miss(envs, region.root)
            probe = D.Probe(region, known, stat, envs[0], set(region.leaves), envs[1])
            cached = _encode(D.decide(probe, eps_candidates(stat)), region, known)
        _CACHE[key] = cached
        while len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    return _build(ar, region, known, _decode(cached, region, known))


@contextlib.contextmanager
def _one_thread():
    """Probes on one intra-op thread: their tensors are a few rows, too small to gain from
    more, and on a busy machine (Inductor's compile workers run beside the pass) every
    multi-threaded op waits for a thread that is not scheduled. The pass on the chain of
    tests/probe_cost.py inside its compile (2 cores, load 4): 4.2 s with 2 threads, 0.12 s
    with one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------- the per-shape cache


def shape_key(region: Region, known: list[Node], plan: probe_sizes.Plan) -> tuple:
    """What the verdict depends on: every node's op, arguments (nodes by position, sizes
    as the plan names them: ``("T", k)`` for k tokens' worth), dtype and shape, whether its
    value is read outside the region; the leaves' the same. The static and token-dynamic
    forms of one chain have the same key."""
    index = {region.root: "x", **{n: f"k{i}" for i, n in enumerate(known)},
             **{n: f"r{i}" for i, n in enumerate(region.nodes)}}

    def enc(a):
        if isinstance(a, Node):
            return index.get(a, "?")
        if isinstance(a, (list, tuple)):
            return tuple(enc(x) for x in a)
        if isinstance(a, dict):
            return tuple(sorted((k, enc(v)) for k, v in a.items()))
        if a is None or isinstance(a, (bool, int, float, str)):
            return type(a).__name__, a
        return str(a)

    def meta(n):
        v = val(n)
        return (str(v.dtype), plan.key_shape(tuple(v.shape))) if isinstance(v, torch.Tensor) else (type(v).__name__,)

    inside = set(region.nodes)
    computed = set(region.leaf_nodes)
    nodes = tuple((op_name(n.target), enc(plan.key_args(n, n.args)), enc(n.kwargs), meta(n),
                   any(u not in inside for u in n.users)) for n in region.nodes)
    leaves = tuple((op_name(n.target), enc(plan.key_args(n, n.args)), meta(n)) if n in computed else ("input", meta(n))
                   for n in known)
    return meta(region.root), any(u not in inside for u in region.root.users), leaves, nodes


def _encode(v: D.Verdict, region: Region, known: list[Node]) -> tuple:
    pos = {n: i for i, n in enumerate(region.nodes)}

    def ref(n):
        return ("x",) if n is region.root else ("r", pos[n]) if n in pos else ("k", known.index(n))

    def miss(m):
        return None if m is None else (m[0], ref(m[1]), *m[2:])

    return (v.norm, v.quant, {pos[n]: r for n, r in v.roles.items()}, frozenset(pos[n] for n in v.fused),
            pos.get(v.y), miss(v.miss), miss(v.quant_miss))


def _decode(c: tuple, region: Region, known: list[Node]) -> D.Verdict:
    def node(ref):
        return region.root if ref[0] == "x" else region.nodes[ref[1]] if ref[0] == "r" else known[ref[1]]

    def miss(m):
        return None if m is None else (m[0], node(m[1]), *m[2:])

    norm, quant, roles, fused, y, m, qm = c
    return D.Verdict(norm, quant, {region.nodes[i]: r for i, r in roles.items()},
                     frozenset(region.nodes[i] for i in fused), region.nodes[y] if y is not None else None,
                     miss(m), miss(qm))


# --------------------------------------------------------------------------- the result


def _build(ar: AllReduce, region: Region, known: list[Node], v: D.Verdict) -> Recognized | Miss:
    """The :class:`Recognized` chain of a verdict (or its miss, naming the node)."""
    if v.miss is not None:
        reason, node, deep = v.miss
        return (DeepMiss if deep else Miss)(reason.format(node=short(node)), node)
    h = v.norm
    by_role: dict[str, list] = {}
    for n in sorted(v.roles, key=_compat.graph_order):
        by_role.setdefault(v.roles[n][0], []).append((n, v.roles[n][1]))
    aliases: list[tuple[Node, Node]] = []

    def primary(role):
        items = by_role.get(role, [])
        aliases.extend((n, items[0][0]) for n, a in items[1:] if a == items[0][1])
        return items[0] if items else (None, "")

    residual = known[h.residual] if h.residual is not None else None
    sum_node = primary("sum")[0]
    if residual is None and sum_node is not None:  # the reduced value itself, kept by residual_out
        aliases.append((sum_node, ar.value))
        sum_node = None
    quant = _quant(v, region, known, primary) if v.quant is not None else None
    norm = Norm(ar.value, known[h.weight] if h.weight is not None else None, h.eps, h.gemma, h.weight_in_fp32,
                primary("norm")[0] or v.y, tuple(sorted(v.fused, key=_compat.graph_order)), residual, sum_node,
                residual_in_fp32=h.residual_in_fp32 and residual is not None, aliases=tuple(aliases))
    note = None
    if v.quant_miss is not None:
        note = "quant left unfused: " + v.quant_miss[0].format(node=short(v.quant_miss[1]))
    return Recognized(norm, quant, note)


def _quant(v: D.Verdict, region: Region, known: list[Node], primary) -> SemanticQuant:
    qh = v.quant
    q, q_adapt = primary("q")
    scales, s_adapt = primary("scales")
    kind, params = variant_params(qh, shape_of(v.y)[-1], known)
    if kind == "fp8_per_group" and scales is not None and _column_major(scales):
        params["column_major"] = True
    below = set(D.descendants(region, v.y))
    nodes = tuple(n for n in sorted(v.fused, key=_compat.graph_order) if n in below)
    if params.get("form") is not None and kind != "fp8_static" and _amax_in_fp32(nodes, v.y):
        from fusion_passes import fp8_forms

        params["form"] = dataclasses.replace(fp8_forms.parse(params["form"]), amax_f32=True).text()
    adapt = {k: a for k, a in (("q", q_adapt), ("scales", s_adapt)) if a}
    return SemanticQuant(kind, params, nodes, {"q": q, "scales": scales}, adapt=adapt)


_AMAX = (torch.ops.aten.amax.default, torch.ops.aten.max.dim, torch.ops.aten.max.default)


def _amax_in_fp32(nodes, y: Node) -> bool:
    """Whether the chain's amax reduces an fp32 upcast of a bf16 / fp16 norm output
    (``input.abs().to(float32).amax()``): Inductor's compile then reads the unrounded norm
    value there (fp8_forms.Form ``amax_f32``)."""
    low = dtype_of(y) in (torch.bfloat16, torch.float16)
    return low and any(n.target in _AMAX and dtype_of(n) == torch.float32 for n in nodes)


def _column_major(n: Node) -> bool:
    v = val(n)
    return isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[-2] > 1 and v.stride(-2) == 1


def variant_params(qh: C.QuantH, hidden: int, known: list[Node]) -> tuple[str, dict]:
    """The fused variant kind and its quant arguments for a quant reading: a form the
    variant computes natively goes through its own arguments (so kernels run it), any other
    through ``form`` (:mod:`fusion_passes.fp8_forms`)."""
    from fusion_passes import fp8_forms

    if qh.kind == "nvfp4":
        return "nvfp4", {"global_scale": known[qh.scale], "swizzle": False}
    scale = known[qh.scale] if isinstance(qh.scale, int) else Const(qh.scale) if qh.scale is not None else None
    if qh.kind == "fp8_static":
        return "fp8_static", {"scale": scale, "fp8_dtype": qh.dtype, **({"form": qh.how} if qh.how else {})}
    form, floor = qh.form, epilogue.fp8_min_scaling_factor(qh.dtype)
    base = {"fp8_dtype": qh.dtype}
    if qh.group == hidden:
        ub = known[qh.scale_ub] if qh.scale_ub is not None else None
        native = form == fp8_forms.Form(scale_min=floor)
        return "fp8_per_token", {**base, "scale_ub": ub, **({} if native else {"form": form.text()})}
    if qh.group is None:
        if form in (fp8_forms.Form(scale_min=floor), fp8_forms.Form()):
            return "fp8_per_tensor", {**base, "scale_min": -1.0 if form.scale_min else 0.0}
        return "fp8_per_tensor", {**base, "scale_min": 0.0, "form": form.text()}
    group = {"group_size": qh.group, "ue8m0": False, "column_major": False, "amax_eps": 0.0, "scale_min": 0.0}
    native = (form.apply == "div" and form.precision == "f32" and form.pow2 in ("", "ceil")
              and not form.amax_min_input)
    if native:
        group.update(ue8m0=form.pow2 == "ceil", amax_eps=form.amax_min, scale_min=form.scale_min)
        return "fp8_per_group", {**base, **group}
    return "fp8_per_group", {**base, **group, "form": form.text()}
