"""FP8 quant conventions: the ways real code turns an amax into a scale and applies it.

:mod:`fusion_passes.epilogue` computes each fused variant in vLLM's order. Other projects
compute the same quantization with other roundings, and a fused op must reproduce the
chain it replaces bit for bit, so each convention is a :class:`Form`:

==================================  =====================================================
vLLM ``QuantFP8.forward_native``    ``s = max(amax/M, 1/(M*512)); q = y * (1/s)``
vLLM ``_quantize_group_native``     ``s = max(amax/M, 1/(M*512)); q = y / s``
torchao float8 training             ``inv = f32(M / max(f64(amax), 1e-12)); q = y * inv``
  (float8_utils.amax_to_scale)      (returns ``inv``; the rowwise recipe floors it to 2^k)
torchao inference                   ``s = f32(amax / M)`` computed in the input dtype;
  (quant_primitives)                ``q = y / s``
SGLang ``input_to_float8``          ``inv = M / max(amax, 1e-12); q = y * inv`` (returns 1/inv)
SGLang per-token-group reference    ``s = max(amax, 1e-10) / M`` (the floor in the input
                                    dtype); ``q = y / s``
transformers ``quantize_fp8_per_row`` ``s = where(amax > 0, amax, 1) / M``; ``q = y / s``
  (integrations/compressed_tensors.py)
SGLang ``native_static_quant_fp8``  static: ``q = f32(in_dtype(y * (1/s)))``, the product
  (its tests' 0-dim fp32 scale)     rounded to the activation dtype (``input_product``)
==================================  =====================================================

``y`` is the norm output upcast to fp32, ``M`` the largest FP8 value the chain clamps to,
``q = fp8(clamp(., -M, M))``. A form is written as a short string (the fused ops' ``form``
argument, ``""`` = the variant's own vLLM order): comma-separated flags and ``key=value``
pairs, e.g. ``"invert,f64,amax_min=1e-12"``. Every chain the recognizer accepts was checked
bit for bit against :func:`quantize` on probe inputs (:mod:`fusion_passes.recognize.meaning`).
"""

from __future__ import annotations

import dataclasses

import torch

APPLY = ("recip", "div", "mul")
PRECISION = ("f32", "f64", "input")
POW2 = ("", "ceil", "floor")
_FLAGS = ("invert", "safe_recip", "amax_min_input", "zero_amax_one", "input_product", "amax_f32")


@dataclasses.dataclass(frozen=True)
class Form:
    """One convention. ``invert``: the scale is ``M / amax`` (a multiplier) instead of
    ``amax / M``; ``precision``: the dtype the division is computed in (``"input"``: the
    activation dtype, then cast to fp32); ``apply``: ``y * (1/s)``, ``y / s`` or ``y * s``;
    ``safe_recip``: ``1/s`` taken as 0 where ``s == 0``; ``pow2``: the scale rounded up
    (``"ceil"``, UE8M0) or down (``"floor"``) to a power of two; ``amax_min``: a floor on
    the amax before the division; ``scale_min``: a floor on ``s`` after it (never with
    ``invert``); ``zero_amax_one``: an amax that is not positive (an all-zero row) taken
    as 1; ``input_product``: the scaled value rounded to the activation dtype before the
    clamp (``y * (1/s)`` of a bf16 / fp16 ``y`` and a 0-dim fp32 ``s``: torch's type
    promotion keeps that product in the activation dtype); ``amax_f32``: the chain upcasts
    before its amax (SGLang's ``input.abs().to(float32).amax()``): the same value in eager,
    but under Inductor's default compile the amax then reads the unrounded norm value
    (``quant_unrounded``) on the CPU too."""

    invert: bool = False
    precision: str = "f32"
    apply: str = "recip"
    safe_recip: bool = False
    pow2: str = ""
    amax_min: float = 0.0
    scale_min: float = 0.0
    amax_min_input: bool = False
    zero_amax_one: bool = False
    input_product: bool = False
    amax_f32: bool = False

    def __post_init__(self):
        if self.precision not in PRECISION or self.apply not in APPLY or self.pow2 not in POW2:
            raise ValueError(f"fusion_passes: bad FP8 form {self!r}")
        if self.invert != (self.apply == "mul"):
            raise ValueError(f"fusion_passes: FP8 form {self!r}: 'mul' applies exactly the inverted scale")

    def text(self) -> str:
        """The form as the fused ops take it (``parse(form.text()) == form``)."""
        parts = [name for name in _FLAGS if getattr(self, name)]
        parts += [v for v in (self.precision if self.precision != "f32" else "", self.apply
                              if self.apply not in ("recip", "mul") else "") if v]
        parts += [f"pow2={self.pow2}"] if self.pow2 else []
        parts += [f"{k}={getattr(self, k)!r}" for k in ("amax_min", "scale_min") if getattr(self, k)]
        return ",".join(parts)


