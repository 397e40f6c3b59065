"""Match: from each all-reduce, walk to its norm and pick the catalogue family.

The walk is dialect-neutral: it speaks only of the roles :mod:`fusion_passes.recognize.roles`
produces. A :class:`Site` is a complete match, ready to rewrite; anything else is a
:class:`~fusion_passes.recognize.roles.Miss` with the reason and the blocking node.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
from torch.fx import Node

from fusion_passes import _compat, backends, compile_range, epilogue, groups, inductor_store, variants
from fusion_passes.backends import calibrate
from fusion_passes.patterns import CATALOGUE, Family
from fusion_passes.recognize import find_quant, fx, rms_norm
from fusion_passes.recognize.aten import C10D_WAIT, residual_add
from fusion_passes.recognize.fx import is_named, short, val
from fusion_passes.recognize.roles import AllReduce, Miss, Norm, Quant


@dataclasses.dataclass(frozen=True)
class Declined(Miss):
    """A recognized chain that no backend runs here: the reason and the rule are the
    selector's. The report keeps them (never replaced by where hoisting stopped: the chain
    was found)."""

    rule: str | None = None


@dataclasses.dataclass
class Site:
    """One all-reduce -> [add] -> norm chain and the family it matched."""

    ar: AllReduce
    norm: Norm
    family: Family
    backend: str
    add: Node | None = None  # the aten add of the residual (plain dialect)
    residual: Node | None = None
    quant: "Quant | None" = None  # the quant fused into the op (quant families)
    note: str | None = None  # e.g. why a quant after the norm was left unfused
    carry: Node | None = None  # the previous fused op whose unrounded sum is the residual (carry_fp32)
    # fp32 upcasts of the sum outside the site that the compile feeds the unrounded sum
    # (:func:`_upcasts_unrounded`): this site's op then returns it in fp32 (carry_fp32)
    upcasts: tuple[Node, ...] = ()
    rule: str | None = None  # the selector's rule that chose the backend (fusion_passes.backends.selector)

    @property
    def removed(self) -> set[Node]:
        """Every node the fused op replaces."""
        q = self.quant.nodes if self.quant is not None else ()
        return {*self.ar.nodes, *self.norm.nodes, *([self.add] if self.add is not None else []), *q}


def find_site(ar: AllReduce, prefer_backend: str = "auto") -> Site | Miss:
    """The fusable chain after *ar*, or why there is none: the structural recognizers
    first, then recognition by meaning (:mod:`fusion_passes.recognize.meaning`) when they miss or
    leave a quantization of the norm output unfused."""
    from fusion_passes.recognize import meaning

    chain = _chain(ar)
    fast = None
    if not isinstance(chain, Miss):
        add, residual, norm, residual_out = chain
        follow_inductor_precision(norm)
        found_quant = find_quant(norm.out)
        fast = _select_inductor(ar, add, residual, norm, residual_out, found_quant, prefer_backend)
        if isinstance(found_quant, Quant) or not meaning.quantizes(norm.out):
            return fast
    read = meaning.recognize(ar, ar.node.graph)
    if isinstance(read, Miss):
        if isinstance(fast, Site) and fast.note is None:
            fast.note = f"quant left unfused: {read.reason}"  # the norm output is quantized (above)
        return fast if fast is not None else meaning.better_miss(chain, read)
    norm = read.norm
    follow_inductor_precision(norm)
    if norm.residual is None:
        residual_out = any(u not in norm.nodes for u in ar.value.users)
    else:
        residual_out = norm.residual_out is not None and bool(norm.residual_out.users)
    found_quant = read.quant if read.quant is not None else (Miss(read.note) if read.note else None)
    site = _select_read(ar, norm, residual_out, found_quant, prefer_backend)
    if isinstance(site, Site) and site.quant is None and read.quant is not None:
        site.norm = _without_quant(norm, read.quant)  # the quant stays: it keeps reading the norm output
    if isinstance(fast, Site) and (not isinstance(site, Site) or site.quant is None):
        if isinstance(site, Site) and site.note and not fast.note:
            fast.note = site.note  # why the quant it found stays unfused
        return fast  # the structural reading is as large, and known to the kernels
    return site


def _select_read(ar: AllReduce, norm: Norm, residual_out: bool, found_quant, prefer: str):
    """:func:`_select` for a chain read by meaning, its aten FP8 quant reading the norm
    value as Inductor's default compile does (:func:`_reads_unrounded`)."""
    norm.quant_unrounded = _reads_unrounded(norm, found_quant)
    return _select_unrounded(ar, None, norm.residual, norm, residual_out, found_quant, prefer)


