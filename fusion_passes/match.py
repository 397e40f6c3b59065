"""Match: from each all-reduce, walk to its norm and pick the catalogue family.

The walk is dialect-neutral: it speaks only of the roles :mod:`fusion_passes.recognize`
produces. A :class:`Site` is a complete match, ready to rewrite; anything else is a
:class:`~fusion_passes.recognize.Miss` with the reason and the blocking node.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.fx import Node

from fusion_passes import backends, groups
from fusion_passes.patterns import CATALOGUE, Family
from fusion_passes.recognize import AllReduce, Miss, Norm, residual_add, rms_norm, short, val


@dataclasses.dataclass
class Site:
    """One all-reduce -> [add] -> norm chain and the family it matched."""

    ar: AllReduce
    norm: Norm
    family: Family
    backend: str
    add: Node | None = None  # the aten add of the residual (plain dialect)
    residual: Node | None = None

    @property
    def removed(self) -> set[Node]:
        """Every node the fused op replaces."""
        return {*self.ar.nodes, *self.norm.nodes, *([self.add] if self.add is not None else [])}


def find_site(ar: AllReduce, prefer_backend: str = "auto") -> Site | Miss:
    """The fusable chain after *ar*, or why there is none."""
    v = ar.value
    if not v.users:
        return Miss(f"all-reduce {ar.node.name} result is unused", ar.node)
    add = residual = None
    found = residual_add(v)
    if isinstance(found, Miss):
        return found
    if found is not None:
        add, residual = found
        norm = rms_norm(add)
        if not norm:
            return Miss(f"residual add {add.name} does not feed an RMSNorm: {norm.reason}", norm.node or add)
        outside = [u for u in add.users if u not in norm.nodes]
        residual_out = bool(outside)
    else:
        norm = rms_norm(v)
        if not norm:
            return Miss(_why_no_norm(v, norm), norm.node or v)
        if norm.residual is not None:  # vLLM's fused_add_rms_norm adds the residual itself
            residual = norm.residual
            if len(v.users) != 1:
                return Miss(_second_user(ar, v), v)
            residual_out = norm.residual_out is not None and bool(norm.residual_out.users)
        else:
            residual_out = any(u not in norm.nodes for u in v.users)
    has_residual = residual is not None
    family = next(
        (f for f in CATALOGUE if f.residual == has_residual and f.residual_out in (None, residual_out)),
        None,
    )
    if family is None:  # the catalogue covers every shape found above; a gap is a bug
        return Miss(f"no catalogue family for residual={has_residual} residual_out={residual_out}", v)
    call = compile_time_call(family.variant, ar)
    try:
        backend = backends.select(call, prefer_backend)
    except RuntimeError as e:
        return Miss(str(e), ar.node)
    return Site(ar, norm, family, backend, add, residual)


def compile_time_call(variant: str, ar: AllReduce) -> backends.Call:
    """The selector's view of a graph site (token count unknown until run time)."""
    v = val(ar.input)
    try:
        world = groups.world_size(ar.group)
    except Exception:  # noqa: BLE001 - unresolvable at compile time: decided per call
        world = 0
    return backends.Call(
        variant=variant,
        device=backends.device_kind(v.device),
        dtype=v.dtype,
        hidden=int(v.shape[-1]),
        world_size=world,
    )


def _second_user(ar: AllReduce, v: Node) -> str:
    names = ", ".join(short(u) for u in v.users)
    return f"all-reduce output {v.name} has {len(v.users)} users ({names}): a second user blocks fusion"


def _why_no_norm(v: Node, miss: Miss) -> str:
    users = list(v.users)
    if len(users) > 1 and any(residual_add_like(u) for u in users):
        return f"all-reduce output {v.name} has {len(users)} users ({', '.join(short(u) for u in users)}): a second user blocks fusion"
    if len(users) == 1:
        return f"all-reduce output feeds {short(users[0])}, not a residual add or RMSNorm"
    return miss.reason


def residual_add_like(node: Node) -> bool:
    return node.op == "call_function" and node.target is torch.ops.aten.add.Tensor
