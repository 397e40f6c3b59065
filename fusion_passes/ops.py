"""The fused ops: the contract between the passes and the backends.

One custom op per entry of :data:`fusion_passes.variants.VARIANTS`, defined from it:
``torch.ops.fusion_passes.allreduce_<variant>``. They are functional (no mutation, no
aliasing), have fake implementations for tracing, and return what the unfused chain
returned, so consumers of the rewritten graph need no change. Their arguments are
:data:`fusion_passes.variants.SIGNATURE` with the variant's quant arguments in place of
``QUANT``; for example::

    allreduce_add_rmsnorm(input, residual, weight, eps, group, gemma=False,
                          weight_in_fp32=True, backend="auto", residual_in_fp32=False)
    -> (norm_out, residual_out)

    allreduce_add_rmsnorm_fp8_per_token(input, residual, weight, eps, group, scale_ub=None,
        fp8_dtype=float8_e4m3fn, gemma=False, weight_in_fp32=True, return_norm=False,
        backend="auto", residual_in_fp32=False)
    -> (q, scales[..., 1], residual_out, norm_out)

A quant op returns its quant outputs (``q`` and, but for static FP8, ``scales``), then
``residual_out`` and ``norm_out``, an empty ``[0]`` tensor unless ``return_norm`` (the
"Out" families: a second consumer also reads the norm output). ``print(describe())``
lists every op's schema.

One generic body runs every op: bind and check the arguments
(:mod:`fusion_passes.arguments`), resolve the sentinels, let the selector pick a backend
for the call (:func:`fusion_passes.backends.choose`), and hand it ONE
:class:`~fusion_passes.variants.FusedArgs`. Where the selector's rule is a fallback (an
option argument the chosen backend does not compute, arguments it declines), the call runs
on the reference backend (logged once).
"""

from __future__ import annotations

import logging

import torch

from fusion_passes import _compat, arguments, backends, groups, variants
from fusion_passes.variants import Flags, FusedArgs, FusedOutputs, Variant

VARIANTS = variants.NAMES
"""Every variant's name (the backends' name for it)."""

_log = logging.getLogger("fusion_passes")
_warned_fallback: set[tuple[str, str, str]] = set()


def call_for(variant: str, input: torch.Tensor, group: str, *, flags: Flags | None = None,
             group_size: int | None = None) -> backends.Call:
    """The selector's view of one call (sizes from the live tensor, world size resolved)."""
    return backends.Call(
        variant=variant,
        device=backends.device_kind(input.device),
        dtype=input.dtype,
        hidden=input.shape[-1],
        tokens=input.numel() // input.shape[-1],
        world_size=groups.world_size(group),
        single_node=groups.is_single_node(group) if input.is_cuda else True,
        flags=flags if flags is not None else Flags(),
        group_size=group_size,
    )


def _backend(spec: Variant, args: FusedArgs, prefer: str, options: frozenset[str]):
    """The backend that runs this call: the selector's choice (:func:`backends.choose`, at
    run time), which names the reference backend where the chosen one does not compute the
    call's options or declines its arguments (logged once per backend, variant and rule)."""
    world = groups.world_size(args.group)
    single_node = groups.is_single_node(args.group) if args.input.is_cuda else True
    call = backends.selector.call_of(spec.name, args, world_size=world, single_node=single_node, options=options)
    choice = backends.choose(call, prefer, run_time=True)
    if choice.backend is None:
        raise RuntimeError(choice.why)
    if choice.fallback and (choice.rule, spec.name, choice.why) not in _warned_fallback:
        _warned_fallback.add((choice.rule, spec.name, choice.why))
        _log.warning("fusion_passes: %s runs %s on the reference backend (%s): %s",
                     prefer if prefer != "auto" else "the selector", spec.name, choice.rule, choice.why)
    return backends.get(choice.backend)


def _pack(spec: Variant, outs: FusedOutputs, args: FusedArgs) -> tuple[torch.Tensor, ...]:
    """The backend's outputs as the op's output tuple (``spec.output_names``)."""
    if spec.kind is None:
        return outs.norm_out, outs.residual_out
    values = {"residual_out": outs.residual_out, "q": outs.q, "scales": outs.scales,
              "norm_out": outs.norm_out if args.return_norm and outs.norm_out is not None
              else args.input.new_empty((0,))}
    for o in spec.outputs:
        if o.column_major is not None and args.quant[o.column_major]:
            # the token dim contiguous, exactly as the fake (and vLLM) lay it out
            values[o.name] = values[o.name].transpose(-2, -1).contiguous().transpose(-2, -1)
    return tuple(values[n] for n in spec.output_names)


def run(spec: Variant, *args, **kwargs) -> tuple[torch.Tensor, ...]:
    """The eager body of every fused op."""
    a = arguments.bind(spec, args, kwargs)
    arguments.check(spec, a)
    quant = arguments.resolve(spec, a)
    fused = arguments.fused_args(spec, a, quant)
    impl = _backend(spec, fused, a["backend"], arguments.options(spec, a, quant))
    return _pack(spec, impl.run(spec.name, fused), fused)


def fake(spec: Variant, *args, **kwargs) -> tuple[torch.Tensor, ...]:
    """The fake (meta) body of every fused op: the outputs' shapes, dtypes and layouts."""
    a = arguments.bind(spec, args, kwargs)
    arguments.check(spec, a)
    quant = arguments.resolve(spec, a)
    x = a["input"]
    norm = x.new_empty(x.shape, dtype=arguments.norm_dtype(x, a["weight"], arguments.flags(a)))
    res = torch.empty_like(x, dtype=torch.float32 if a["carry_fp32"] else x.dtype)
    if spec.kind is None:
        return norm, res
    values = {"residual_out": res, "norm_out": norm if a["return_norm"] else x.new_empty((0,))}
    for o in spec.outputs:
        shape, dtype = tuple(o.shape(x, quant)), o.dtype_for(quant)
        if o.column_major is not None and quant[o.column_major]:
            values[o.name] = x.new_empty((*shape[:-2], shape[-1], shape[-2]), dtype=dtype).transpose(-2, -1)
        else:
            values[o.name] = x.new_empty(shape, dtype=dtype)
    return tuple(values[n] for n in spec.output_names)


def _define(spec: Variant):
    """Register ``fusion_passes::<spec.op>`` with its schema, eager body and fake."""

    def body(*args, **kwargs):
        return run(spec, *args, **kwargs)

    def fake_body(*args, **kwargs):
        return fake(spec, *args, **kwargs)

    body.__name__ = fake_body.__name__ = spec.op
    body.__doc__ = f"all-reduce -> [+ residual] -> RMSNorm{' -> ' + spec.kind if spec.kind else ''}: {spec.schema()}"
    op = torch.library.custom_op(f"fusion_passes::{spec.op}", body, mutates_args=(), schema=spec.schema())
    op.register_fake(fake_body)
    return op


_DEFINED = {spec.name: _define(spec) for spec in variants.VARIANTS}
OPS: dict[str, _compat.OpOverload] = {
    name: getattr(torch.ops.fusion_passes, variants.BY_NAME[name].op).default for name in _DEFINED
}
"""Variant name -> its op overload (what the rewrite inserts)."""


def describe() -> str:
    """Every fused op's schema, one per line."""
    return "\n".join(str(op._schema) for op in OPS.values())


__all__ = ["OPS", "VARIANTS", "call_for", "describe", "fake", "run"]
