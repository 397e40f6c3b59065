"""``fusion-passes dump SPEC``: compile a model and write its graphs before and after our passes.

SPEC is a Python callable that returns ``(model, example_inputs)``: ``package.module:function``
or ``path/to/file.py:function`` (your own code: it is imported and called, exactly as
``torch.compile`` would run it). The model is compiled with ``torch.compile`` (Inductor)
under a ``post_grad_custom_post_pass`` that records each graph

* ``before``: as Inductor hands it to the custom post pass (its own post-grad passes done),
* ``hoisted``: after our hoisting (unless ``--no-hoist``),
* ``fused``: after fusion,

as readable text (``print_readable``, the ``fx_graph_*.py`` style of TORCH_COMPILE_DEBUG)
and as JSON (:mod:`fusion_passes.graphio`) that ``fusion-passes diff`` and ``explain``
read back. Without an initialised process group (a CPU callable), torch's fake process
group is set up with ``--tp`` ranks, so collectives trace (and run as no-ops).

SPEC may also be ``capture:MODEL`` (``llama``, ``deepseek_v3``, ...): real vLLM model code
traced on CPU by :func:`fusion_passes.tools.capture.trace_vllm` (``--tp``, ``--dtype``,
``--quant``, ``--layers``); its post-grad graphs go through the same recorder.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import pathlib
import sys
from typing import Any

from fusion_passes.tools.cli import UsageError

STAGE_FILES = "{graph}.{stage}.{ext}"
"""How dump files are named inside the output directory."""


def add_arguments(parser) -> None:
    parser.add_argument("spec", help="module:function or file.py:function returning (model, example_inputs), "
                        "or capture:MODEL (a vLLM model, see tools/capture.py)")
    parser.add_argument("-o", "--out", default="fusion-passes-dump", help="output directory (default: %(default)s)")
    add_compile_arguments(parser)


def add_compile_arguments(parser) -> None:
    """Options shared with ``explain`` when it compiles a spec itself."""
    parser.add_argument("--tp", type=int, default=2, help="world size of the fake process group "
                        "set up when none is initialised (default: %(default)s)")
    parser.add_argument("--no-hoist", dest="hoist", action="store_false", help="run fusion without hoisting")
    parser.add_argument("--backend", default="auto", help="force a fused-op backend (default: auto)")
    vllm = parser.add_argument_group("capture:MODEL specs (real vLLM model code, tools/capture.py)")
    vllm.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    vllm.add_argument("--quant", default="none", help="none, fp8_static, fp8_dynamic, fp8_block")
    vllm.add_argument("--layers", type=int, default=2, help="decoder layers (default: %(default)s)")


@dataclasses.dataclass
class GraphRecord:
    """One graph Inductor compiled: its JSON document and text at each stage, and the report."""

    name: str
    docs: dict[str, dict] = dataclasses.field(default_factory=dict)
    texts: dict[str, str] = dataclasses.field(default_factory=dict)
    report: Any = None


def _recorder_class():
    from fusion_passes import _compat, graphio

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


def load_spec(spec: str):
    """Import and call *spec* (``module:function`` / ``file.py:function``): ``(model, inputs)``."""
    mod_name, sep, fn_name = spec.rpartition(":")
    if not sep or not mod_name or not fn_name.isidentifier():
        raise UsageError(f"spec {spec!r} is not module:function or file.py:function")
    if mod_name.endswith(".py"):
        path = pathlib.Path(mod_name)
        if not path.is_file():
            raise UsageError(f"spec {spec!r}: no such file {mod_name}")
        loader_spec = importlib.util.spec_from_file_location(f"_fusion_passes_spec_{path.stem}", path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[loader_spec.name] = module
        loader_spec.loader.exec_module(module)
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())  # like `python -m`: modules of the current directory
        try:
            module = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name and mod_name.startswith(e.name):
                raise UsageError(f"spec {spec!r}: no module named {e.name!r}") from None
            raise
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise UsageError(f"spec {spec!r}: {mod_name} has no callable {fn_name!r}")
    made = fn()
    if not (isinstance(made, tuple) and len(made) == 2 and callable(made[0])):
        raise UsageError(f"spec {spec!r}: {fn_name}() must return (model, example_inputs)")
    model, inputs = made
    return model, tuple(inputs) if isinstance(inputs, (list, tuple)) else (inputs,)


def ensure_process_group(world_size: int) -> None:
    """Initialise torch's fake process group (*world_size* ranks) unless one exists."""
    import torch.distributed as dist

    if world_size < 1:
        raise UsageError(f"--tp must be >= 1, got {world_size}")
    if not dist.is_initialized():
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)