# The static variant's forms: a given scale applied as y * (1/s) (vLLM), y / s, y * s (the
# scale given as its inverse), or y * (1/s) rounded to the activation dtype (SGLang's
# native static quant with a 0-dim scale).
_STATIC_FORMS = {"": Form(), "div": Form(apply="div"), "mul": Form(invert=True, apply="mul"),
                 "input_product": Form(input_product=True)}
STATIC = tuple(_STATIC_FORMS)


def parse(text: str) -> Form:
    """The :class:`Form` a form string names; ``""`` is vLLM's per-token / per-tensor order."""
    kw: dict = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        if key in _FLAGS and not value:
            kw[key] = True
        elif key in PRECISION and not value:
            kw["precision"] = key
        elif key == "div" and not value:
            kw["apply"] = "div"
        elif key == "pow2":
            kw["pow2"] = value
        elif key in ("amax_min", "scale_min"):
            kw[key] = float(value)
        else:
            raise ValueError(f"fusion_passes: unknown FP8 form part {part!r} in {text!r}")
    if kw.get("invert"):
        kw["apply"] = "mul"
    return Form(**kw)


def _scale(amax: torch.Tensor, in_dtype: torch.dtype, m: float, form: Form) -> torch.Tensor:
    """The scale (or with ``invert`` the multiplier) from an amax in the input dtype."""
    work = {"f32": torch.float32, "f64": torch.float64, "input": in_dtype}[form.precision]
    if form.amax_min and form.amax_min_input:
        amax = amax.clamp(min=form.amax_min)
    a = amax.to(work)
    if form.zero_amax_one:
        a = torch.where(a > 0, a, torch.ones_like(a))
    if form.amax_min and not form.amax_min_input:
        a = a.clamp(min=form.amax_min)
    s = (m / a if form.invert else a / m).to(torch.float32)
    if form.scale_min:
        s = s.clamp(min=form.scale_min)
    if form.pow2:
        rnd = torch.ceil if form.pow2 == "ceil" else torch.floor
        s = torch.exp2(rnd(torch.log2(s)))
    return s


def scaled(y: torch.Tensor, s: torch.Tensor, form: Form, y32: torch.Tensor | None = None) -> torch.Tensor:
    """``y32 <op> s`` in fp32, before the clamp: the value the FP8 cast rounds (with
    ``input_product`` rounded to ``y``'s dtype first, then back to fp32). *y32*: the norm
    value before its rounding to ``y``'s dtype, to scale instead of ``y`` (``quant_unrounded``)."""
    x = _scaled32(y.to(torch.float32) if y32 is None else y32, s, form)
    return x.to(y.dtype).to(torch.float32) if form.input_product else x


def _scaled32(y32: torch.Tensor, s: torch.Tensor, form: Form) -> torch.Tensor:
    if form.apply == "div":
        return y32 / s
    if form.apply == "mul":
        return y32 * s
    r = s.reciprocal()
    if form.safe_recip:
        r = torch.where(s > 0, r, torch.zeros_like(s))
    return y32 * r


def apply(y: torch.Tensor, s: torch.Tensor, m: float, dtype: torch.dtype, form: Form) -> torch.Tensor:
    """``fp8(clamp(y32 <op> s, -m, m))`` with the form's way of applying the scale."""
    return scaled(y, s, form).clamp(-m, m).to(dtype)