def _reads_unrounded(norm: Norm, found_quant) -> bool:
    """Whether Inductor's default compile quantizes the UNROUNDED norm value: an aten FP8
    quant (fused into the norm's kernel) of a norm output read by nothing else, which the
    compile does not store (a stored one: the codes' loop reads it rounded)."""
    return _fused_with_norm(norm, found_quant) and not _rounds_later_reads(norm.out)


def _amax_unrounded(norm: Norm, found_quant) -> bool:
    """Whether Inductor's default compile stores the norm output in the loop that takes a
    dynamic FP8 scale's amax, where it reads the value unrounded (its Triton code:
    epilogue.amax_reads_unrounded), and takes the codes a loop later from the stored, rounded
    value: the quant :func:`_reads_unrounded` would read unrounded but for that store."""
    stores = inductor_store.current()
    return (stores is not None and epilogue.amax_reads_unrounded(stores.device)
            and _fused_with_norm(norm, found_quant)
            and found_quant.kind in ("fp8_per_token", "fp8_per_group") and not found_quant.params.get("form")
            and _rounds_later_reads(norm.out))


def _fused_with_norm(norm: Norm, found_quant) -> bool:
    """Whether Inductor's default compile fuses the quant into the norm's kernel: an aten
    FP8 quant of a decomposed norm (weight multiplied in fp32) whose output nothing else reads."""
    return (not _compat.inductor_config.emulate_precision_casts
            and isinstance(found_quant, Quant) and found_quant.kind.startswith("fp8")
            and norm.weight_in_fp32 and _decomposed(norm) and _aten(found_quant)
            and all(u in found_quant.nodes for u in norm.out.users))


def _hidden(node: Node) -> int | None:
    v = val(node)
    return int(v.shape[-1]) if isinstance(v, torch.Tensor) and v.dim() and isinstance(v.shape[-1], int) else None


def _rounds_later_reads(node: Node) -> bool:
    """The compile without the pass stores *node* and a later loop of its kernel reads it
    rounded (:mod:`fusion_passes.inductor_store`; False outside the pass)."""
    stores = inductor_store.current()
    return stores is not None and stores.rounds_later_reads(node, _hidden(node))


def _select_unrounded(ar: AllReduce, add, residual, norm: Norm, residual_out: bool, found_quant, prefer: str):
    """:func:`_select` with ``norm.quant_unrounded`` as set; where no backend then fuses the
    quant, selected again with the quant reading the rounded norm (as before)."""
    site = _select(ar, add, residual, norm, residual_out, found_quant, prefer)
    if (norm.quant_unrounded or norm.amax_unrounded) and (not isinstance(site, Site) or site.quant is None):
        norm.quant_unrounded = norm.amax_unrounded = False  # no backend quantizes the unrounded norm here
        site = _select(ar, add, residual, norm, residual_out, found_quant, prefer)
    return site


def _without_quant(norm: Norm, found_quant) -> Norm:
    """A norm read by meaning holds every node of its cut, the quant's included: without
    them, for a site whose quant is left unfused (no backend here computes its form)."""
    gone = set(found_quant.nodes)
    aliases = tuple((n, same) for n, same in norm.aliases if n not in gone and same not in gone)
    return dataclasses.replace(norm, nodes=tuple(n for n in norm.nodes if n not in gone), aliases=aliases)


def _select_inductor(ar: AllReduce, add, residual, norm: Norm, residual_out: bool, found_quant, prefer: str):
    """:func:`_select` with the plain chain's sum and quant read as Inductor's default
    compile reads them (:func:`follow_inductor_sum`); where no backend computes that, the
    site is selected as before (the sum rounded, the quant reading the rounded norm)."""
    if not follow_inductor_sum(add, residual, norm, residual_out, found_quant):
        site = _select(ar, add, residual, norm, residual_out, found_quant, prefer)
        if isinstance(site, Site) and add is not None and not _compat.inductor_config.emulate_precision_casts:
            site.carry = _carry_source(residual, norm, site, prefer)  # a stored sum of an unstored stream
        return site
    site = _select_unrounded(ar, add, residual, norm, residual_out, found_quant, prefer)
    if not isinstance(site, Site) and (norm.residual_in_fp32 or norm.sum_stored):
        norm.residual_in_fp32 = norm.sum_stored = False  # nor reads the unrounded sum
        return _select(ar, add, residual, norm, residual_out, found_quant, prefer)
    if isinstance(site, Site):
        site.carry = _carry_source(residual, norm, site, prefer)
        site.upcasts = _upcasts_unrounded(add, norm, site, prefer)
    return site