def compile_and_record(model, inputs, fusion, model_name: str | None) -> list[GraphRecord]:
    """``torch.compile(model)(*inputs)`` with the recorder installed; the graphs it saw.

    The FX-graph and AOT-autograd caches are off for this compile (a cache hit would skip
    the post-grad passes, and with them the recording).
    """
    import torch
    from torch._functorch import config as functorch_config

    from fusion_passes import _compat

    recorder = _recorder_class()(fusion, model_name)
    torch._dynamo.reset()
    with _compat.inductor_config.patch(post_grad_custom_post_pass=recorder, fx_graph_cache=False,
                                       fx_graph_remote_cache=False), \
            functorch_config.patch(enable_autograd_cache=False), torch.no_grad():
        try:
            torch.compile(model)(*inputs)
        except Exception as e:  # noqa: BLE001 - e.g. MoE kernels without a CPU implementation
            if not recorder.graphs:
                raise
            print(f"note: running the compiled model failed after {len(recorder.graphs)} graph(s) were "
                  f"recorded ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                  "the dump holds what was compiled", file=sys.stderr)
    torch._dynamo.reset()
    return recorder.graphs


def record_spec(spec: str, args) -> list[GraphRecord]:
    """Compile *spec* (a callable, or ``capture:MODEL``) under a FusionPass with the command's options."""
    from fusion_passes import FusionPass

    if spec.startswith("capture:"):
        return record_capture(spec.removeprefix("capture:"), args, FusionPass(hoist=args.hoist, backend=args.backend))
    ensure_process_group(args.tp)
    model, inputs = load_spec(spec)
    return compile_and_record(model, inputs, FusionPass(hoist=args.hoist, backend=args.backend), spec)


def record_capture(model: str, args, fusion) -> list[GraphRecord]:
    """vLLM's post-grad graphs of *model* (``tools/capture.py``: real vLLM model code traced
    on CPU under the fake process group, Inductor stopped after the post-grad passes), each
    run through *fusion* with the recorder: the same stages as a compiled callable."""
    try:
        from fusion_passes.tools import capture
    except ImportError as e:
        raise UsageError(f"capture:{model} needs tools/capture.py and vLLM ({e})") from None
    if model not in capture.MODELS:
        raise UsageError(f"capture:{model}: unknown model; known: {', '.join(capture.MODELS)}")
    quant = None if args.quant == "none" else args.quant
    name = f"capture:{model} tp={args.tp} {args.dtype} quant={args.quant} layers={args.layers}"
    recorder = _recorder_class()(fusion, name)
    for gm in capture.trace_vllm(model, tp=args.tp, dtype=args.dtype, quant=quant, layers=args.layers):
        recorder(gm.graph)
    return recorder.graphs


def write(records: list[GraphRecord], out: pathlib.Path) -> list[pathlib.Path]:
    """Write every stage of every graph (text and JSON) under *out*; the paths written."""
    from fusion_passes import graphio

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for rec in records:
        for stage, doc in rec.docs.items():
            head = f"# fusion-passes dump: {doc['model']} {rec.name}, stage {stage!r}\n"
            for ext, text in (("txt", head + rec.texts[stage]), ("json", graphio.dumps(doc))):
                p = out / STAGE_FILES.format(graph=rec.name, stage=stage, ext=ext)
                p.write_text(text)
                written.append(p)
    return written


def run(args) -> int:
    records = record_spec(args.spec, args)
    if not records:
        raise UsageError(f"{args.spec}: torch.compile produced no graph (nothing to dump)")
    written = write(records, pathlib.Path(args.out))
    for rec in records:
        print(f"{rec.name}: {rec.report.summary()}")
    print(f"wrote {len(written)} files to {args.out}/ ({', '.join(sorted({p.name.split('.', 1)[1] for p in written}))})")
    first = records[0].name
    print(f"next: fusion-passes diff {args.out}/{first}.before.json {args.out}/{first}.fused.json")
    return 0
