"""Compile a model and record its graphs before, after hoisting and after fusion.

What ``dump`` writes and ``explain SPEC`` reads. A SPEC is a Python callable that returns
``(model, example_inputs)`` (``package.module:function`` or ``path/to/file.py:function``:
your own code, imported and called), or ``capture:MODEL``, a vLLM model traced on CPU
(:mod:`fusion_passes.cli.capture`).
"""

from __future__ import annotations

import dataclasses
import errno
import importlib
import importlib.util
import os
import pathlib
import stat
import sys
from typing import Any

from fusion_passes.cli import terminal
from fusion_passes.cli import UsageError


@dataclasses.dataclass
class GraphRecord:
    """One graph Inductor compiled: its JSON document and text at each stage, and the report."""

    name: str
    docs: dict[str, dict] = dataclasses.field(default_factory=dict)
    texts: dict[str, str] = dataclasses.field(default_factory=dict)
    report: Any = None


def _recorder_class():
    from fusion_passes import _compat
    from fusion_passes.cli import graphio

    class Recorder(_compat.CustomGraphPass):
        """Wraps a FusionPass: records the graph before, after hoisting, and after fusion."""

        def __init__(self, fusion, model: str | None):
            self.fusion, self.model = fusion, model
            self.graphs: list[GraphRecord] = []

        def _snap(self, rec: GraphRecord, stage: str, graph, report=None) -> None:
            rec.docs[stage] = graphio.graph_to_dict(graph, stage=stage, model=self.model, graph_name=rec.name,
                                                    report=report)
            rec.texts[stage] = graphio.readable(graph)

        def __call__(self, graph) -> None:
            rec = GraphRecord(f"graph_{len(self.graphs)}")
            self.graphs.append(rec)
            self._snap(rec, "before", graph)
            if self.fusion.options.hoist:
                self.fusion.after_hoist = lambda g: self._snap(rec, "hoisted", g)
            try:
                self.fusion(graph)
            finally:
                self.fusion.after_hoist = None
            rec.report = self.fusion.report
            self._snap(rec, "fused", graph, report=explain_extras(rec.report))

        def uuid(self):
            return None  # never served from the FX graph cache: every graph must pass through us

    return Recorder


def explain_extras(report) -> dict:
    """``report.to_dict()`` with each site's blocker and source added (kept in the fused dump)."""
    out = report.to_dict()
    for d, s in zip(out["sites"], report.sites):
        d["blocker"], d["source"] = s.blocker, s.source
    return out


def _shown(text: str, limit: int = 120) -> str:
    """*text* for a one-line message: a 100,000-character spec is named by its start."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _spec_file(spec: str, mod_name: str) -> pathlib.Path:
    """The ``file.py`` of a spec: a regular file (a FIFO would hang the import), checked
    without opening it; any path error is a usage error."""
    path = pathlib.Path(mod_name)
    try:
        info = path.stat()
    except OSError as e:
        why = f"no such file {_shown(mod_name)}" if e.errno in (errno.ENOENT, errno.ENOTDIR) else \
            f"cannot read {_shown(mod_name)}: {e.strerror or e}"
        raise UsageError(f"spec {_shown(spec)!r}: {why}") from None
    if not stat.S_ISREG(info.st_mode):
        raise UsageError(f"spec {_shown(spec)!r}: {_shown(mod_name)} is not a regular file")
    return path


def _import_spec_module(spec: str, mod_name: str):
    if mod_name.endswith(".py"):
        path = _spec_file(spec, mod_name)
        loader_spec = importlib.util.spec_from_file_location(f"_fusion_passes_spec_{path.stem}", path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[loader_spec.name] = module
        loader_spec.loader.exec_module(module)
        return module
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: modules of the current directory
    try:
        return importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and mod_name.startswith(e.name):
            raise UsageError(f"spec {spec!r}: no module named {e.name!r}") from None
        raise


def check_spec(spec: str) -> tuple[str, str]:
    """``(module, function)`` of a callable *spec*, or a :class:`UsageError` (nothing imported)."""
    mod_name, sep, fn_name = spec.rpartition(":")
    if not sep or not mod_name or not fn_name.isidentifier():
        raise UsageError(f"spec {_shown(spec)!r} is not module:function or file.py:function")
    if mod_name.endswith(".py"):
        _spec_file(spec, mod_name)
    return mod_name, fn_name


def load_spec(spec: str):
    """Import and call *spec* (``module:function`` / ``file.py:function``): ``(model, inputs)``."""
    mod_name, fn_name = check_spec(spec)
    module = _import_spec_module(spec, mod_name)
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise UsageError(f"spec {spec!r}: {mod_name} has no callable {fn_name!r}")
    made = fn()
    if not (isinstance(made, tuple) and len(made) == 2 and callable(made[0])):
        raise UsageError(f"spec {spec!r}: {fn_name}() must return (model, example_inputs)")
    model, inputs = made
    return model, tuple(inputs) if isinstance(inputs, (list, tuple)) else (inputs,)


def ensure_process_group(world_size: int) -> None:
    """Torch's fake process group of *world_size* ranks, unless a real one is initialised
    (a fake one of another size is replaced)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized() and dist.get_backend() == "fake" and dist.get_world_size() != world_size:
        dist.destroy_process_group()
    if not dist.is_initialized():
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)