def follow_inductor_sum(add, residual, norm: Norm, residual_out: bool, found_quant) -> bool:
    """Set the flags under which the fused op reads the plain chain's sum and quant as
    Inductor's default compile does (docs/design.md, "What Inductor keeps unrounded"):
    a sum the compile does not store is recomputed in fp32 by every reader, so the norm
    reads it unrounded (``residual_in_fp32``); a sum it stores is read unrounded by the
    variance, in the loop that stores it, and rounded by the normalization
    (``sum_stored``; :mod:`fusion_passes.inductor_store` says which). Outside the pass
    (no analysis): a sum read by the norm alone, or by the norm and the next site's add, is
    taken as not stored. An aten FP8 quant of a norm output read by nothing else reads the
    unrounded norm value unless the compile stores it (``quant_unrounded``); where it stores
    it, a GPU compile's amax still reads it unrounded (``amax_unrounded``).
    Returns whether it set any."""
    if _compat.inductor_config.emulate_precision_casts or add is None or not _decomposed(norm):
        return False
    stores = inductor_store.current()
    if stores is not None and stores.known(add):
        reads = stores.sum_reads(add, _hidden(add))
        norm.sum_stored = reads == inductor_store.STORED
        norm.residual_in_fp32 = norm.residual_in_fp32 or reads == inductor_store.UNROUNDED
    else:
        norm.residual_in_fp32 = norm.residual_in_fp32 or not residual_out or _feeds_only_a_site(add, norm)
    norm.quant_unrounded = _reads_unrounded(norm, found_quant)
    norm.amax_unrounded = _amax_unrounded(norm, found_quant)
    return norm.residual_in_fp32 or norm.quant_unrounded or norm.sum_stored or norm.amax_unrounded


def _feeds_only_a_site(add: Node, norm: Norm) -> bool:
    """Whether the sum *add*, besides its norm, feeds only the residual add of another
    all-reduce (the next layer's site): Inductor then recomputes it there, unrounded."""
    outside = [u for u in add.users if u not in norm.nodes]
    if len(outside) != 1 or not residual_add_like(outside[0]):
        return False
    a, b = outside[0].args[:2]
    return is_named(b if a is add else a, C10D_WAIT)


def _aten(found_quant) -> bool:
    """Whether the quant is aten ops (Inductor fuses it with the norm), not a custom kernel."""
    return all(n.target is operator.getitem or fx.op_name(n.target).startswith(("aten.", "prims."))
               for n in found_quant.nodes if n.op == "call_function")


def _carry_source(residual, norm: Norm, site: Site, prefer: str) -> Node | None:
    """The previous fused op whose sum is this site's residual and feeds nothing else: its
    ``residual_out`` then carries the unrounded fp32 sum here (``carry_fp32``), where a
    backend that runs this site computes it."""
    from fusion_passes import ops

    if residual is None or len(residual.users) != 1:
        return None
    prev = residual.args[0] if residual.target is operator.getitem else None
    if prev is None or prev.target not in ops.OPS.values():
        return None
    stores = inductor_store.current()
    if stores is not None and stores.known(prev):
        if stores.stored(prev):  # the compile stores that sum: this site reads it rounded
            return None
    elif not norm.residual_in_fp32:
        return None
    names = variants.get(next(k for k, v in ops.OPS.items() if v is prev.target)).output_names
    if names[residual.args[1]] != "residual_out":
        return None
    return prev if _carries_fp32(norm, site, prefer) else None


def _carries_fp32(norm: Norm, site: Site, prefer: str) -> bool:
    """Whether a backend computes *site* (with *norm*'s flags) under ``carry_fp32``."""
    flags = dataclasses.replace(norm.flags, carry_fp32=True)
    call = dataclasses.replace(compile_time_call(site.family.variant, site.ar, norm, site.quant), flags=flags)
    return backends.selector.carries_fp32(call, prefer).backend is not None


