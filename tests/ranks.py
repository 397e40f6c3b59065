"""Evaluate an FX graph across simulated ranks, in one process.

Every value is a list with one tensor per rank. Ordinary ops run per rank; an
all-reduce sums the ranks' tensors (in rank order, in the tensor's dtype, as a ring of
one would); a fused op sums its input the same way and then runs the reference
epilogue per rank. Running the unfused and the fused graph through this gives the
numerics of both on R ranks without processes.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from fusion_passes import epilogue


def rank_sum(xs: list[torch.Tensor]) -> torch.Tensor:
    total = xs[0].clone()
    for x in xs[1:]:
        total = total + x
    return total


def _fused_add_rmsnorm(rank_args, kwargs):
    reduced = rank_sum([a[0] for a in rank_args])
    outs = []
    for a in rank_args:
        _, residual, weight, eps, _group, gemma, w_fp32 = a[:7]
        outs.append(epilogue.add_rms_norm(reduced, residual, weight, eps, gemma=gemma, weight_in_fp32=w_fp32,
                                          residual_in_fp32=kwargs.get("residual_in_fp32", False)))
    return outs


def _fused_quant(variant: str):
    """A fused quant op across ranks: the summed input, then the reference epilogue with the
    op's own arguments (``fusion_passes.rewrite.QUANT_ARGS`` names them)."""
    from fusion_passes.backends.reference import quantize
    from fusion_passes.rewrite import QUANT_ARGS

    names = QUANT_ARGS[variant]
    n_pos = _POSITIONAL[variant]

    def run(rank_args, kwargs):
        reduced = rank_sum([a[0] for a in rank_args])
        outs = []
        for a in rank_args:
            _, residual, weight, eps, _group = a[:5]
            params = a[5:5 + len(names)]
            gemma, w_fp32, return_norm = a[5 + len(names):8 + len(names)]
            norm, res_out = epilogue.add_rms_norm(reduced, residual, weight, eps, gemma=gemma, weight_in_fp32=w_fp32,
                                                  residual_in_fp32=kwargs.get("residual_in_fp32", False))
            q, scales = quantize(variant, norm, *params[:n_pos], **dict(zip(names[n_pos:], params[n_pos:])))
            norm = norm if return_norm else reduced.new_empty((0,))
            outs.append((q, res_out, norm) if scales is None else (q, scales, res_out, norm))
        return outs

    return run


# how many of a variant's QUANT_ARGS are positional quant params (the rest are options)
_POSITIONAL = {"add_rmsnorm_fp8_static": 1, "add_rmsnorm_fp8_per_token": 1, "add_rmsnorm_fp8_per_group": 3,
               "add_rmsnorm_fp8_per_tensor": 0, "add_rmsnorm_nvfp4": 2, "add_rmsnorm_mxfp4": 0}

COLLECTIVES = {
    "_c10d_functional.all_reduce.default": lambda ra, kw: [rank_sum([a[0] for a in ra])] * len(ra),
    "_c10d_functional.wait_tensor.default": lambda ra, kw: [a[0] for a in ra],
    "vllm.all_reduce.default": lambda ra, kw: [rank_sum([a[0] for a in ra])] * len(ra),
    "fusion_passes.allreduce_add_rmsnorm.default": _fused_add_rmsnorm,
    **{f"fusion_passes.allreduce_{v}.default": _fused_quant(v) for v in _POSITIONAL},
}


def _name(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._opname}.{target._overloadname}"
    return ""


def run_ranks(gm: GraphModule, rank_inputs: list[tuple]) -> list:
    """Outputs of *gm* on each rank; ``rank_inputs[r]`` are rank r's placeholders."""
    world = len(rank_inputs)
    env: dict[Node, list] = {}

    def load(a, r):
        return torch.fx.node.map_arg(a, lambda n: env[n][r])

    placeholders = iter(range(10**9))
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            i = next(placeholders)
            env[node] = [rank_inputs[r][i] for r in range(world)]
        elif node.op == "get_attr":
            v = getattr(gm, node.target)
            env[node] = [v] * world
        elif node.op == "call_function":
            rank_args = [load(node.args, r) for r in range(world)]
            special = COLLECTIVES.get(_name(node.target))
            if special is not None:
                env[node] = special(rank_args, node.kwargs)
            else:
                env[node] = [
                    node.target(*rank_args[r], **load(node.kwargs, r)) for r in range(world)
                ]
        elif node.op == "output":
            return [load(node.args[0], r) for r in range(world)]
        else:
            raise NotImplementedError(node.op)
    raise AssertionError("graph without output")


__all__ = ["run_ranks", "rank_sum", "operator"]
