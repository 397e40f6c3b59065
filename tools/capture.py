"""``fusion-passes capture``: real post-grad graphs of vLLM models, traced on CPU.

One process serves any TP size: torch's fake process group stands in for the ranks
(collectives trace, never run), as DESIGN.md section 7 records. The recipe:
``VLLM_TARGET_DEVICE=cpu``, ``HF_HUB_OFFLINE=1``, a tiny random ``config.json`` written
with the transformers config classes, ``load_format="dummy"``, compilation
``custom_ops=["none"]`` + ``ir_enable_torch_wrap=True`` in ``VLLM_COMPILE`` mode, the
platform's ``use_custom_op_collectives`` -> True (CUDA's ``torch.ops.vllm.all_reduce``),
MoE runners on the opaque ``torch.ops.vllm.moe_forward(_shared)`` (CUDA's path),
``_cpu_skip_gemm_dispatch`` on linear layers (plain ``aten.mm`` as on CUDA),
``dist.new_group`` forced to the fake backend and vLLM's shared-memory MessageQueue off.

Python API (other tests use it)::

    from fusion_passes.tools.capture import trace_vllm
    graphs = trace_vllm("llama", tp=2, dtype="bfloat16", quant=None, layers=2)

returns the post-grad ``GraphModule``\\ s as vLLM's pass manager hands them to a custom
post pass (BEFORE fusion-passes), cached per process. The Inductor compile is stopped
right after the capture (no code generation), so a trace costs imports + model init +
Dynamo/AOT tracing. HF transformers models with ``tp_plan`` come from
:mod:`fusion_passes.tools.hf_tp` (2 gloo processes) when that module is present.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import pathlib
import tempfile
import time
import uuid

import torch
import torch.fx

MODELS = ("llama", "deepseek_v3", "qwen3_moe", "mixtral", "gemma3")
"""Models :func:`trace_vllm` knows, each a tiny random config of the real architecture."""

DTYPES = ("bfloat16", "float16")
QUANTS = (None, "fp8_static", "fp8_dynamic", "fp8_block")
TOKENS = 16  # the dummy batch that triggers the compile (any size: vLLM marks it dynamic)
HIDDEN = 256  # tiny, but a multiple of the 128 of block FP8 and of 8 ranks x 8 lanes


# ----------------------------------------------------------------- tiny model configs


def _hf_config(model: str, layers: int, dtype: str):
    """A transformers config object of *model*'s real architecture, tiny and random."""
    common = dict(hidden_size=HIDDEN, num_hidden_layers=layers, vocab_size=512, max_position_embeddings=512,
                  torch_dtype=dtype)
    if model == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(intermediate_size=512, num_attention_heads=8, num_key_value_heads=8,
                           architectures=["LlamaForCausalLM"], **common)
    if model == "mixtral":
        from transformers import MixtralConfig

        return MixtralConfig(intermediate_size=512, num_attention_heads=8, num_key_value_heads=8,
                             num_local_experts=4, num_experts_per_tok=2, architectures=["MixtralForCausalLM"], **common)
    if model == "qwen3_moe":
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(intermediate_size=512, moe_intermediate_size=256, num_attention_heads=8,
                              num_key_value_heads=8, head_dim=32, num_experts=4, num_experts_per_tok=2,
                              decoder_sparse_step=1, mlp_only_layers=[], architectures=["Qwen3MoeForCausalLM"],
                              **common)
    if model == "deepseek_v3":
        from transformers import DeepseekV3Config

        # first_k_dense_replace=1: layer 0 has a dense MLP, the rest are MoE (as the real model);
        # moe_intermediate_size 256: at TP=2 each shard of the shared experts' down_proj is
        # one whole 128-block, as block FP8 requires (fp8_utils.validate_fp8_block_shape)
        return DeepseekV3Config(intermediate_size=512, moe_intermediate_size=256, num_attention_heads=8,
                                num_key_value_heads=8, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                                n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=128, kv_lora_rank=128,
                                qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32, routed_scaling_factor=2.5,
                                architectures=["DeepseekV3ForCausalLM"], **common)
    if model == "gemma3":
        from transformers import Gemma3TextConfig

        return Gemma3TextConfig(intermediate_size=512, num_attention_heads=8, num_key_value_heads=8, head_dim=32,
                                sliding_window=64, architectures=["Gemma3ForCausalLM"], **common)
    raise ValueError(f"unknown model {model!r}; known: {', '.join(MODELS)}")


