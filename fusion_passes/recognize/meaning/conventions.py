"""Hypotheses: what a candidate chain might compute, as the canonical epilogue computes it.

A :class:`NormH` is one all-reduce -> [+ residual] -> RMSNorm reading (which leaf is the
residual and which the weight, eps, and the convention flags); a :class:`QuantH` one
quantization of the norm output (kind, group, FP8 form, scale leaf). :func:`norm_hypotheses`
and :func:`quant_hypotheses` enumerate the readings the region's structure allows;
:func:`canonical_norm` / :func:`canonical_quant` compute each with
:mod:`fusion_passes.epilogue` / :mod:`fusion_passes.fp8_forms`. Leaves are referred to by
index into the region's ``known`` list, so a verdict carries over to every chain of the
same shape.
"""

from __future__ import annotations

import dataclasses
import itertools

import torch
from torch.fx import Node

from fusion_passes import epilogue, variants
from fusion_passes import fp8_forms
from fusion_passes.recognize.fx import val
from fusion_passes.recognize.meaning.region import shape_of

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2)


@dataclasses.dataclass(frozen=True)
class NormH:
    """``residual`` / ``weight``: indices into ``known`` (None: absent)."""

    residual: int | None
    weight: int | None
    eps: float
    gemma: bool = False
    weight_in_fp32: bool = True
    residual_in_fp32: bool = False


@dataclasses.dataclass(frozen=True)
class QuantH:
    """``kind``: ``"fp8_static"``, ``"fp8_dynamic"`` or ``"nvfp4"``; ``group``: elements per
    dynamic scale (the hidden size: per token; None: per tensor); ``scale``: the static
    scale / NVFP4 global scale as a ``known`` index, or a float constant; ``how``: the
    static form (one of ``fp8_forms.STATIC``); ``form``: the dynamic FP8 form."""

    kind: str
    dtype: torch.dtype | None = None
    fp8_max: float = 448.0
    group: int | None = None
    form: fp8_forms.Form | None = None
    scale: int | float | None = None
    scale_ub: int | None = None
    how: str = ""


def _is_gemma_weight(n: Node) -> Node | None:
    """``1 + w`` / ``1.0 + w.float()``: the raw weight ``w``, else None."""
    if getattr(n, "op", None) != "call_function" or str(n.target) not in ("aten.add.Tensor", "aten.add.Scalar"):
        return None
    a, b = n.args[:2]
    base = b if a == 1 else a if b == 1 else None
    if isinstance(base, Node) and str(base.target) in ("prims.convert_element_type.default", "aten._to_copy.default"):
        base = base.args[0]
    return base if isinstance(base, Node) else None


def norm_hypotheses(root: Node, known: list[Node], eps_candidates: list[float]):
    """Every reading of the norm the region's leaves allow, most likely first."""
    shape, dtype = shape_of(root), val(root).dtype
    hidden = shape[-1]
    residuals = [i for i, n in enumerate(known) if _tensor_like(n, shape, dtype)] or [None]
    weights: list[tuple[int | None, bool]] = []
    for i, n in enumerate(known):
        v = val(n)
        if isinstance(v, torch.Tensor) and shape_of(n) == (hidden,) and v.dtype.is_floating_point:
            raw = _is_gemma_weight(n)
            if raw is not None and raw in known:
                weights.append((known.index(raw), True))
            weights.append((i, False))
    weights.append((None, False))
    low = dtype in (torch.bfloat16, torch.float16)
    for res, (w, gemma), eps in itertools.product(residuals, weights, eps_candidates):
        for w_fp32 in ((True, False) if (w is not None and low and not gemma) else (True,)):
            for r_fp32 in ((False, True) if res is not None and low else (False,)):
                yield NormH(res, w, eps, gemma, w_fp32, r_fp32)


def _tensor_like(n: Node, shape: tuple, dtype) -> bool:
    v = val(n)
    return isinstance(v, torch.Tensor) and shape_of(n) == shape and v.dtype == dtype


def canonical_norm(h: NormH, env: dict, root: Node, known: list[Node]):
    """``(norm_out, sum, normed32)`` of the reading on the probe values in *env*; ``normed32``
    is the fp32 ``x * rsqrt(mean(x^2) + eps)`` every conforming chain computes on the way
    (the witness that its rounding is the epilogue's, below the output dtype's resolution)."""
    x = env[root]
    res = env[known[h.residual]] if h.residual is not None else None
    w = env[known[h.weight]] if h.weight is not None else None
    norm, summed = epilogue.add_rms_norm(x, res, w, h.eps, gemma=h.gemma, weight_in_fp32=h.weight_in_fp32,
                                         residual_in_fp32=h.residual_in_fp32)
    x32 = (x.to(torch.float32) + res.to(torch.float32)) if h.residual_in_fp32 and res is not None \
        else summed.to(torch.float32)
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + h.eps)
    return norm, summed, normed


# ----------------------------------------------------------------------------------- quant

_DYNAMIC_FORMS = (
    # (invert, precision, apply, safe_recip)
    (False, "f32", "recip", False), (False, "f32", "div", False), (False, "input", "div", False),
    (False, "f32", "recip", True), (False, "input", "recip", False),
    (True, "f32", "mul", False), (True, "f64", "mul", False),
)


