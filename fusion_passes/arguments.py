"""The fused ops' arguments: binding, validation, the resolution of sentinels, and the
:class:`~fusion_passes.variants.FusedArgs` a backend receives.

Not the command line's argument types: those are ``fusion_passes.cli.arguments``
(fusion_passes/cli/arguments.py). Called by :mod:`fusion_passes.ops` (its one eager body and one fake
run :func:`bind`, :func:`check` and :func:`resolve`, so a bad call fails alike in both) and
by the Triton backend (:func:`norm_dtype`). Every rule here is generic over
:mod:`fusion_passes.variants`: a new variant needs no edit in this module.

Two meanings of "group" meet here: the ``group`` argument is the process group of the
all-reduce (``'c10d:<name>'`` or ``'vllm:<name>'``, :mod:`fusion_passes.groups`), while a
per-group quant's block of elements sharing one scale is its ``group_size`` (the
variant's ``block``).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from fusion_passes import epilogue, groups
from fusion_passes.variants import (
    FLAG_NAMES,
    REQUIRED,
    SCALE_MIN_KERNEL,
    SCALE_MIN_NATIVE,
    SENTINELS,
    Flags,
    FusedArgs,
    Variant,
)

_SHORT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def bind(spec: Variant, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Every argument of *spec*'s op by name, defaults filled in (as the schema binds them)."""
    params = spec.args
    if len(args) > len(params):
        raise TypeError(f"fusion_passes: {spec.op} takes {len(params)} arguments, got {len(args)}")
    unknown = kwargs.keys() - spec.arg_names
    if unknown:
        raise TypeError(f"fusion_passes: {spec.op} has no argument {sorted(unknown)}")
    out: dict[str, Any] = {}
    for i, a in enumerate(params):
        if i < len(args):
            out[a.name] = args[i]
        elif a.name in kwargs:
            out[a.name] = kwargs[a.name]
        elif a.default is REQUIRED:
            raise TypeError(f"fusion_passes: {spec.op} needs argument {a.name!r}")
        else:
            out[a.name] = a.default
    return out


def check(spec: Variant, a: Mapping[str, Any]) -> None:
    """Clear errors for bad input, naming the problem (never a silent wrong answer)."""
    x, residual, weight = a["input"], a["residual"], a["weight"]
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"fusion_passes: input must be [..., hidden] with hidden > 0, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"fusion_passes: input must be floating point, got {x.dtype}")
    for name in spec.tensor_args:
        t = a[name]
        if t is not None and t.device != x.device:
            raise ValueError(f"fusion_passes: {name} is on {t.device} but input is on {x.device}: "
                             "every tensor of a fused call must be on the input's device")
    hidden = x.shape[-1]
    # an fp32 residual (the previous site's carry_fp32 sum): added in fp32 (epilogue.add_residual)
    carried = residual is not None and residual.dtype == torch.float32
    if residual is not None and (residual.shape != x.shape or (residual.dtype != x.dtype and not carried)):
        raise ValueError(
            "fusion_passes: residual must match input in shape and dtype (or be fp32, added in fp32): "
            f"{tuple(residual.shape)}/{residual.dtype} vs {tuple(x.shape)}/{x.dtype}"
        )
    if weight is not None and tuple(weight.shape) != (hidden,):
        raise ValueError(f"fusion_passes: weight must be [{hidden}], got {tuple(weight.shape)}")
    groups.split(a["group"])
    if spec.kind is not None:
        _check_quant(spec, a)


