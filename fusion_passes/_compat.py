"""Every torch- and vLLM-private name fusion-passes uses, in one place.

Private torch APIs move between releases (we support torch >= 2.11; the GPU machine has
2.11, vLLM 0.33 pins 2.14). Import them from here so a move is a one-file fix. Each
function names the private it wraps and the version it was checked against.
"""

from __future__ import annotations

import contextvars
import copy

import torch
import torch.fx
from torch.utils import _config_module

from torch._inductor import config as inductor_config  # noqa: F401  (re-exported)
from torch._inductor.custom_graph_pass import CustomGraphPass  # noqa: F401  (re-exported)
from torch._subclasses.fake_tensor import FakeTensorMode, FakeTensor  # noqa: F401

_UNSET = _config_module._UNSET_SENTINEL  # "no value at this layer" in a config entry

OpOverload = torch._ops.OpOverload
"""The class of ``torch.ops.<ns>.<op>.<overload>`` (what an FX node's target is)."""
OpOverloadPacket = torch._ops.OpOverloadPacket
"""The class of ``torch.ops.<ns>.<op>`` (an op with its overloads)."""
HigherOrderOperator = torch._ops.HigherOrderOperator
"""The class of ``torch.ops.higher_order.*`` (``auto_functionalized``, ``cond``, ...)."""


def functorch_config():
    """``torch._functorch.config`` (AOTAutograd's settings; the command line turns its FX
    graph cache off around a measured compile)."""
    from torch._functorch import config

    return config


def dynamo_config():
    """``torch._dynamo.config`` (the command line raises its recompile limits for token sweeps)."""
    import torch._dynamo

    return torch._dynamo.config


def dynamo_graphs_compiled() -> int:
    """How many graphs Dynamo has compiled in this process so far
    (``torch._dynamo.utils.counters["stats"]["unique_graphs"]``; a count never reset)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def inductor_deterministic_options() -> dict:
    """``torch.compile`` options for Inductor's deterministic mode
    (``torch._inductor.config.deterministic``, ``TORCHINDUCTOR_DETERMINISTIC=1``: no
    benchmarking that picks between configs of different numerics, such as a Triton
    reduction's block sizes; each kernel keeps that in its ``inductor_meta``), or ``{}``
    where the running torch has no such setting (torch 2.14 has it; it is looked up, not
    assumed, on the GPU machine's 2.11). An option of the compile, not a patch around it:
    Dynamo restores ``torch.use_deterministic_algorithms`` after each frame, and in torch
    2.14 that call writes ``config.deterministic`` too, so a patch is off again after the
    first compile (``torch/_dynamo/convert_frame.py``, ``torch/__init__.py``)."""
    return {"deterministic": True} if hasattr(inductor_config, "deterministic") else {}


def mark_dynamic(t: torch.Tensor, dim: int) -> None:
    """``torch._dynamo.mark_dynamic``: compile *t*'s dimension *dim* symbolic, as vLLM does
    for the token dimension."""
    import torch._dynamo

    torch._dynamo.mark_dynamic(t, dim)


def run_and_get_code(fn, *args, **kwargs):
    """``torch._inductor.utils.run_and_get_code``: *fn*'s result and the code Inductor
    generated for it (the demo checks the fused op is in that code)."""
    from torch._inductor.utils import run_and_get_code as run

    return run(fn, *args, **kwargs)


def scaled_mm(*args, **kwargs):
    """``torch._scaled_mm``: the FP8 GEMM the command line's FP8 model layers run."""
    return torch._scaled_mm(*args, **kwargs)


def resolve_process_group(name: str):
    """The process group registered under *name* (a ``_c10d_functional`` op's group name),
    as those ops resolve it: ``torch._C._distributed_c10d._resolve_process_group``
    (private; checked against torch 2.14)."""
    from torch._C._distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


def symmetric_memory():
    """torch's symmetric-memory module, ``torch.distributed._symmetric_memory`` (private;
    its ``empty``, ``rendezvous`` and, before torch 2.9, ``enable_symm_mem_for_group`` are
    used; checked against torch 2.14)."""
    import torch.distributed._symmetric_memory as symm_mem

    return symm_mem


def symmetric_memory_signal_pad_bytes() -> int:
    """Bytes of one rank's signal pad in a symmetric-memory rendezvous:
    ``torch._C._distributed_c10d._SymmetricMemory.signal_pad_size`` (private; checked
    against torch 2.14)."""
    from torch._C._distributed_c10d import _SymmetricMemory

    return int(_SymmetricMemory.signal_pad_size)


def vllm_group(name: str):
    """vLLM's ``GroupCoordinator`` called *name* (``tp:0``), as ``torch.ops.vllm.all_reduce``
    resolves it, or None if it does not exist (or was destroyed):
    ``vllm.distributed.parallel_state._groups`` (private, a dict of weak references;
    checked against vLLM 0.33)."""
    from vllm.distributed import parallel_state

    ref = parallel_state._groups.get(name)
    return ref() if ref is not None else None


def op_overload_name(op: OpOverload) -> str:
    """``aten.mul.Tensor``: an overload's namespace, op and overload name (the private
    ``_opname`` / ``_overloadname``; the public ``name()`` drops ``.default``)."""
    return f"{op.namespace}.{op._opname}.{op._overloadname}"


def op_schema(op: OpOverload) -> torch.FunctionSchema:
    """An overload's schema (``OpOverload._schema``): its arguments, returns, aliasing."""
    return op._schema


def graph_order(node: torch.fx.Node):
    """A key sorting the nodes of one graph in graph order: ``Node._sort_key``, what
    ``Node.__lt__`` compares; None on a torch whose nodes carry none."""
    return getattr(node, "_sort_key", None)


def is_erased(node: torch.fx.Node) -> bool:
    """Whether *node* was erased from its graph (``Node._erased``)."""
    return node._erased


def set_inductor_config_everywhere(name: str, value) -> None:
    """Set ``torch._inductor.config.<name>`` for every thread of the process.

    torch 2.14 keeps a plain ``config.X = v`` per thread: each entry's ``user_override``
    is a ``ContextVar`` (``_ConfigEntry.__init__`` and ``ConfigModule.__setattr__`` in
    torch/utils/_config_module.py: "User overrides are thread-local"), and a thread that
    never assigned X reads the layers below it. So the value goes to the lowest layer read
    without a copy, ``env_value_default`` (``default`` is deep-copied into the reading
    thread when it is not an immutable type: a copy of a pass would take the report), and
    the calling thread's own assignment is cleared so it reads the same. A thread that
    assigned X itself (or left a ``config.patch`` of X, whose exit assigns the prior value)
    keeps its own value, as torch's precedence says.
    """
    entry = inductor_config._config[name]
    setattr(inductor_config, name, value)  # also marks this thread's config caches dirty
    if not isinstance(entry.user_override, contextvars.ContextVar):
        return  # a torch whose assignments are process-wide: done
    entry.env_value_default = _UNSET if value is entry.default else value
    entry.user_override.set(_UNSET)


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
