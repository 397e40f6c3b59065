"""Small FX helpers shared by the passes: op names, source lines, fake values."""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import Node

from fusion_passes import _compat


_NAMES: dict = {}  # target -> name: every node of every graph asks (the all-reduce scans)


def op_name(target: Any) -> str:
    """``aten.mul.Tensor``-style name of a call target (no import of its library); other
    callables by ``__name__`` (``getitem``, ``auto_functionalized``)."""
    try:
        return _NAMES[target]
    except (KeyError, TypeError):  # TypeError: an unhashable target, named each time
        pass
    if isinstance(target, _compat.OpOverload):
        name = f"{target.namespace}.{target._opname}.{target._overloadname}"
    else:
        name = getattr(target, "__name__", str(target))
    if not isinstance(target, str):  # a placeholder's target is its own name: not kept
        try:
            _NAMES[target] = name
        except TypeError:
            pass
    return name


def source_of(stack_trace: str | None) -> tuple[str | None, str | None]:
    """From a node's stack trace: the last ``File "...", line N, in f`` and the code on it.

    That frame is the model source the node came from (torch records the user frames,
    innermost last).
    """
    if not stack_trace:
        return None, None
    lines = [ln.strip() for ln in stack_trace.strip().splitlines() if ln.strip()]
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("File "):
            code = lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith("File ") else None
            return lines[i], code
    return None, None


def fake_value(mode: _compat.FakeTensorMode, a: Any) -> Any:
    """What *a* is while tracing under *mode*: a node's ``meta['val']`` (a real tensor there
    converted into *mode*), anything else as it is."""
    if not isinstance(a, Node):
        return a
    v = a.meta.get("val")
    if isinstance(v, torch.Tensor) and not isinstance(v, _compat.FakeTensor):
        return mode.from_tensor(v)
    return v
