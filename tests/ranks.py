"""Evaluate an FX graph across simulated ranks, in one process.

Every value is a list with one tensor per rank. Ordinary ops run per rank; an
all-reduce sums the ranks' tensors (in rank order, in the tensor's dtype, as a ring of
one would). A fused op (``torch.ops.fusion_passes.*``) runs FOR REAL, eagerly, once per
rank, inside :func:`fusion_passes.groups.simulated_sum`, which makes its all-reduce return
that same sum of the ranks' inputs: the op's argument binding, checks, backend selection
(the reference backend on CPU) and epilogue all run as in production. Running the unfused
and the fused graph through this gives the numerics of both on R ranks without processes.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from fusion_passes import groups
from fusion_passes.recognize.fx import op_name


def rank_sum(xs: list[torch.Tensor]) -> torch.Tensor:
    total = xs[0].clone()
    for x in xs[1:]:
        total = total + x
    return total


def _all_reduce(rank_args, rank_kwargs):
    return [rank_sum([a[0] for a in rank_args])] * len(rank_args)


COLLECTIVES = {
    "_c10d_functional.all_reduce.default": _all_reduce,
    "_c10d_functional.wait_tensor.default": lambda ra, rk: [a[0] for a in ra],
    "vllm.all_reduce.default": _all_reduce,
}


def _fused(target, rank_args, rank_kwargs):
    """The real fused op on each rank, its all-reduce answered with the ranks' sum."""
    first = rank_args[0][0] if rank_args[0] else rank_kwargs[0]["input"]
    inputs = [a[0] if a else k["input"] for a, k in zip(rank_args, rank_kwargs)]
    assert all(x.shape == first.shape for x in inputs), "ranks disagree on the fused op's input shape"
    total = rank_sum(inputs)
    outs = []
    for args, kwargs in zip(rank_args, rank_kwargs):
        with groups.simulated_sum(total, len(rank_args)):
            outs.append(target(*args, **kwargs))
    return outs


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
            env[node] = [getattr(gm, node.target)] * world
        elif node.op == "call_function":
            rank_args = [load(node.args, r) for r in range(world)]
            rank_kwargs = [load(node.kwargs, r) for r in range(world)]
            name = op_name(node.target)
            if name in COLLECTIVES:
                env[node] = COLLECTIVES[name](rank_args, rank_kwargs)
            elif name.startswith("fusion_passes."):
                env[node] = _fused(node.target, rank_args, rank_kwargs)
            else:
                env[node] = [node.target(*rank_args[r], **rank_kwargs[r]) for r in range(world)]
        elif node.op == "output":
            return [load(node.args[0], r) for r in range(world)]
        else:
            raise NotImplementedError(node.op)
    raise AssertionError("graph without output")


__all__ = ["run_ranks", "rank_sum"]