def _check_quant(spec: Variant, a: Mapping[str, Any]) -> None:
    x = a["input"]
    if "fp8_dtype" in a and a["fp8_dtype"] not in epilogue.FP8_DTYPES:
        raise TypeError(f"fusion_passes: fp8_dtype must be one of {epilogue.FP8_DTYPES}, got {a['fp8_dtype']}")
    for q in spec.quant:
        if q.numel is not None and a[q.name] is not None and a[q.name].numel() != q.numel:
            raise ValueError(f"fusion_passes: {spec.name} needs a {q.numel}-element {q.name}, "
                             f"got {tuple(a[q.name].shape)}")
    block = a[spec.block] if isinstance(spec.block, str) else spec.block
    if isinstance(spec.block, str) and block <= 0:
        raise ValueError(f"fusion_passes: {spec.name} needs {spec.block} > 0, got {block}")
    if x.shape[-1] % block:
        raise ValueError(f"fusion_passes: {spec.name} needs hidden % {block} == 0, got hidden={x.shape[-1]}")
    if spec.input_dtypes is not None and x.dtype not in spec.input_dtypes:
        names = "/".join(_SHORT.get(d, str(d)) for d in spec.input_dtypes)
        raise TypeError(f"fusion_passes: {spec.name} quantizes {names} activations only, got {x.dtype}")
    for q in spec.quant:  # NaN or an infinity in a float argument makes every output NaN or 0
        if q.schema == "float" and isinstance(a[q.name], (int, float)) and not math.isfinite(a[q.name]):
            raise ValueError(f"fusion_passes: {spec.name} {q.name} must be a finite number, got {a[q.name]}")
    scale_min = a.get("scale_min")
    if scale_min is not None and scale_min < 0 and scale_min not in SENTINELS:
        raise ValueError(f"fusion_passes: {spec.name} scale_min must be >= 0 or a sentinel "
                         f"({', '.join(f'{v} = {n}' for v, n in SENTINELS.items())}), got {scale_min}")


def resolve(spec: Variant, a: Mapping[str, Any]) -> dict[str, Any]:
    """*spec*'s quant arguments from the bound arguments *a*, every sentinel replaced by
    the value it stands for (:mod:`fusion_passes.variants`)."""
    quant = {q.name: a[q.name] for q in spec.quant}
    scale_min = quant.get("scale_min")
    if scale_min == SCALE_MIN_NATIVE:
        quant["scale_min"] = epilogue.fp8_min_scaling_factor(quant["fp8_dtype"])
    elif scale_min == SCALE_MIN_KERNEL:
        if spec.kernel_scale_min is None:
            raise ValueError(f"fusion_passes: {spec.name} has no kernel scale floor (SCALE_MIN_KERNEL)")
        quant["scale_min"] = spec.kernel_scale_min(quant)
    return quant


def options(spec: Variant, a: Mapping[str, Any], quant: Mapping[str, Any]) -> frozenset[str]:
    """The option arguments whose resolved value differs from what their default resolves to
    (with the other arguments as given). ``Call.options`` carries them to the selector,
    which runs the call on the reference backend unless the chosen backend lists them in
    ``quant_options`` (rule ``fallback: options``, :mod:`fusion_passes.backends.selector`)."""
    out = set()
    for q in spec.quant:
        if not q.option or a[q.name] is q.default or a[q.name] == q.default:
            continue
        if resolve(spec, {**a, q.name: q.default})[q.name] != quant[q.name]:
            out.add(q.name)
    return frozenset(out)


def flags(a: Mapping[str, Any]) -> Flags:
    """The norm conventions among the bound arguments *a*."""
    return Flags(*(bool(a[name]) for name in FLAG_NAMES))


def fused_args(spec: Variant, a: Mapping[str, Any], quant: Mapping[str, Any]) -> FusedArgs:
    """What ``Backend.run`` receives for one call with bound arguments *a*."""
    return FusedArgs(a["input"].contiguous(), a["residual"], a["weight"], a["eps"], a["group"], flags(a),
                     quant, bool(a.get("return_norm", False)))


def norm_dtype(x: torch.Tensor, weight: torch.Tensor | None, f: Flags) -> torch.dtype:
    """The norm output's dtype: the activation's, unless the weight multiplies after the
    cast back (the Hugging Face order) or ``promote_out``, where type promotion decides."""
    if weight is None or f.gemma or (f.weight_in_fp32 and not f.promote_out):
        return x.dtype
    return torch.promote_types(weight.dtype, x.dtype)
