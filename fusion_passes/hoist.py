"""Hoisting: sink all-reduces toward their norms (see the Hoisting issue; not yet built).

``run`` returns, per all-reduce node name, the ops it was moved across.
"""

from __future__ import annotations

from torch.fx import Graph


def run(graph: Graph, options) -> dict[str, list[str]]:
    return {}
