"""The unfused chain after the all-reduce, and the forms Inductor compiles it in, for ``bench kernels``.

:func:`epilogue_fn` is :mod:`fusion_passes.epilogue`'s add + RMSNorm (+ quant) in the
unfused order; :func:`compile_forms` compiles it with the hidden size static, per token
count (``static``) or with only the token dimension dynamic and Dynamo's guards dropped
(``tokdyn``, as vLLM runs its graphs), and optionally ``dynamic=True``. Each form gets its
own code object (:func:`fresh`), so its Dynamo cache and guards are its own.
"""

from __future__ import annotations

import types

from fusion_passes.cli import bench_rows


def epilogue_fn(variant: str, eps: float):
    """The unfused chain after the all-reduce, as :mod:`fusion_passes.epilogue` writes it,
    with the quant arguments the fused op defaults to (the registry's, resolved: the
    kernels' floors), ``scale`` standing for the variant's one tensor argument."""
    from fusion_passes import arguments, epilogue, variants

    if variant == "add_rmsnorm":
        return lambda x, res, w, scale: epilogue.add_rms_norm(x, res, w, eps)
    spec = variants.get(variant)
    given = {"group_size": bench_rows.PER_GROUP_SIZE}
    base = arguments.resolve(spec, {q.name: given.get(q.name, q.default) for q in spec.quant})
    tensor_arg = next((q.name for q in spec.quant if q.schema == "Tensor"), None)

    def fn(x, res, w, scale):
        y, r = epilogue.add_rms_norm(x, res, w, eps)
        params = base if tensor_arg is None else {**base, tensor_arg: scale}
        return epilogue.quantize(variant, y, params), r

    return fn


def fresh(fn, tag: str):
    """A copy of *fn* with its own code object, so its Dynamo cache (and guards) are its own:
    a token-dynamic compile whose guards are dropped must never serve another form."""
    code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_{tag}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def drop_guards(entries):
    """Dynamo guard filter: keep none (vLLM runs its compiled graph for every token count)."""
    return [False for _ in entries]


def compile_forms(fn, *, with_dynamic_true: bool, backend: str = "inductor", with_max_autotune: bool = False) -> dict:
    """The epilogue's compiled forms (each its own Dynamo cache), not yet compiled: Dynamo
    compiles on the first call. ``tokdyn`` must first be called with the token dimension
    marked dynamic (``mark_dynamic(t, 0)``) at a size other than 0 or 1."""
    import torch

    forms = {
        "static": torch.compile(fresh(fn, "static"), dynamic=False, backend=backend),
        "tokdyn": torch.compile(fresh(fn, "tokdyn"), backend=backend, options={"guard_filter_fn": drop_guards}),
    }
    if with_dynamic_true:
        forms[bench_rows.EXTRA_FORM] = torch.compile(fresh(fn, "dyntrue"), dynamic=True, backend=backend)
    if with_max_autotune:  # per token count, as static, with Inductor's own autotuning on
        tuned = {"max_autotune": True, "coordinate_descent_tuning": True} if backend == "inductor" else None
        forms[bench_rows.MAX_AUTOTUNE_FORM] = torch.compile(fresh(fn, "maxat"), dynamic=False, backend=backend,
                                                            options=tuned)
    return forms
