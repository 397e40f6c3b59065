"""Every torch-private name fusion-passes uses, in one place.

Private torch APIs move between releases (we support torch >= 2.11; the GPU machine has
2.11, vLLM 0.33 pins 2.14). Import them from here so a move is a one-file fix.
"""

from __future__ import annotations

import torch
import torch.fx

from torch._inductor import config as inductor_config  # noqa: F401  (re-exported)
from torch._inductor.custom_graph_pass import CustomGraphPass  # noqa: F401  (re-exported)
from torch._subclasses.fake_tensor import FakeTensorMode, FakeTensor  # noqa: F401

OpOverload = torch._ops.OpOverload
"""The class of ``torch.ops.<ns>.<op>.<overload>`` (what an FX node's target is)."""

def detect_fake_mode(graph: torch.fx.Graph) -> FakeTensorMode | None:
    """The fake mode that produced the ``meta['val']`` of *graph*'s nodes, if any."""
    from torch._guards import detect_fake_mode as _detect

    vals = [n.meta["val"] for n in graph.nodes if isinstance(n.meta.get("val"), FakeTensor)]
    return _detect(vals) if vals else None


def copy_graph(graph: torch.fx.Graph) -> torch.fx.Graph:
    """A node-for-node copy of *graph* (metadata shared, as ``Graph.graph_copy`` does)."""
    new = torch.fx.Graph(owning_module=graph.owning_module)
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in graph.nodes:
        env[node] = new.node_copy(node, lambda n: env[n])
    return new


def restore_graph(graph: torch.fx.Graph, backup: torch.fx.Graph) -> None:
    """Make *graph* hold exactly the nodes of *backup*, with the same names.

    Used only on the error path: a pass that failed half way puts the graph back as it
    was. Node names are kept by resetting the graph's private name table.
    """
    for node in reversed(list(graph.nodes)):
        node.users.clear()
        graph.erase_node(node)
    if hasattr(graph, "_graph_namespace"):
        graph._graph_namespace = type(graph._graph_namespace)()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in backup.nodes:
        env[node] = graph.node_copy(node, lambda n: env[n])


def stable_topological_sort(graph: torch.fx.Graph) -> None:
    """Reorder *graph* minimally so every node follows its inputs (Inductor's helper)."""
    from torch._inductor.pattern_matcher import stable_topological_sort as _sort

    _sort(graph)
