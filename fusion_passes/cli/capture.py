"""Real post-grad graphs of vLLM models, traced on CPU: :func:`trace_vllm`.

One process serves any TP size: torch's fake process group stands in for the ranks
(collectives trace, never run). The model is a tiny random config of the real
architecture (:mod:`.tiny_configs`) with ``load_format="dummy"``, compiled by vLLM in
``VLLM_COMPILE`` mode with ``custom_ops=["none"]`` and ``ir_enable_torch_wrap=True``,
linear layers on plain ``aten.mm`` (``_cpu_skip_gemm_dispatch``, as on CUDA). What vLLM's
CUDA wheel needs to do this on a CPU (its environment, CUDA's collectives and MoE
runner, FP8 weight loading without CUDA kernels) is the test harness
:mod:`fusion_passes.cli.vllm_cpu`, applied on the first trace.

Python API (tests use it)::

    from fusion_passes.cli.capture import trace_vllm
    graphs = trace_vllm("llama", tp=2, dtype="bfloat16", quant=None, layers=2)

returns the post-grad ``GraphModule``\\ s as vLLM's pass manager hands them to a custom
post pass (BEFORE fusion-passes), cached per process. The Inductor compile is stopped
right after the capture (no code generation), so a trace costs imports + model init +
Dynamo/AOT tracing. The ``fusion-passes capture`` command is :mod:`.capture_cmd`.
"""

from __future__ import annotations

import functools
import tempfile
import uuid

import torch
import torch.fx

from fusion_passes.cli.tiny_configs import DTYPES, MODELS, QUANTS, unsupported, write_config

TOKENS = 16
"""The dummy batch that triggers the compile (any size: vLLM marks it dynamic)."""


def fake_world(tp: int) -> None:
    """A fake process group of *tp* ranks (this process is rank 0); replaces a fake one
    of another size, refuses to replace a real one."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from vllm.distributed import parallel_state as ps

    if dist.is_initialized() and (dist.get_backend() != "fake" or dist.get_world_size() != tp):
        if dist.get_backend() != "fake":
            raise RuntimeError("trace_vllm needs torch's fake process group; a real one is initialized")
        ps.destroy_model_parallel()
        ps.destroy_distributed_environment()
        if dist.is_initialized():
            dist.destroy_process_group()
    if not dist.is_initialized():
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=tp)


def vllm_parallel_state(tp: int, cfg) -> None:
    """vLLM's parallel state (TP group ``tp:N``) on the fake world, rank 0."""
    from vllm.config import set_current_vllm_config
    from vllm.distributed import parallel_state as ps

    with set_current_vllm_config(cfg):
        ps.init_distributed_environment(world_size=tp, rank=0, local_rank=0, backend="fake")
        # per model: the groups depend on the model (an MoE model also gets an EP group)
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        ps.ensure_model_parallel_initialized(tp, 1)


class _Captured(Exception):
    """Raised by the capture pass to stop Inductor after the post-grad passes."""


_CAPTURED: dict[str, list] = {}  # capture-pass key -> graphs (see CapturePass.graphs)


def _capture_pass_cls():
    from vllm.compilation.passes.inductor_pass import InductorPass

    class CapturePass(InductorPass):
        """Copies each post-grad graph it is given; optionally stops the compile."""

        def __init__(self, stop: bool):
            self.stop = stop
            self.key = f"fusion-passes-capture-{uuid.uuid4()}"

        @property
        def graphs(self) -> list[torch.fx.GraphModule]:
            # vLLM deep-copies its compilation config: the copy that runs shares our key
            return _CAPTURED.setdefault(self.key, [])

        def __call__(self, graph: torch.fx.Graph) -> None:
            self.graphs.append(snapshot(graph))
            if self.stop:
                raise _Captured()

        def uuid(self):
            # unique per instance: a compile served from any cache (vLLM's, Inductor's
            # FX-graph or AOTAutograd's) never runs the post-grad passes
            return self.key

    return CapturePass


def snapshot(graph: torch.fx.Graph) -> torch.fx.GraphModule:
    """A ``GraphModule`` holding a node-for-node copy of *graph* (metadata shared)."""
    from fusion_passes import _compat

    root = graph.owning_module if graph.owning_module is not None else torch.nn.Module()
    return torch.fx.GraphModule(root, _compat.copy_graph(graph))


_VLLM_FUSIONS = ("fuse_norm_quant", "fuse_act_quant", "fuse_attn_quant", "fuse_allreduce_rms",
                 "enable_qk_norm_rope_fusion", "fuse_rope_kvcache_cat_mla", "fuse_act_padding",
                 "fuse_mla_dual_rms_norm", "fuse_rope_kvcache", "fuse_qk_norm_rope_kvcache")


def engine_config(path, tp: int, dtype: str, post_pass=None, extra_compilation: dict | None = None):
    """vLLM's config for the tiny model at *path*, in VLLM_COMPILE mode on CPU."""
    from vllm.config import CompilationMode
    from vllm.engine.arg_utils import EngineArgs

    compilation = {"mode": int(CompilationMode.VLLM_COMPILE), "custom_ops": ["none"], "ir_enable_torch_wrap": True,
                   "splitting_ops": [], "inductor_compile_config": {},
                   # vLLM's own fusions off (their passes are CUDA/ROCm-only imports): the
                   # graph is what the plugin route shows us, right after NoOpElimination
                   "pass_config": {k: False for k in _VLLM_FUSIONS}}
    if post_pass is not None:
        compilation["inductor_compile_config"]["post_grad_custom_post_pass"] = post_pass
    compilation.update(extra_compilation or {})
    args = EngineArgs(model=str(path), load_format="dummy", tensor_parallel_size=tp, dtype=dtype,
                      max_model_len=512, max_num_batched_tokens=512, max_num_seqs=16,
                      compilation_config=compilation, seed=0)
    cfg = args.create_engine_config()
    # the CPU platform turns VLLM_COMPILE into Dynamo-only tracing: undo, as on CUDA
    cc = cfg.compilation_config
    cc.mode = CompilationMode.VLLM_COMPILE
    cc.backend = "inductor"
    cc.ir_enable_torch_wrap = True
    if cc.compile_sizes is None:  # the CPU path skips post_init_cudagraph_sizes; the compiled
        cc.compile_sizes = []  # forward looks its range up there (piecewise_backend)
    return cfg