def compile_and_record(model, inputs, fusion, model_name: str | None) -> list[GraphRecord]:
    """``torch.compile(model)(*inputs)`` with the recorder installed; the graphs it saw.

    The FX-graph and AOT-autograd caches are off for this compile (a cache hit would skip
    the post-grad passes, and with them the recording).
    """
    import torch
    from fusion_passes import _compat

    functorch_config = _compat.functorch_config()

    recorder = _recorder_class()(fusion, model_name)
    torch.compiler.reset()
    with _compat.inductor_config.patch(post_grad_custom_post_pass=recorder, fx_graph_cache=False,
                                       fx_graph_remote_cache=False), \
            functorch_config.patch(enable_autograd_cache=False), torch.no_grad():
        try:
            with terminal.step(f"compiling {model_name} with torch.compile (Inductor)"):
                torch.compile(model)(*inputs)
        except Exception as e:  # noqa: BLE001 - e.g. MoE kernels without a CPU implementation
            if not recorder.graphs:
                raise
            terminal.note(f"note: running the compiled model failed after {len(recorder.graphs)} graph(s) were "
                          f"recorded ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                          "the dump holds what was compiled")
    torch.compiler.reset()
    return recorder.graphs


def check_target(spec: str, args) -> None:
    """Refuse a bad SPEC and bad options for it before any work (nothing is imported)."""
    if spec.startswith("capture:"):
        from fusion_passes.cli.tiny_configs import unsupported

        model = spec.removeprefix("capture:")
        why = unsupported(model, args.tp, None if args.quant == "none" else args.quant)
        if why is not None:
            raise UsageError(f"{spec}: {why}")
    else:
        check_spec(spec)


def record_spec(spec: str, args) -> list[GraphRecord]:
    """Compile *spec* (a callable, or ``capture:MODEL``) under a FusionPass with the command's options."""
    from fusion_passes import FusionPass

    check_target(spec, args)
    fusion = FusionPass(hoist=args.hoist, backend=args.backend)
    if spec.startswith("capture:"):
        return record_capture(spec.removeprefix("capture:"), args, fusion)
    ensure_process_group(args.tp)
    model, inputs = load_spec(spec)
    return compile_and_record(model, inputs, fusion, spec)


def record_capture(model: str, args, fusion) -> list[GraphRecord]:
    """vLLM's post-grad graphs of *model* (:func:`fusion_passes.cli.capture.trace_vllm`),
    each run through *fusion* with the recorder: the same stages as a compiled callable."""
    from fusion_passes.cli import capture

    quant = None if args.quant == "none" else args.quant
    name = f"capture:{model} tp={args.tp} {args.dtype} quant={args.quant} layers={args.layers}"
    recorder = _recorder_class()(fusion, name)
    with terminal.step(f"tracing vLLM {model} on CPU (tp {args.tp}, {args.dtype}, quant {args.quant})"):
        graphs = capture.trace_vllm(model, tp=args.tp, dtype=args.dtype, quant=quant, layers=args.layers)
    for gm in graphs:
        recorder(gm.graph)
    return recorder.graphs
