"""The ONE selector: which backend runs a fused call, and the rule that decided.

Every backend policy is here, and a :class:`~fusion_passes.backends.contract.Call` carries
all it reads. :func:`choose` answers a :class:`Choice`: the backend (None: none, the graph
site stays unfused) and the rule, a short stable string the report keeps
(``SiteReport.rule``). The rules, in the order they are asked:

``option``
    the ``backend`` option names a backend, and it can run the call (else ``option:
    cannot run`` and no backend: the error names why).
``auto: first able``, ``gpu: shipped table``, ``gpu: measured table``, ``auto: reference``
    ``backend="auto"``: the first backend in :data:`~fusion_passes.backends.registry.ORDER`
    whose gate (``Backend.unsupported``) admits the call. A gate's :class:`Slower` decline
    (measured slower than the unfused chain) counts at compile time only (see :func:`select`).
    The triton backend's crossover table is named (``Call.table``, else the shipped one).
``gpu: fp8 form``, ``gpu: no fused kernel``
    compile time, ``auto``, on a GPU: a site whose FP8 quant follows another project's form
    (:mod:`fusion_passes.fp8_forms`, which only the reference backend computes), or that
    only the reference backend would run, stays unfused: there the reference backend is
    the unfused chain run eagerly inside one op, slower than Inductor's compiled chain. (A
    process group not resolvable at compile time, world size 0, is left to the run-time
    choice.)
``fallback: options``
    the call sets an option argument (``fusion_passes.variants.Arg.option``) that the
    chosen backend does not compute (``quant_options``): the reference backend runs it.
``<backend> declined``
    the chosen backend's kernel would compute this call's arguments differently (its
    ``declines(call)``: a vendor kernel's rounding, a scale upper bound it has no slot for,
    the triton kernel's quant group sizes): the reference backend runs it.

A compile-time flag is decided here too: :func:`carries_fp32` (``flags: carry_fp32``)
says whether a fused op may hand the next site its unrounded fp32 sum.

A backend's own ``run`` asks :func:`for_run` before its kernel, so a direct call (the
tests, benchmarks) is decided by the same ``declines``.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from fusion_passes import variants
from fusion_passes.backends.contract import Call, Slower
from fusion_passes.backends.registry import ORDER, get
from fusion_passes.variants import FusedArgs

OPTION = "option"
OPTION_CANNOT = "option: cannot run"
AUTO = "auto: first able"
AUTO_REFERENCE = "auto: reference"
SHIPPED = "gpu: shipped table"
MEASURED = "gpu: measured table"
GPU_FORM = "gpu: fp8 form"
GPU_NO_KERNEL = "gpu: no fused kernel"
CARRY = "flags: carry_fp32"
CARRY_NO_KERNEL = "flags: no kernel carries fp32"
OPTIONS = "fallback: options"
DECLINED = "declined"  # "<backend> declined"


@dataclasses.dataclass(frozen=True)
class Choice:
    """What the selector chose for a call: the backend (None: none here), the rule that
    decided (one of this module's rule strings), and why, where something was declined."""

    backend: str | None
    rule: str
    why: str = ""

    @property
    def fallback(self) -> bool:
        """Whether the chosen backend was replaced by the reference backend for this call."""
        return self.rule == OPTIONS or self.rule.endswith(" " + DECLINED)


def why_not(name: str, call: Call) -> str | None:
    """Why backend *name*'s gate refuses *call* (``None`` if it admits it), never raising."""
    try:
        backend = get(name)
    except Exception as e:  # noqa: BLE001 - an unimportable backend is just unavailable
        return f"{name} unavailable: {e}"
    if call.variant not in backend.variants:
        return f"{name} does not implement {call.variant}"
    try:
        return backend.unsupported(call)
    except Exception as e:  # noqa: BLE001 - e.g. a device query on a machine without that device
        return f"{name} cannot tell whether it runs this call: {type(e).__name__}: {e}"


@functools.lru_cache(maxsize=4096)
def select(call: Call, prefer: str = "auto", run_time: bool = False) -> str:
    """The backend whose gate admits *call*: *prefer* if given and able, else the first able
    in ORDER (the ``option`` and ``auto`` rules; :func:`choose` adds the others).

    ``run_time``: the call is made inside a fused op, where the unfused chain is no longer
    an alternative, so a :class:`Slower` decline does not count (on a GPU the measured
    kernel, a few percent behind Inductor's chain at worst, beats the eager reference). At
    compile time it does: the site then stays unfused and Inductor compiles the chain.
    """

    def able(name: str) -> bool:
        reason = why_not(name, call)
        return reason is None or (run_time and isinstance(reason, Slower))

    if prefer != "auto":
        if not able(prefer):
            raise RuntimeError(f"fusion_passes: backend {prefer!r} cannot run {call}: {why_not(prefer, call)}")
        return prefer
    for name in ORDER:
        if able(name):
            return name
    raise RuntimeError(f"fusion_passes: no backend can run {call}")  # reference runs all


def choose(call: Call, prefer: str = "auto", run_time: bool = False) -> Choice:
    """The backend that runs *call* (``run_time``: inside a fused op; else a graph site)
    and the rule that decided it (the module docstring lists them in order). Not cached
    itself: the gates' answers are (:func:`select`), and what it adds is a few lookups."""
    try:
        name = select(call, prefer, run_time)
    except RuntimeError as e:
        return Choice(None, OPTION_CANNOT if prefer != "auto" else AUTO, str(e))
    if not run_time and prefer == "auto" and call.device != "cpu":
        site = _gpu_site(call, name)
        if site is not None:
            return site
    impl = get(name)
    if call.options and not call.options <= set(getattr(impl, "quant_options", ())):
        return Choice("reference", OPTIONS, f"{name} cannot take {sorted(call.options)} for {call.variant}")
    why = declined(impl, call)
    if why is not None:
        return Choice("reference", f"{name} {DECLINED}", why)
    return Choice(name, OPTION if prefer != "auto" else _auto_rule(name, call))


def _gpu_site(call: Call, name: str) -> Choice | None:
    """The compile-time GPU policies: a site that no fused kernel would run stays unfused."""
    if call.form:
        return Choice(None, GPU_FORM, f"no fused kernel computes the FP8 form {call.form!r} ({call.variant})")
    if name == "reference" and call.world_size:
        reasons = "; ".join(f"{n}: {why}" for n in ORDER if n != "reference" for why in [why_not(n, call)] if why)
        return Choice(None, GPU_NO_KERNEL, f"no fused kernel runs {call.variant} on {call.device} here: {reasons}")
    return None


def carries_fp32(call: Call, prefer: str = "auto") -> Choice:
    """Compile time, a compile-time flag: whether the previous fused op may hand this site
    its unrounded fp32 sum (*call* with ``flags.carry_fp32``): where a backend's gate admits
    that call, and on a GPU only a kernel's (the reference backend there is the eager
    chain, which the site would not run). Backend None: the site reads the rounded sum."""
    try:
        name = select(call, prefer)
    except RuntimeError as e:
        return Choice(None, CARRY_NO_KERNEL, str(e))
    if name == "reference" and call.device != "cpu":
        return Choice(None, CARRY_NO_KERNEL, f"only the reference backend runs {call.variant} with carry_fp32 here")
    return Choice(name, CARRY)


def _auto_rule(name: str, call: Call) -> str:
    if name == "reference":
        return AUTO_REFERENCE
    source = table_source(name, call)
    if source is None:
        return AUTO
    return MEASURED if source.startswith("measured") else SHIPPED


def declined(backend, call: Call) -> str | None:
    """Why *backend*'s kernel would compute *call*'s arguments differently (its
    ``declines``), or None; a backend without ``declines`` declines nothing."""
    declines = getattr(backend, "declines", None)
    return None if declines is None else declines(call)


def table_source(name: str, call: Call) -> str | None:
    """Which crossover table decides *call* on backend *name* (``"shipped table"`` or
    ``"measured table FILE"``), or None for a backend without one."""
    try:
        source = getattr(get(name), "table_source", None)
        return None if source is None else source(call)
    except Exception:  # noqa: BLE001 - an unimportable backend has no table
        return None


def device_kind(device: torch.device) -> str:
    """``cpu``, ``cuda`` or ``rocm`` (ROCm builds report their GPUs as ``cuda``)."""
    if device.type == "cuda" and torch.version.hip is not None:
        return "rocm"
    return device.type


def _fact(value):
    """A quant argument as the selector keeps it: a tensor only as given (True)."""
    return True if isinstance(value, torch.Tensor) else value


def call_of(variant: str, a: FusedArgs, *, world_size: int, single_node: bool = True,
            options: frozenset[str] = frozenset()) -> Call:
    """The selector's view of one bound call: sizes from the live tensor, the arguments a
    backend's ``declines`` reads, the quant group size (where the variant's scale block is
    an argument)."""
    x = a.input
    block = variants.get(variant).block
    return Call(
        variant=variant, device=device_kind(x.device), dtype=x.dtype, hidden=x.shape[-1],
        tokens=x.numel() // x.shape[-1], world_size=world_size, single_node=single_node,
        flags=a.flags, group_size=a.quant.get(block) if isinstance(block, str) else None,
        options=options, residual=a.residual is not None,
        weight_dtype=None if a.weight is None else a.weight.dtype,
        residual_dtype=None if a.residual is None else a.residual.dtype,
        quant_args=tuple(sorted((k, _fact(v)) for k, v in a.quant.items())),
    )


def for_run(backend, variant: str, a: FusedArgs) -> Choice:
    """A backend's own ``run``: itself, or the reference backend where it declines the call."""
    call = call_of(variant, a, world_size=0)  # declines never read the world size
    why = declined(backend, call)
    return Choice("reference", f"{backend.name} {DECLINED}", why) if why is not None else Choice(backend.name, OPTION)