def _quant_config(quant: str | None) -> dict | None:
    """The ``quantization_config`` of an FP8 checkpoint (vLLM's ``fp8`` method)."""
    if quant is None:
        return None
    if quant == "fp8_static":
        return {"quant_method": "fp8", "activation_scheme": "static"}
    if quant == "fp8_dynamic":
        return {"quant_method": "fp8", "activation_scheme": "dynamic"}
    if quant == "fp8_block":
        return {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    raise ValueError(f"unknown quant {quant!r}; known: {', '.join(str(q) for q in QUANTS)}")


def write_config(model: str, layers: int, dtype: str, quant: str | None, root: str | os.PathLike) -> pathlib.Path:
    """Write *model*'s tiny ``config.json`` under *root*; returns the model directory."""
    cfg = _hf_config(model, layers, dtype)
    if (q := _quant_config(quant)) is not None:
        cfg.quantization_config = q
    path = pathlib.Path(root, f"{model}-{layers}l-{dtype}-{quant or 'none'}")
    cfg.save_pretrained(path)
    return path


# ------------------------------------------------------------------- environment


_ENV = {"VLLM_TARGET_DEVICE": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CONFIGURE_LOGGING": "0"}
# Forced, not defaults: a compile served from vLLM's cache (~/.cache/vllm, shared by every
# run on the machine) never reaches the post-grad passes, so there would be no graph. AOT
# compile ON (vLLM's default path with torch >= 2.10; it turns off by default when the
# cache is disabled, and the other path compiled nothing here), never loaded nor saved.
_FORCED_ENV = {"VLLM_DISABLE_COMPILE_CACHE": "1", "VLLM_USE_AOT_COMPILE": "1"}


@functools.lru_cache(maxsize=1)
def _prepare_process() -> None:
    """Process-wide patches of the recipe (idempotent; done once, before vLLM imports)."""
    for k, v in _ENV.items():
        os.environ.setdefault(k, v)
    os.environ.update(_FORCED_ENV)
    import torch.distributed as dist

    if not getattr(dist.new_group, "_fusion_passes_fake", False):
        original = dist.new_group

        def new_group(*args, **kwargs):
            if dist.get_backend() == "fake":  # every group of a fake world is fake
                kwargs["backend"] = "fake"
            return original(*args, **kwargs)

        new_group._fusion_passes_fake = True
        dist.new_group = new_group

    from vllm.platforms import current_platform

    type(current_platform).use_custom_op_collectives = classmethod(lambda cls: True)  # as CUDA
    from vllm.distributed.device_communicators.cpu_communicator import CpuCommunicator

    def all_reduce_out_of_place(self, input_):
        # The custom op's contract (and CUDA's communicators): a NEW tensor. vLLM's CPU
        # communicator reduces in place and returns its input, which Inductor (told the op
        # is functional) may then overwrite by reusing the input's buffer. Matters only when
        # the graph runs (tools/vllm_e2e.py); tracing never calls it.
        out = input_.clone()
        self.dist_module.all_reduce(out, group=self.device_group)
        return out

    CpuCommunicator.all_reduce = all_reduce_out_of_place
    from vllm.distributed.device_communicators import shm_broadcast

    # a shared-memory broadcaster waits for readers that a fake world never starts
    shm_broadcast.MessageQueue.create_from_process_group = staticmethod(lambda *a, **k: None)
    from vllm.model_executor.layers.fused_moe.runner import moe_runner

    def select_forward(self):  # CUDA's choice: the opaque custom ops
        return torch.ops.vllm.moe_forward if self._shared_experts is None else torch.ops.vllm.moe_forward_shared

    moe_runner.MoERunner._select_forward = select_forward
    if not hasattr(torch.ops._C, "prepack_moe_weight"):
        # the CUDA wheel on CPU has no CPU MoE kernels: skip their weight prepacking (the
        # experts stay behind the opaque moe_forward op, which tracing never runs)
        from vllm.model_executor.layers.fused_moe.experts import cpu_moe

        cpu_moe.CPUUnquantizedExperts.process_weights_after_loading = lambda self, layer: None


@functools.lru_cache(maxsize=1)
def _prepare_block_fp8() -> None:
    """What block FP8 (``quant="fp8_block"``) needs on this CPU; none of it touches the graph
    around the norms:

    * the block-FP8 linear kernel: vLLM's CPU kernels need AMX tiles
      ("CPUFp8W8A8BlockScaledMMKernel requires AMX tile support"); take vLLM's own
      ``TritonFp8BlockScaledMMKernel`` (ROCm's and XPU's choice; its GEMM is the opaque
      ``vllm.w8a8_triton_block_scaled_mm_func``), whose input quant is
      ``QuantFP8(dynamic, GroupShape(1, 128), use_ue8m0=False)``, row-major scales;
    * FP8 MoE weights: there is no FP8 MoE backend on CPU ("Unsupported FP8 MoE backend:
      NONE"); the experts sit behind the opaque ``moe_forward(_shared)`` op, which tracing
      never runs, so their weight conversion is skipped.
    """
    from vllm.model_executor.kernels.linear import _POSSIBLE_FP8_BLOCK_KERNELS
    from vllm.model_executor.kernels.linear.scaled_mm.triton import TritonFp8BlockScaledMMKernel
    from vllm.model_executor.layers.quantization.fp8 import Fp8MoEMethod
    from vllm.platforms import PlatformEnum

    class TritonBlockFp8(TritonFp8BlockScaledMMKernel):
        @classmethod
        def is_supported(cls, compute_capability=None):
            return True, None

    _POSSIBLE_FP8_BLOCK_KERNELS[PlatformEnum.CPU] = [TritonBlockFp8]
    Fp8MoEMethod.process_weights_after_loading = lambda self, layer: None


def _fake_world(tp: int) -> None:
    """A fake process group of *tp* ranks and vLLM's parallel state on it (rank 0)."""
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


def _vllm_parallel_state(tp: int, cfg) -> None:
    """vLLM's parallel state (TP group ``tp:N``) on the fake world, rank 0."""
    from vllm.config import set_current_vllm_config
    from vllm.distributed import parallel_state as ps

    with set_current_vllm_config(cfg):
        ps.init_distributed_environment(world_size=tp, rank=0, local_rank=0, backend="fake")
        # per model: the groups depend on the model (an MoE model also gets an EP group)
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        ps.ensure_model_parallel_initialized(tp, 1)


def patch_cpu_wheel_for_compile() -> None:
    """vLLM's FixFunctionalizationPass names ``torch.ops._C.rotary_embedding``, absent from the
    CUDA wheel running on CPU; it has nothing to fix in these graphs, so skip it there."""
    from vllm.compilation.passes.utility import fix_functionalization as ff

    if hasattr(torch.ops._C, "rotary_embedding") or getattr(ff.FixFunctionalizationPass, "_fp_patched", False):
        return
    ff.FixFunctionalizationPass.__call__ = lambda self, graph: None
    ff.FixFunctionalizationPass._fp_patched = True


# ----------------------------------------------------------------------- capture


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
    gm = torch.fx.GraphModule(root, _compat.copy_graph(graph))
    return gm


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


@functools.lru_cache(maxsize=None)
def _trace_cached(model: str, tp: int, dtype: str, quant: str | None, layers: int) -> tuple:
    _prepare_process()
    if quant is not None:  # FP8 weight loading runs vLLM's _C quant ops (CUDA-only)
        from fusion_passes.tools.vllm_cpu_ops import register_c_quant_ops

        if not register_c_quant_ops():
            raise RuntimeError(f"trace_vllm(quant={quant!r}): vLLM's _C quant ops are missing (its CUDA "
                               "extension does not load here) and could not be registered from the "
                               "vLLM 0.33 wheel's schemas (fusion_passes.tools.vllm_cpu_ops)")
    if quant == "fp8_block":
        _prepare_block_fp8()
    _fake_world(tp)
    torch._dynamo.reset()
    capture = _capture_pass_cls()(stop=True)
    with tempfile.TemporaryDirectory(prefix="fusion-passes-capture-") as root:
        path = write_config(model, layers, dtype, quant, root)
        cfg = engine_config(path, tp, dtype, capture)
        _vllm_parallel_state(tp, cfg)
        net = build_model(cfg)
        try:
            from torch._inductor import config as inductor_config

            from torch._functorch import config as functorch_config

            with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
                run_model(net, cfg)
        except Exception as e:  # noqa: BLE001 - the capture pass stops the compile on purpose
            if not _caused_by(e, _Captured):
                raise
    torch._dynamo.reset()
    graphs = _CAPTURED.pop(capture.key, [])
    if not graphs:
        raise RuntimeError(f"trace_vllm({model!r}): vLLM compiled no graph")
    return tuple(graphs)


def trace_vllm(model: str, tp: int = 2, dtype: str = "bfloat16", quant: str | None = None,
               layers: int = 2) -> list[torch.fx.GraphModule]:
    """vLLM's post-grad graphs of *model* (before fusion-passes), traced on CPU.

    *model*: one of :data:`MODELS`; *tp*: tensor-parallel size (fake ranks, any size);
    *dtype*: ``"bfloat16"`` / ``"float16"``; *quant*: one of :data:`QUANTS`; *layers*:
    decoder layers. Cached per process: returns fresh copies of the cached graphs, so
    callers may rewrite them. The first call of a process pays the vLLM import.
    """
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; known: {', '.join(MODELS)}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    _quant_config(quant)
    return [snapshot(gm.graph) for gm in _trace_cached(model, tp, dtype, quant, layers)]


# ------------------------------------------------------------ HF transformers (tp_plan)


def _hf_worker(rank: int, directory: str, dtype: str) -> list[dict]:
    """On each gloo rank: load with tp_plan, compile full-graph, capture every post-grad
    graph before and after FusionPass (text + report). Rank 0's result is kept."""
    import torch._inductor.config as inductor_config

    from fusion_passes import FusionPass, _compat
    from fusion_passes.tools import hf_tp

    model = hf_tp.load_tp(directory, getattr(torch, dtype))
    for module in model.modules():  # Qwen3-MoE's plan hooks q/k norms for backward: inference only
        if getattr(module, "_backward_hooks", None):
            module._backward_hooks.clear()
    out: list[dict] = []

    class Capture(_compat.CustomGraphPass):
        def __call__(self, graph):
            before = snapshot(graph).print_readable(print_output=False)
            fusion = FusionPass()
            fusion(graph)
            out.append({"before": before, "after": snapshot(graph).print_readable(print_output=False),
                        "report": fusion.report.to_dict(), "summary": fusion.report.summary()})

        def uuid(self):
            return None  # never cached: we want to see the graph

    ids = torch.arange(TOKENS).view(1, TOKENS) % 64
    with inductor_config.patch(post_grad_custom_post_pass=Capture(), fx_graph_cache=False), torch.no_grad():
        torch.compile(model, fullgraph=True)(ids)
    return out if rank == 0 else []


def trace_hf(model: str, dtype: str = "bfloat16", world_size: int = 2) -> list[dict]:
    """HF transformers *model* (a key of :data:`fusion_passes.tools.hf_tp.MODELS`) loaded with
    ``tp_plan="auto"`` on *world_size* gloo processes: per post-grad graph, its text before
    and after FusionPass and the report (rank 0). Costs about a minute per model."""
    from fusion_passes.tools import hf_tp

    return hf_tp.spawn(_hf_worker, world_size, hf_tp.tiny_dir(model), dtype)[0]


# --------------------------------------------------------------------------- CLI


def add_arguments(parser) -> None:
    parser.add_argument("--model", action="append", choices=MODELS, help="model(s) to trace (default: all)")
    parser.add_argument("--tp", type=int, default=2, choices=(2, 4, 8), help="tensor-parallel size (fake ranks)")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    parser.add_argument("--quant", default="none", choices=[q or "none" for q in QUANTS])
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    parser.add_argument("--out", default="captured", help="directory for the graphs (default ./captured)")
    parser.add_argument("--json", action="store_true", help="print the fusion reports as JSON")
    parser.add_argument("--hf", action="append", metavar="MODEL",
                        help="also trace this HF transformers model with tp_plan on 2 gloo processes "
                             "(llama, deepseek_v3, qwen3_moe)")


def run(args) -> int:
    from fusion_passes import FusionPass

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    quant = None if args.quant == "none" else args.quant
    results = {}
    for model in args.model or MODELS:
        start = time.perf_counter()
        try:
            graphs = trace_vllm(model, args.tp, args.dtype, quant, args.layers)
        except Exception as e:  # noqa: BLE001 - one model failing must not hide the others
            results[model] = {"error": f"{type(e).__name__}: {e}"}
            print(f"{model}: trace failed: {type(e).__name__}: {e}")
            continue
        stem = f"vllm-{model}-tp{args.tp}-{args.dtype}-{args.quant}"
        fusion = FusionPass()
        reports = []
        for i, gm in enumerate(graphs):
            _write(out / f"{stem}-g{i}-before", gm)
            fusion(gm.graph)
            gm.recompile()
            _write(out / f"{stem}-g{i}-after", gm)
            reports.append(fusion.report.to_dict())
            if not args.json:
                print(f"{stem} graph {i}: {fusion.report.summary()}  ({time.perf_counter() - start:.1f} s)")
                print(fusion.report.table())
        results[model] = {"graphs": len(graphs), "reports": reports}
    for model in args.hf or ():
        try:
            graphs = trace_hf(model, args.dtype)
        except Exception as e:  # noqa: BLE001 - one model failing must not hide the others
            results[f"hf:{model}"] = {"error": f"{type(e).__name__}: {e}"}
            print(f"hf {model}: trace failed: {type(e).__name__}: {e}")
            continue
        stem = f"hf-{model}-tp2-{args.dtype}"
        for i, g in enumerate(graphs):
            (out / f"{stem}-g{i}-before.txt").write_text(g["before"])
            (out / f"{stem}-g{i}-after.txt").write_text(g["after"])
            if not args.json:
                print(f"{stem} graph {i}: {g['summary']}")
        results[f"hf:{model}"] = {"graphs": len(graphs), "reports": [g["report"] for g in graphs]}
    if args.json:
        print(json.dumps(results, indent=2))
    return 0 if all("error" not in r for r in results.values()) else 1


def _write(stem: pathlib.Path, gm: torch.fx.GraphModule) -> None:
    """The graph as text, and as JSON when :mod:`fusion_passes.graphio` exists."""
    stem.with_suffix(".txt").write_text(gm.print_readable(print_output=False))
    with contextlib.suppress(ImportError):
        from fusion_passes import graphio

        dump = getattr(graphio, "dump", None) or getattr(graphio, "write", None)
        if dump is not None:
            with contextlib.suppress(Exception):
                dump(gm, stem.with_suffix(".json"))


__all__ = ["MODELS", "DTYPES", "QUANTS", "trace_vllm", "trace_hf", "write_config", "engine_config", "build_model",
           "run_model", "snapshot"]