def build_model(cfg):
    """The real vLLM model for *cfg*, dummy weights, linear layers on plain ``aten.mm``."""
    import vllm.ir
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader import get_model

    cfg.kernel_config.ir_op_priority.set_default()
    vllm.ir.set_default_torch_wrap(True)
    with set_current_vllm_config(cfg):
        model = get_model(vllm_config=cfg)
    for module in model.modules():
        if hasattr(module, "quant_method") or isinstance(module, torch.nn.Linear):
            module._cpu_skip_gemm_dispatch = True
    return model


def run_model(model, cfg, tokens: int = TOKENS):
    """One forward of *tokens* tokens (profile-run style: no attention metadata)."""
    from vllm.config import set_current_vllm_config
    from vllm.forward_context import set_forward_context

    ids = torch.zeros(tokens, dtype=torch.long)
    positions = torch.arange(tokens)
    with set_current_vllm_config(cfg), set_forward_context(None, cfg, num_tokens=tokens), torch.no_grad():
        return model(ids, positions)


def _caused_by(e: BaseException, kind) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, kind):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def prepare(quant: str | None) -> None:
    """The CPU recipe (:mod:`fusion_passes.cli.vllm_cpu`) for a model with *quant*."""
    from fusion_passes.cli import vllm_cpu

    vllm_cpu.prepare_process()
    if quant is not None:
        vllm_cpu.prepare_fp8()
    if quant == "fp8_block":
        vllm_cpu.prepare_block_fp8()


ROUTES = ("vllm", "compile_fx")
"""How the model is compiled: ``vllm``: vLLM's own compile (VLLM_COMPILE, its pass manager
calls the post pass; auto-functionalization v1); ``compile_fx``: a plain
``torch.compile(model, backend="inductor")``, Inductor's ``compile_fx`` calling the post
pass itself (torch's defaults: auto-functionalization v2, static shapes)."""


def _compile_until_captured(net, cfg) -> None:
    from fusion_passes import _compat
    functorch_config = _compat.functorch_config()
    inductor_config = _compat.inductor_config

    try:
        with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
            run_model(net, cfg)
    except Exception as e:  # noqa: BLE001 - the capture pass stops the compile on purpose
        if not _caused_by(e, _Captured):
            raise


@functools.lru_cache(maxsize=None)
def _trace_cached(model: str, tp: int, dtype: str, quant: str | None, layers: int, route: str = "vllm") -> tuple:
    prepare(quant)
    fake_world(tp)
    torch.compiler.reset()
    capture = _capture_pass_cls()(stop=True)
    with tempfile.TemporaryDirectory(prefix="fusion-passes-capture-") as root:
        direct = route == "compile_fx"
        cfg = engine_config(write_config(model, layers, dtype, quant, root), tp, dtype, None if direct else capture)
        vllm_parallel_state(tp, cfg)
        net = build_model(cfg)
        if direct:
            from vllm.config import CompilationMode

            cfg.compilation_config.mode = CompilationMode.STOCK_TORCH_COMPILE  # vLLM's decorator compiles nothing
            net = torch.compile(net, backend="inductor", fullgraph=True,
                                options={"post_grad_custom_post_pass": capture})
        _compile_until_captured(net, cfg)
    torch.compiler.reset()
    graphs = _CAPTURED.pop(capture.key, [])
    if not graphs:
        raise RuntimeError(f"trace_vllm({model!r}): vLLM compiled no graph")
    return tuple(graphs)


def trace_vllm(model: str, tp: int = 2, dtype: str = "bfloat16", quant: str | None = None,
               layers: int = 2, route: str = "vllm") -> list[torch.fx.GraphModule]:
    """vLLM's post-grad graphs of *model* (before fusion-passes), traced on CPU.

    *model*: one of :data:`MODELS`; *tp*: tensor-parallel size (fake ranks, one of
    :data:`~.tiny_configs.TP_SIZES`); *dtype*: ``"bfloat16"`` / ``"float16"``; *quant*: one
    of :data:`QUANTS`; *layers*: decoder layers; *route*: one of :data:`ROUTES`. Unsupported combinations raise
    ``ValueError`` before anything is built (:func:`~.tiny_configs.unsupported`). Cached per
    process: returns fresh copies of the cached graphs, so callers may rewrite them. The
    first call of a process pays the vLLM import.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if not isinstance(layers, int) or layers < 1:
        raise ValueError(f"layers must be an integer >= 1, got {layers!r}")
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    why = unsupported(model, tp, quant)
    if why is not None:
        raise ValueError(why)
    return [snapshot(gm.graph) for gm in _trace_cached(model, tp, dtype, quant, layers, route)]


__all__ = ["MODELS", "DTYPES", "QUANTS", "ROUTES", "TOKENS", "trace_vllm", "engine_config", "build_model", "run_model",
           "snapshot", "fake_world", "vllm_parallel_state", "prepare"]