def _upcasts_unrounded(add, norm: Norm, site: Site, prefer: str) -> tuple[Node, ...]:
    """The fp32 upcasts of the sum *add* outside its site (another norm of the same stream,
    say) where the compile does not store the sum: Inductor recomputes it there inline, in
    fp32, so they read it unrounded (docs/design.md, "What Inductor keeps unrounded"). Where
    the site's backend returns the unrounded sum (``carry_fp32``), the rewrite hands it to
    them (:func:`fusion_passes.rewrite.hand_unrounded`); else () and they read it rounded."""
    stores = inductor_store.current()
    if (add is None or not norm.residual_in_fp32 or norm.sum_stored or stores is None or not stores.known(add)
            or stores.sum_reads(add, _hidden(add)) != inductor_store.UNROUNDED):
        return ()
    removed = site.removed
    ups = tuple(u for u in add.users if u not in removed and fx.converts_to(u, torch.float32))
    return ups if ups and _carries_fp32(norm, site, prefer) else ()


def _select(ar: AllReduce, add, residual, norm: Norm, residual_out: bool, found_quant, prefer: str):
    """The catalogue family and backend of a recognized chain (the largest that runs)."""
    has_residual = residual is not None
    note = found_quant.reason if isinstance(found_quant, Miss) else None
    if note is not None and not note.startswith("quant left unfused"):
        note = f"quant left unfused: {note}"
    families = []
    if isinstance(found_quant, Quant):
        norm_out = any(u not in found_quant.nodes for u in norm.out.users)
        families += [f for f in CATALOGUE if f.quant == found_quant.kind and f.residual == has_residual
                     and getattr(f, "norm_out", False) == norm_out]
    families += [f for f in CATALOGUE if f.quant is None and f.residual == has_residual
                 and f.residual_out in (None, residual_out)]
    if not families:  # the catalogue covers every shape found above; a gap is a bug
        return Miss(f"no catalogue family for residual={has_residual} residual_out={residual_out}", ar.value)
    reasons: list[str] = []
    for family in families:
        site_quant = found_quant if family.quant is not None else None
        choice = _backend(family, ar, norm, site_quant, prefer, reasons)
        if choice.backend is None:
            continue
        if family.quant is None and isinstance(found_quant, Quant):
            note = f"quant {found_quant.kind} left unfused: no backend runs {found_quant.variant} here ({reasons[0]})"
        return Site(ar, norm, family, choice.backend, add, residual, quant=site_quant, note=note, rule=choice.rule)
    return Declined(reasons[-1], ar.node, rule=choice.rule)


def follow_inductor_precision(norm: Norm) -> None:
    """Make the fused op round as the compile it replaces.

    A norm written in aten (the plain dialect: Hugging Face, torch, torchtitan) is compiled
    by Inductor into one kernel, which by default (``emulate_precision_casts=False``) keeps
    the Hugging Face form's normalized value in fp32 instead of rounding it to the
    activation dtype before the weight multiply: measured bit for bit on an H200 and on CPU
    (results/README.md, "How the compiled chain rounds"), the compiled chain is the
    ``weight_in_fp32`` form (up to Inductor's own op order), not eager's. So there the fused
    op multiplies in fp32 too; with emulated casts it rounds as eager does. The residual sum
    and the quant input are :func:`follow_inductor_sum`'s, and a dialect's norm op (vLLM's
    ``vllm_ir.*``) keeps its own defined rounding. Where type promotion makes the Hugging Face form's output
    wider than the activations (an fp32 weight), the fused op returns that wider dtype
    (``promote_out``): the graph's consumers read the dtype they read before.
    """
    if norm.weight_in_fp32 or norm.gemma or norm.weight is None or not _decomposed(norm):
        return
    if _compat.inductor_config.emulate_precision_casts:
        return
    x, w = (getattr(val(n), "dtype", None) for n in (norm.input, norm.weight))
    if w is not None and w not in _COMPUTE_DTYPES:  # e.g. an fp64 weight: Inductor's product is not fp32; eager's order
        return
    norm.weight_in_fp32 = True
    # an fp32 weight makes ``w * n.to(bf16)`` fp32: the product stays fp32, never rounded
    norm.promote_out = None not in (x, w) and torch.promote_types(w, x) != x


_COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _decomposed(norm: Norm) -> bool:
    """Whether *norm* is aten ops (not a dialect's norm op or its getitem)."""
    return fx.op_name(norm.out.target).startswith(("aten.", "prims."))


def _chain(ar: AllReduce) -> tuple[Node | None, Node | None, Norm, bool] | Miss:
    """``(add, residual, norm, residual_out)`` after *ar*: the residual add (plain dialect)
    and its residual, the norm, and whether the sum is also read elsewhere."""
    v = ar.value
    if not v.users:
        return Miss(f"all-reduce {ar.node.name} result is unused", ar.node)
    found = residual_add(v)
    if isinstance(found, Miss):
        return found
    if found is not None:
        add, residual = found
        norm = rms_norm(add)
        if not norm:
            return Miss(f"residual add {add.name} does not feed an RMSNorm: {norm.reason}", norm.node or add)
        if norm.residual is not None:  # the norm op adds a residual of its own: two adds, no family
            return Miss(f"residual add {add.name} feeds {short(norm.out)}, which adds a second residual "
                        "itself: two residual adds do not fuse into one op", add)
        return add, residual, norm, any(u not in norm.nodes for u in add.users)
    norm = rms_norm(v)
    if not norm:
        return _why_no_norm(v, norm)
    if norm.residual is None:
        return None, None, norm, any(u not in norm.nodes for u in v.users)
    if len(v.users) != 1:  # vLLM's fused_add_rms_norm (or an in-place kernel) adds the residual itself
        return Miss(_second_user(ar, v), v)
    return None, norm.residual, norm, norm.residual_out is not None and bool(norm.residual_out.users)


def _backend(family: Family, ar: AllReduce, norm: Norm, site_quant, prefer: str,
             reasons: list[str]) -> backends.Choice:
    """The selector's choice for *family* at this site (:func:`backends.choose` at compile
    time; its backend None: none runs it here, the reason appended)."""
    choice = backends.choose(compile_time_call(family.variant, ar, norm, site_quant), prefer)
    if choice.backend is None:
        reasons.append(choice.why)
    return choice


def compile_time_call(variant: str, ar: AllReduce, norm=None, found_quant=None) -> backends.Call:
    """The selector's view of a graph site: the token count when the graph's shape is
    static (every call then has it), else None (decided per call)."""
    v = val(ar.input)
    lead = [int(d) if isinstance(d, int) else None for d in v.shape[:-1]]
    tokens = None if None in lead else int(torch.Size(lead).numel())
    try:
        world = groups.world_size(ar.group)
    except Exception:  # noqa: BLE001 - unresolvable at compile time: decided per call
        world = 0
    spec = variants.get(variant)
    block = None
    if found_quant is not None and isinstance(spec.block, str):
        block = found_quant.params.get(spec.block)
    form = found_quant.params.get("form") if found_quant is not None else None
    return backends.Call(
        variant=variant,
        device=backends.device_kind(v.device),
        dtype=v.dtype,
        hidden=int(v.shape[-1]),
        world_size=world,
        tokens=tokens,
        flags=norm.flags if norm is not None else variants.Flags(),
        group_size=block,
        table=calibrate.table_for_site(ar.group, world, variant, int(v.shape[-1]), backends.device_kind(v.device),
                                       v.dtype),
        token_range=None if tokens is not None else compile_range.current(),
        form=form or None,
    )


def _second_user(ar: AllReduce, v: Node) -> str:
    names = ", ".join(short(u) for u in v.users)
    return f"all-reduce output {v.name} has {len(v.users)} users ({names}): a second user blocks fusion"


def _why_no_norm(v: Node, miss: Miss) -> Miss:
    """Why the reduced value *v* reaches no norm, naming the op that stands in the way."""
    users = list(v.users)
    if len(users) > 1 and any(residual_add_like(u) for u in users):
        names = ", ".join(short(u) for u in users)
        return Miss(f"all-reduce output {v.name} has {len(users)} users ({names}): a second user blocks fusion", v)
    if len(users) == 1 and miss.node is not users[0]:  # else the recognizer refused that very op: keep its reason
        return Miss(f"all-reduce output feeds {short(users[0])}, not a residual add or RMSNorm", users[0])
    return Miss(miss.reason, miss.node or v)


def residual_add_like(node: Node) -> bool:
    return node.op == "call_function" and node.target is torch.ops.aten.add.Tensor