def quant_hypotheses(y: Node, hidden: int, facts: "QuantFacts"):
    """Every reading of the quantization of norm output *y* the structure allows (NVFP4
    first when the structure looks like it: its FP8 block scales would also read as FP8)."""
    if facts.e2m1:
        for gs in facts.scales:
            if not isinstance(gs, float):
                yield QuantH("nvfp4", scale=gs)
    for dtype, m in itertools.product(facts.fp8_dtypes, facts.fp8_maxes):
        for scale in facts.scales:
            for how in fp8_forms.STATIC:
                yield QuantH("fp8_static", dtype, m, scale=scale, how=how)
        for group in facts.groups:
            for form in _forms(facts):
                for ub in ([None] + facts.ubs if group == hidden else [None]):
                    yield QuantH("fp8_dynamic", dtype, m, group=group, form=form, scale_ub=ub)


def _forms(facts: "QuantFacts"):
    mins = sorted({0.0, *facts.small})
    for (invert, precision, apply, safe), pow2 in itertools.product(_DYNAMIC_FORMS, facts.pow2):
        for amax_min, scale_min in itertools.product(mins, [0.0] if invert else mins):
            for at_input in ((False, True) if amax_min else (False,)):
                yield fp8_forms.Form(invert, precision, apply, safe, pow2, amax_min, scale_min, at_input)
    yield fp8_forms.Form(apply="div", zero_amax_one=True)  # transformers' quantize_fp8_per_row


@dataclasses.dataclass
class QuantFacts:
    """What the quant part's structure says: candidate FP8 dtypes and maxima, scale leaves
    and constants, dynamic group sizes, upper bounds, small constants (floors), whether it
    rounds to a power of two, and whether it looks like E2M1 (NVFP4)."""

    fp8_dtypes: list = dataclasses.field(default_factory=list)
    fp8_maxes: list = dataclasses.field(default_factory=list)
    scales: list = dataclasses.field(default_factory=list)
    groups: list = dataclasses.field(default_factory=list)
    ubs: list = dataclasses.field(default_factory=list)
    small: list = dataclasses.field(default_factory=list)
    pow2: list = dataclasses.field(default_factory=lambda: [""])
    e2m1: bool = False


def canonical_quant(h: QuantH, y: torch.Tensor, env: dict, known: list[Node]):
    """``(q, scales, scaled32)`` of the reading for norm output *y* (scales None for static;
    ``scaled32``: the fp32 value before the clamp, the witness of the scale's rounding)."""
    def leaf(i):
        return env[known[i]] if isinstance(i, int) else torch.tensor([i], dtype=torch.float32)

    if h.kind == "fp8_static":
        form = fp8_forms.static_form(h.how)
        x = fp8_forms.scaled(y, leaf(h.scale).to(torch.float32), form)
        # input_product: the chain's rounded product is an activation-dtype node (exact: x
        # already holds activation-dtype values)
        witness = x.to(y.dtype) if form.input_product else x
        return x.clamp(-h.fp8_max, h.fp8_max).to(h.dtype), None, witness
    if h.kind == "fp8_dynamic":
        ub = leaf(h.scale_ub) if h.scale_ub is not None else None
        return fp8_forms.quantize_with_scaled(y, h.group, h.dtype, h.fp8_max, h.form, ub)
    if y.dim() != 2 or y.dtype not in variants.FP4_INPUT_DTYPES or y.shape[-1] % variants.NVFP4_BLOCK:
        return None, None, None
    packed, scales = epilogue.nvfp4(y, leaf(h.scale).reshape(1), swizzle=False)
    return packed, scales, _nvfp4_scaled(y, leaf(h.scale).reshape(1))


def _nvfp4_scaled(y: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """NVFP4's fp32 scaled value before the clamp to +-6 (the steps of epilogue.nvfp4)."""
    x = y.reshape(-1, y.shape[-1] // variants.NVFP4_BLOCK, variants.NVFP4_BLOCK)
    gs = global_scale.to(torch.float32)
    amax = x.abs().amax(dim=-1, keepdim=True).to(torch.float32)
    s = (gs * (amax * (1.0 / epilogue.E2M1_MAX))).clamp(-epilogue.E4M3_MAX, epilogue.E4M3_MAX)
    s32 = s.to(torch.float8_e4m3fn).to(torch.float32)

    def recip(t):
        return 1.0 / (t + (t == 0) * 1e8)

    return x.to(torch.float32) * recip(s32 * recip(gs))


def decode_e2m1(packed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Packed E2M1 codes (two per byte, low nibble first) -> their values (code 8: -0.0)."""
    codes = torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(*packed.shape[:-1], -1)
    mag = codes & 7
    m = mag.to(torch.float32)
    small = m * 0.5  # codes 0, 1: 0, 0.5
    e = torch.div(mag, 2, rounding_mode="floor").to(torch.float32)
    big = torch.exp2(e - 1) * (1.0 + 0.5 * (mag & 1).to(torch.float32))  # codes 2..7
    value = torch.where(mag < 2, small, big)
    return torch.where((codes & 8) != 0, -value, value).to(dtype)
