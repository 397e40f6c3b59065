"""The fused variants: ONE registry that the ops, the rewrite, the recognizers, the
catalogue and the backends read.

A variant is one fused op ``torch.ops.fusion_passes.allreduce_<name>``: all-reduce ->
[+ residual] -> RMSNorm [-> quant]. Every op takes the arguments of :data:`SIGNATURE`, in
that order, with the variant's own quant arguments where :data:`QUANT` stands. Adding a
quant format is one :class:`Variant` entry in :data:`VARIANTS` (plus its epilogue math in
:mod:`fusion_passes.epilogue`, its recognizer in :mod:`fusion_passes.recognize` (the module of its
quant kind) and its kernel where one exists); adding a norm-convention flag is one ``flag=True`` entry in
:data:`SIGNATURE` (plus its math and the backends' gates).

This module imports torch and the standard library only: everything else may import it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import torch

REQUIRED: Any = type("Required", (), {"__repr__": lambda self: "REQUIRED"})()
"""The default of an argument that has none."""

# ---------------------------------------------------------------------------------------
# Named values. A sentinel stands for a value computed from other arguments; each means
# the same thing in every variant that takes it, and no other variant value may equal it.
# ---------------------------------------------------------------------------------------

SCALE_MIN_NATIVE = -1.0
"""``scale_min`` sentinel: vLLM's native floor ``1 / (fp8_max * 512)`` of the variant's fp8
dtype (``_FP8_MIN_SCALING_FACTOR`` in vllm/model_executor/layers/quantization/input_quant_fp8.py,
what ``QuantFP8.forward_native`` clamps every dynamic scale to)."""

SCALE_MIN_KERNEL = -2.0
"""``scale_min`` sentinel: the floor of vLLM's CUDA kernel for the variant. Per group
(``_C.per_token_group_fp8_quant``, csrc/quantization/w8a8/fp8/per_token_group_quant.cu):
``KERNEL_GROUP_EPS`` with UE8M0 scales, else 0. Per tensor (``_C.dynamic_scaled_fp8_quant``,
csrc/quantization/w8a8/fp8/common.cu): 0, the kernel does not floor."""

SENTINELS = {SCALE_MIN_NATIVE: "SCALE_MIN_NATIVE", SCALE_MIN_KERNEL: "SCALE_MIN_KERNEL"}
"""Every sentinel value and its name (a negative ``scale_min`` that is not one is an error)."""

KERNEL_GROUP_EPS = 1e-10
"""The per-group kernel's floor on each group's absmax (per_token_group_quant.cu ``eps``)."""

NVFP4_BLOCK = 16  # NVFP4: one FP8 E4M3 scale per 16 elements (vLLM scaled_fp4_quant block_size)
MXFP4_BLOCK = 32  # MXFP4: one E8M0 scale per 32 elements (OCP MX spec v1.0)
# Swizzled NVFP4 scale tiles: 128 rows x 4 scale columns, rows interleaved 4 x 32
# (vllm/_custom_ops.py create_fp4_scale_tensor; PTX tcgen05 "scale-factor-b-layout-4x").
NVFP4_SWIZZLE_ROWS, NVFP4_SWIZZLE_COLS = 128, 4
# NVFP4 and MXFP4 quantize 16-bit activations only (scaled_fp4_quant asserts fp16/bf16;
# AITER dynamic_mxfp4_quant is instantiated for the same two).
FP4_INPUT_DTYPES = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------
# Declarations
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Arg:
    """One argument of the fused ops: its name, torch schema type, default and meaning.

    ``flag``: a norm convention (in :class:`Flags`, seen by the backends' gates).
    ``quant_only``: only the quant variants take it. ``option``: a quant argument whose
    non-default values only the backends listing it in ``quant_options`` compute (any
    other backend's call then runs on the reference backend). ``numel``: a tensor
    argument must have exactly this many elements. ``late``: a quant argument added after
    the schema was published: it goes at the END of the op's arguments (after
    ``residual_in_fp32``), so graphs written before it still bind.
    """

    name: str
    schema: str
    default: Any = REQUIRED
    doc: str = ""
    flag: bool = False
    quant_only: bool = False
    option: bool = False
    numel: int | None = None
    late: bool = False

    def schema_text(self) -> str:
        """``float scale_min=-1.0``: this argument in a torch schema string."""
        if self.default is REQUIRED:
            return f"{self.schema} {self.name}"
        if isinstance(self.default, torch.dtype):
            value = str(self.default).removeprefix("torch.")
        elif isinstance(self.default, str):
            value = f'"{self.default}"'
        else:
            value = repr(self.default)
        return f"{self.schema} {self.name}={value}"


@dataclasses.dataclass(frozen=True)
class Out:
    """One quant output: its shape and dtype for an input ``x`` and resolved quant arguments
    ``p`` (the fakes and the backends allocate from these). ``dtype`` is a dtype or the name
    of the quant argument holding it; ``column_major`` names the bool argument that stores
    the output with its token dim contiguous."""

    name: str
    shape: Callable[[torch.Tensor, Mapping[str, Any]], tuple]
    dtype: torch.dtype | str
    column_major: str | None = None

    def dtype_for(self, params: Mapping[str, Any]) -> torch.dtype:
        """This output's dtype for the resolved quant arguments *params*."""
        return params[self.dtype] if isinstance(self.dtype, str) else self.dtype


@dataclasses.dataclass(frozen=True)
class Variant:
    """One fused variant. ``name``: the backends' name (``add_rmsnorm_fp8_per_group``);
    ``kind``: the recognizer's quant kind (None: no quant); ``quant``: its quant arguments,
    in schema order; ``outputs``: its quant outputs, before ``residual_out, norm_out``;
    ``block``: elements per scale block along hidden, an int or the name of the quant
    argument holding it (hidden must be a multiple); ``input_dtypes``: the activation
    dtypes it quantizes (None: any float); ``kernel_scale_min``: what :data:`SCALE_MIN_KERNEL`
    stands for, from the other quant arguments; ``spelling``: how graphs spell the quant."""

    name: str
    kind: str | None = None
    quant: tuple[Arg, ...] = ()
    outputs: tuple[Out, ...] = ()
    block: int | str = 1
    input_dtypes: tuple[torch.dtype, ...] | None = None
    kernel_scale_min: Callable[[Mapping[str, Any]], float] | None = None
    spelling: str = ""

    @property
    def op(self) -> str:
        """The fused op's name in the ``fusion_passes`` namespace."""
        return f"allreduce_{self.name}"

    @functools.cached_property
    def args(self) -> tuple[Arg, ...]:
        """Every argument of the op, in schema order."""
        out: list[Arg] = []
        for a in SIGNATURE:
            if a is QUANT:
                out += [q for q in self.quant if not q.late]
            elif self.kind is not None or not a.quant_only:
                out.append(a)
        return (*out, *(q for q in self.quant if q.late))

    @functools.cached_property
    def arg_names(self) -> frozenset[str]:
        """The names of :attr:`args`."""
        return frozenset(a.name for a in self.args)

    @functools.cached_property
    def tensor_args(self) -> tuple[str, ...]:
        """The tensor arguments after ``input``."""
        return tuple(a.name for a in self.args[1:] if a.schema.startswith("Tensor"))

    @functools.cached_property
    def output_names(self) -> tuple[str, ...]:
        """The op's outputs in order."""
        if self.kind is None:
            return ("norm_out", "residual_out")
        return (*(o.name for o in self.outputs), "residual_out", "norm_out")

    @functools.cached_property
    def positional(self) -> tuple[str, ...]:
        """Quant arguments that are not options, in schema order."""
        return tuple(a.name for a in self.quant if not a.option)

    def schema(self) -> str:
        """The op's torch schema (without its name)."""
        outs = ", ".join("Tensor" for _ in self.output_names)
        return f"({', '.join(a.schema_text() for a in self.args)}) -> ({outs})"


QUANT = Arg("<quant>", "", doc="marks where a variant's quant arguments go")

SIGNATURE: tuple[Arg, ...] = (
    Arg("input", "Tensor", doc="this rank's partial sum, [..., hidden]"),
    Arg("residual", "Tensor?", doc="added after the all-reduce, or None (residual_out is then the sum); "
        "the input's dtype, or fp32 (a previous site's carry_fp32 sum, added in fp32)"),
    Arg("weight", "Tensor?", doc="the norm weight [hidden], or None"),
    Arg("eps", "float", doc="the norm's epsilon"),
    Arg("group", "str", doc="'c10d:<name>' or 'vllm:<name>' (fusion_passes.groups)"),
    QUANT,
    Arg("gemma", "bool", False, "multiply by 1 + weight (Gemma)", flag=True),
    Arg("weight_in_fp32", "bool", True, "weight multiplies in fp32 before the cast back "
        "(False: after it, the Hugging Face order; epilogue.rms_norm)", flag=True),
    Arg("return_norm", "bool", False, "also return the norm output (the 'Out' families)", quant_only=True),
    Arg("backend", "str", "auto", "'auto' lets the selector choose per call, or a backend name"),
    Arg("residual_in_fp32", "bool", False, "add the residual in fp32 and normalize the unrounded "
        "sum (vLLM's fused_add_rms_norm; epilogue.add_rms_norm)", flag=True),
    Arg("promote_out", "bool", False, "the norm output has the promoted dtype of weight and activations, "
        "as the Hugging Face form w * n.to(dtype) gives (fp32 for an fp32 weight), also when the weight "
        "multiplies in fp32 (epilogue.rms_norm)", flag=True),
    Arg("carry_fp32", "bool", False, "residual_out is the unrounded fp32 sum, for the next site's residual, "
        "and the norm reads it (implies residual_in_fp32; the residual may be fp32: the previous site's "
        "carry); Inductor's compile keeps a residual stream it does not store in fp32 "
        "(epilogue.add_rms_norm)", flag=True),
    Arg("quant_unrounded", "bool", False, "the FP8 quant reads the norm value before its rounding to the "
        "activation dtype (its scales from the rounded value): Inductor's compile of an aten quant fused "
        "with the norm (epilogue.quantize)", flag=True),
    Arg("sum_stored", "bool", False, "add the residual in fp32, return the sum rounded; the variance reads "
        "the unrounded sum, the normalization the rounded one: Inductor's compile where it stores the sum "
        "in the variance's loop (fusion_passes.inductor_store; epilogue.add_rms_norm)", flag=True),
    Arg("amax_unrounded", "bool", False, "a dynamic FP8 scale's amax reads the norm value before its rounding, "
        "the codes the rounded value: Inductor's Triton compile where it stores the norm output in the loop "
        "that takes the amax, and the codes' later loop reads the stored value (fusion_passes.inductor_store; "
        "epilogue.quantize)", flag=True),
)
"""The ONE argument list of every fused op. New arguments go at the end with a default,
so graphs written before them still load; :mod:`fusion_passes.rewrite` writes those after
``backend`` as keywords, and only when they differ from the default."""

FLAGS = tuple(a for a in SIGNATURE if a.flag)
FLAG_NAMES = tuple(a.name for a in FLAGS)

Flags = dataclasses.make_dataclass(
    "Flags", [(a.name, bool, dataclasses.field(default=a.default)) for a in FLAGS], frozen=True,
)
Flags.__doc__ = "The norm conventions of one call, one bool per ``flag=True`` entry of SIGNATURE."
Flags.__module__ = __name__


def fp8_max(dtype: torch.dtype = torch.float8_e4m3fn) -> float:
    """Largest value vLLM quantizes to: finfo max, but 224 for ROCm's fnuz (get_fp8_min_max)."""
    return 224.0 if dtype == torch.float8_e4m3fnuz else torch.finfo(dtype).max


def nvfp4_scale_shape(tokens: int, hidden: int, swizzle: bool) -> tuple[int, int]:
    """NVFP4 block scales: ``[T, H/16]``, or swizzled ``[round_up(T, 128), round_up(H/16, 4)]``."""
    k = hidden // NVFP4_BLOCK
    if not swizzle:
        return tokens, k
    return -(-tokens // NVFP4_SWIZZLE_ROWS) * NVFP4_SWIZZLE_ROWS, -(-k // NVFP4_SWIZZLE_COLS) * NVFP4_SWIZZLE_COLS


def _tokens(x: torch.Tensor):
    return x.numel() // x.shape[-1]


_FP8 = Arg("fp8_dtype", "ScalarType", torch.float8_e4m3fn, "float8_e4m3fn, or float8_e4m3fnuz (ROCm gfx942)",
           option=True)
_FORM = Arg("form", "str", "", "another project's FP8 convention ('': the variant's own vLLM order; "
             "fusion_passes.fp8_forms)", option=True, late=True)
_STATIC_FORM = Arg("form", "str", "", "'' (q = y * (1 / scale)), 'div' (y / scale), 'mul' (y * scale, the "
                   "scale given as its inverse) or 'input_product' (y * (1 / scale) rounded to the activation "
                   "dtype first): fusion_passes.fp8_forms.static", option=True, late=True)
_Q_FP8 = Out("q", lambda x, p: tuple(x.shape), "fp8_dtype")
_Q_FP4 = Out("q", lambda x, p: (_tokens(x), x.shape[-1] // 2), torch.uint8)  # two E2M1 codes a byte, [T, H/2]
_F32 = torch.float32

# fmt: off
VARIANTS: tuple[Variant, ...] = (
    Variant("add_rmsnorm"),
    Variant("add_rmsnorm_fp8_static", "fp8_static",
            (Arg("scale", "Tensor", doc="fp32 [1]: q = fp8(y * (1 / scale))", numel=1), _FP8, _STATIC_FORM),
            (_Q_FP8,),
            spelling="fp8(clamp(y * 1/scale)), scale a parameter"),
    Variant("add_rmsnorm_fp8_per_token", "fp8_per_token",
            (Arg("scale_ub", "Tensor?", None, "one-element upper bound on each token's amax (vLLM scale_ub: "
                 "QuantFP8.forward_cuda asserts scale_ub.numel() == 1)", numel=1), _FP8, _FORM),
            (_Q_FP8, Out("scales", lambda x, p: (*x.shape[:-1], 1), _F32)),
            spelling="amax(|y|, -1)/448 [min ub] -> fp8(y / s)"),
    Variant("add_rmsnorm_fp8_per_group", "fp8_per_group",
            (Arg("group_size", "SymInt", doc="elements per scale (1 x group_size groups)"),
             Arg("ue8m0", "bool", False, "scales rounded up to a power of two"),
             Arg("column_major", "bool", False, "scales stored with the token dim contiguous (DeepGEMM)"),
             Arg("amax_eps", "float", KERNEL_GROUP_EPS, "floor on each group's absmax", option=True),
             Arg("scale_min", "float", SCALE_MIN_KERNEL, "floor on the scale (>= 0, or a sentinel)", option=True),
             _FP8, _FORM),
            (_Q_FP8, Out("scales", lambda x, p: (*x.shape[:-1], x.shape[-1] // p["group_size"]), _F32,
                         column_major="column_major")),
            block="group_size", kernel_scale_min=lambda p: KERNEL_GROUP_EPS if p["ue8m0"] else 0.0,
            spelling="1 x g groups: amax/448 [UE8M0] -> fp8; row/col-major scales"),
    Variant("add_rmsnorm_fp8_per_tensor", "fp8_per_tensor",
            (Arg("scale_min", "float", SCALE_MIN_NATIVE, "floor on the scale (>= 0, or a sentinel)", option=True),
             _FP8, _FORM),
            (_Q_FP8, Out("scales", lambda x, p: (1,), _F32)),
            kernel_scale_min=lambda p: 0.0,
            spelling="max(|y|) over ALL tokens/448 -> fp8(y / s), one scale"),
    Variant("add_rmsnorm_nvfp4", "nvfp4",
            (Arg("global_scale", "Tensor", doc="fp32 [1]: the tensor-wide scale of the block scales", numel=1),
             Arg("swizzle", "bool", True, "block scales in the 128x4-tiled layout (vLLM's default)")),
            (_Q_FP4, Out("scales", lambda x, p: nvfp4_scale_shape(_tokens(x), x.shape[-1], p["swizzle"]),
                         torch.float8_e4m3fn)),
            block=NVFP4_BLOCK, input_dtypes=FP4_INPUT_DTYPES,
            spelling="scaled_fp4_quant: e2m1 x16 + e4m3 scales (swizzled | linear)"),
    Variant("add_rmsnorm_mxfp4", "mxfp4",
            (),
            (_Q_FP4, Out("scales", lambda x, p: (_tokens(x), x.shape[-1] // MXFP4_BLOCK), torch.uint8)),
            block=MXFP4_BLOCK, input_dtypes=FP4_INPUT_DTYPES,
            spelling="e2m1 x32 + e8m0 scales"),
)
# fmt: on

BY_NAME: dict[str, Variant] = {v.name: v for v in VARIANTS}
BY_KIND: dict[str, Variant] = {v.kind: v for v in VARIANTS if v.kind is not None}
NAMES: tuple[str, ...] = tuple(BY_NAME)


def get(name: str) -> Variant:
    """The variant called *name*; a clear error naming the known ones otherwise."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(f"fusion_passes: unknown variant {name!r}; known: {', '.join(NAMES)}") from None


# ---------------------------------------------------------------------------------------
# What a backend receives and returns
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FusedArgs:
    """One fused call, bound and resolved: what ``Backend.run(variant, args)`` receives.

    ``input`` is contiguous; ``quant`` maps every quant argument of the variant to its
    value with no sentinel left (:func:`fusion_passes.arguments.resolve`);
    ``return_norm``: the quant variants also return the norm output.
    """

    input: torch.Tensor
    residual: torch.Tensor | None
    weight: torch.Tensor | None
    eps: float
    group: str
    flags: Any = dataclasses.field(default_factory=lambda: Flags())
    quant: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    return_norm: bool = False


@dataclasses.dataclass
class FusedOutputs:
    """What a backend returns; the op orders it as the variant's ``output_names``.
    ``norm_out`` may be None for a quant variant called without ``return_norm``;
    ``scales`` is None for a variant without a scales output."""

    residual_out: torch.Tensor
    norm_out: torch.Tensor | None = None
    q: torch.Tensor | None = None
    scales: torch.Tensor | None = None


__all__ = [
    "Arg", "Out", "Variant", "VARIANTS", "BY_NAME", "BY_KIND", "NAMES", "SIGNATURE", "QUANT", "FLAGS",
    "FLAG_NAMES", "Flags", "FusedArgs", "FusedOutputs", "REQUIRED", "SCALE_MIN_NATIVE", "SCALE_MIN_KERNEL", "SENTINELS",
    "KERNEL_GROUP_EPS", "NVFP4_BLOCK", "MXFP4_BLOCK", "NVFP4_SWIZZLE_ROWS", "NVFP4_SWIZZLE_COLS",
    "FP4_INPUT_DTYPES", "fp8_max", "get", "nvfp4_scale_shape",
]