def quantize(y: torch.Tensor, group: int | None, dtype: torch.dtype, m: float, form: Form,
             scale_ub: torch.Tensor | None = None, y32: torch.Tensor | None = None,
             amax_unrounded: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic FP8 of *y* -> ``(q, scales)``; ``group``: elements per scale along the last dim
    (the hidden size: per token; None: one scale for the whole tensor). Scales are
    ``[..., H // group]`` (per token ``[..., 1]``, per tensor ``[1]``); ``scale_ub`` caps
    the amax (vLLM's per-token upper bound); *y32* as :func:`scaled`; the amax from *y32*
    where the form upcasts first (``amax_f32``) or *amax_unrounded* (the compile's device
    takes it there: ``epilogue.amax_reads_unrounded``)."""
    q, s, _ = quantize_with_scaled(y, group, dtype, m, form, scale_ub, y32, amax_unrounded)
    return q, s


def quantize_with_scaled(y, group, dtype, m, form, scale_ub=None, y32=None, amax_unrounded=False):
    """:func:`quantize` plus the fp32 scaled value before the clamp (``q, scales, scaled``)."""
    hidden = y.shape[-1]
    src = y32 if y32 is not None and (form.amax_f32 or amax_unrounded) else y  # what the amax reads
    if group is None:
        amax = src.abs().max().reshape(1)
        grouped = y
    else:
        grouped = y.reshape(*y.shape[:-1], hidden // group, group)
        amax = src.reshape(grouped.shape).abs().amax(dim=-1, keepdim=True)
    if scale_ub is not None:
        amax = amax.to(torch.float32).clamp(max=scale_ub)
    s = _scale(amax, y.dtype, m, form)
    x = scaled(grouped, s, form, None if y32 is None else y32.reshape(grouped.shape))
    q = x.clamp(-m, m).to(dtype).reshape(y.shape)
    return q, (s if group is None else s.reshape(*y.shape[:-1], hidden // group)), x


def static_form(how: str) -> Form:
    """The :class:`Form` of a static form string (one of :data:`STATIC`)."""
    if how not in _STATIC_FORMS:
        raise ValueError(f"fusion_passes: static FP8 form must be one of {STATIC}, got {how!r}")
    return _STATIC_FORMS[how]


def static(y: torch.Tensor, scale: torch.Tensor, m: float, dtype: torch.dtype, how: str = "",
           y32: torch.Tensor | None = None) -> torch.Tensor:
    """Static FP8 with a given scale: ``""`` = ``y * (1/s)`` (vLLM), ``"div"`` = ``y / s``,
    ``"mul"`` = ``y * s`` (the scale given as its inverse), ``"input_product"`` =
    ``y * (1/s)`` rounded to ``y``'s dtype before the clamp."""
    return scaled(y, scale.to(torch.float32), static_form(how), y32).clamp(-m, m).to(dtype)


def variant_quantize(variant: str, y: torch.Tensor, p, y32=None,
                     amax_unrounded: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A fused FP8 variant's quantization under its ``form`` argument: ``(q, scales | None)``
    from the variant's resolved quant arguments *p* (fusion_passes.variants). *y32*
    (``quant_unrounded``, Inductor's default compile): the codes are scaled from it, the
    scales come from *y*'s amax, a division in the activation dtype computed in fp32."""
    from fusion_passes.variants import fp8_max

    dtype, form = p["fp8_dtype"], p["form"]
    m = fp8_max(dtype)
    if variant == "add_rmsnorm_fp8_static":
        return static(y, p["scale"], m, dtype, form, y32), None
    form = parse(form)
    if y32 is not None and form.precision == "input":  # the compile divides the amax in fp32, unrounded
        form = dataclasses.replace(form, precision="f32")
    if variant == "add_rmsnorm_fp8_per_token":
        return quantize(y, y.shape[-1], dtype, m, form, p["scale_ub"], y32, amax_unrounded)
    if variant == "add_rmsnorm_fp8_per_tensor":
        return quantize(y, None, dtype, m, form, y32=y32, amax_unrounded=amax_unrounded)
    if variant == "add_rmsnorm_fp8_per_group":
        q, s = quantize(y, p["group_size"], dtype, m, form, y32=y32, amax_unrounded=amax_unrounded)
        if p["column_major"]:  # the token dim contiguous, as the variant's scales output
            s = s.transpose(-2, -1).contiguous().transpose(-2, -1)
        return q, s
    raise ValueError(f"fusion_passes: no FP8 form for {variant!r}")


__all__ = ["variant_quantize", "Form", "STATIC", "parse", "static_form", "quantize", "quantize_with_scaled",
           "static", "apply", "scaled"]
