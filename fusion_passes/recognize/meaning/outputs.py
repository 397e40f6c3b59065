"""Fused outputs in the chain's form: the small steps from a fused op's output to the form
in which a chain read by meaning (:mod:`fusion_passes.recognize.meaning`) gave the same
value (the ``adapt`` specs of a by-meaning ``Quant``). Not a vendor adapter: those are
the backends (:mod:`fusion_passes.backends`).

* ``"view"``: the chain holds the value in another shape (``[T*G, g]`` for ``[T, H]``);
* ``"cast"``: the chain holds an exact upcast of it (FP8 block scales as fp32);
* ``"e2m1"``: the chain holds FP4 values as floats (vLLM's ``ref_nvfp4_quant`` returns
  ``cast_to_fp4``'s fp32 grid values) where the fused op returns packed E2M1 codes:
  :func:`e2m1_values` decodes them (``fusion_passes::e2m1_values``);

and :func:`materialize`, which turns a scale spelled as a Python number into the
``full([1], value)`` tensor the fused op takes. Every step reproduces the chain's value
exactly: the recognizer compared the decoded / cast / reshaped canonical output with it.
"""

from __future__ import annotations

import torch
from torch.fx import Graph, Node


@torch.library.custom_op("fusion_passes::e2m1_values", mutates_args=())
def e2m1_values(packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Packed E2M1 codes ``[..., H // 2]`` (uint8, low nibble first) -> their values
    ``[..., H]`` in *dtype* (code 8, a negative value rounded to zero, is -0.0)."""
    from fusion_passes.recognize.meaning.conventions import decode_e2m1

    if packed.dtype != torch.uint8:
        raise TypeError(f"fusion_passes: e2m1_values takes packed uint8 codes, got {packed.dtype}")
    return decode_e2m1(packed, dtype)


@e2m1_values.register_fake
def _(packed, dtype):
    return packed.new_empty((*packed.shape[:-1], packed.shape[-1] * 2), dtype=dtype)


def _call(graph: Graph, after: Node, op, args: tuple, fake_vals) -> Node:
    with graph.inserting_after(after):
        node = graph.call_function(op, args)
    fake_vals.update(node)
    node.meta["stack_trace"] = after.meta.get("stack_trace")
    return node


def apply(graph: Graph, out: Node, spec: str, like: Node, fake_vals) -> Node:
    """*out* (a fused output) brought to the form of *like* (the chain's node) by *spec*
    (``""``, ``"view"``, ``"cast"``, ``"e2m1"``, optionally ``"+view"``)."""
    if not spec:
        return out
    want = like.meta["val"]
    node = out
    if spec.startswith("e2m1"):
        node = _call(graph, node, torch.ops.fusion_passes.e2m1_values.default, (node, want.dtype), fake_vals)
    elif spec.startswith("cast"):
        node = _call(graph, node, torch.ops.prims.convert_element_type.default, (node, want.dtype), fake_vals)
    if spec.endswith("view"):
        node = _call(graph, node, torch.ops.aten.reshape.default, (node, _sizes(want)), fake_vals)
    return node


def _sizes(want) -> list[int]:
    """*want*'s shape as a reshape's argument: a token-dynamic size (a symbol) as ``-1``
    (a raw symbol in a graph argument is a name the compiled code does not define)."""
    sizes = [d if isinstance(d, int) else -1 for d in want.shape]
    if sizes.count(-1) > 1:
        raise ValueError(f"fusion_passes: cannot reshape to {list(want.shape)}: more than one dynamic size")
    return sizes


def materialize(graph: Graph, site, fake_vals) -> list[Node]:
    """Replace every quant parameter that is a ``meaning.Const`` by a ``full`` node placed
    before the chain (so the fused op, inserted there, follows it); returns those nodes."""
    quant = site.quant
    consts = {k: v for k, v in quant.params.items() if hasattr(v, "materialize")}
    if not consts:
        return []
    first = min(n for n in site.removed if n not in site.ar.nodes)
    for name, const in consts.items():
        quant.params[name] = const.materialize(graph, first, fake_vals)
    return [quant.params[name] for name in consts]
