"""Every torch-private name fusion-passes uses, in one place.

Private torch APIs move between releases (we support torch >= 2.11; the GPU machine has
2.11, vLLM 0.33 pins 2.14). Import them from here so a move is a one-file fix.
"""

from __future__ import annotations

import copy

import torch
import torch.fx

from torch._inductor import config as inductor_config  # noqa: F401  (re-exported)
from torch._inductor.custom_graph_pass import CustomGraphPass  # noqa: F401  (re-exported)
from torch._subclasses.fake_tensor import FakeTensorMode, FakeTensor  # noqa: F401

OpOverload = torch._ops.OpOverload
"""The class of ``torch.ops.<ns>.<op>.<overload>`` (what an FX node's target is)."""

def detect_fake_mode(graph: torch.fx.Graph) -> FakeTensorMode | None:
    """The fake mode that produced the ``meta['val']`` of *graph*'s nodes, if any (the
    first fake value's: one graph is traced under one mode)."""
    for n in graph.nodes:
        v = n.meta.get("val")
        if isinstance(v, FakeTensor):
            return v.fake_mode
    return None


def copy_graph(graph: torch.fx.Graph) -> torch.fx.Graph:
    """A node-for-node copy of *graph* (metadata shared, as ``Graph.graph_copy`` does)."""
    new = torch.fx.Graph(owning_module=graph.owning_module)
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in graph.nodes:
        env[node] = new.node_copy(node, lambda n: env[n])
    return new


def snapshot_graph(graph: torch.fx.Graph) -> list[tuple]:
    """What :func:`restore_graph` needs to put *graph* back: each node with its op, target,
    arguments, name, type and a shallow copy of its metadata, in order. Cheaper than
    :func:`copy_graph` (no node is created: FX arguments are immutable tuples and dicts,
    replaced, never changed in place, when a pass edits a node)."""
    return [(n, n.op, n.target, n.args, n.kwargs, n.name, n.type, copy.copy(n.meta)) for n in graph.nodes]


def restore_graph(graph: torch.fx.Graph, backup) -> None:
    """Make *graph* hold exactly the nodes of *backup* (a graph, or a
    :func:`snapshot_graph`), with the same names.

    Used when a pass failed half way or undoes its moves: the graph goes back to what it
    was. Node names are kept by resetting the graph's private name table.
    """
    for node in reversed(list(graph.nodes)):
        node.users.clear()
        graph.erase_node(node)
    if hasattr(graph, "_graph_namespace"):
        graph._graph_namespace = type(graph._graph_namespace)()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    if isinstance(backup, torch.fx.Graph):
        for node in backup.nodes:
            env[node] = graph.node_copy(node, lambda n: env[n])
        return
    for old, op, target, args, kwargs, name, type_, meta in backup:
        new = graph.create_node(op, target, torch.fx.node.map_arg(args, env.__getitem__),
                                torch.fx.node.map_arg(kwargs, env.__getitem__), name, type_)
        new.meta = copy.copy(meta)
        env[old] = new


def stable_topological_sort(graph: torch.fx.Graph) -> None:
    """Reorder *graph* minimally so every node follows its inputs (Inductor's helper)."""
    from torch._inductor.pattern_matcher import stable_topological_sort as _sort

    _sort(graph)
