"""``bench model --dry-run``: trace the benchmark's models on CPU and report the pass's sites.

Under torch's fake process group (collectives trace, never run) each model is built as
the GPU run builds it (the same config, hooks, FP8 linears, cache and step; weights left
uninitialized: tracing reads no value), compiled by Inductor up to its post-grad passes,
where :class:`fusion_passes.FusionPass` runs and reports; code generation is skipped.
World size 1: the explicit all-reduces over a one-rank group. World size N: HF's
``tp_plan`` (a model saved and loaded sharded; needs a checkpoint on disk, so N > 1
builds initialized weights). A model that yields no site, or a pass error, fails the run.
"""

from __future__ import annotations

import os
import tempfile
import time

import torch
import torch.distributed as dist

from fusion_passes.cli import model_step, models


class _Stop(Exception):
    """Raised by the capture pass: the graph was seen, skip code generation."""


def fake_world(world: int):
    """A process group of *world* fake ranks (this process is rank 0), and the group the
    one-rank form reduces over: the world itself, or a one-rank subgroup of a larger
    fake world that already exists (e.g. a test session's)."""
    if not dist.is_initialized():
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    have = dist.get_world_size()
    if world == 1:
        return dist.group.WORLD if have == 1 else dist.new_group([dist.get_rank()])
    if have != world:
        raise RuntimeError(f"a process group of {have} ranks exists; a dry run at world size {world} "
                           "needs a fresh process")
    return dist.group.WORLD


def _capture_pass(reports: list):
    from fusion_passes import FusionPass, _compat

    class Capture(_compat.CustomGraphPass):
        def __call__(self, graph):
            fusion = FusionPass()
            fusion(graph)
            reports.append(fusion.report)
            raise _Stop()

        def uuid(self):
            return None  # never cached: the pass must see the graph

    return Capture()


def trace(model, ids, cache) -> list:
    """The pass's reports for one compiled step (Dynamo + AOT + post-grad; no codegen)."""
    from fusion_passes import _compat
    functorch_config = _compat.functorch_config()
    inductor_config = _compat.inductor_config

    reports: list = []
    torch.compiler.reset()
    with inductor_config.patch(post_grad_custom_post_pass=_capture_pass(reports), fx_graph_cache=False), \
            functorch_config.patch(enable_autograd_cache=False), torch.no_grad():
        try:
            models.step(torch.compile(model, fullgraph=True, dynamic=False), ids, cache)
        except Exception as e:  # noqa: BLE001 - the capture pass stops the compile on purpose
            cause = e
            while cause is not None and not isinstance(cause, _Stop):
                cause = cause.__cause__ or cause.__context__
            if cause is None:
                raise
    torch.compiler.reset()
    return reports


def load_tp_tiny(name: str, layers: int, tiny: bool) -> torch.nn.Module:
    """HF's tp_plan form on the current (fake) group: rank 0's random model saved, loaded sharded."""
    from fusion_passes.cli import hf_tp

    # transformers sizes its tensor-parallel mesh from torchrun's variables
    env = {"RANK": str(dist.get_rank()), "WORLD_SIZE": str(dist.get_world_size()), "LOCAL_RANK": "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with tempfile.TemporaryDirectory(prefix="fusion-passes-bench-model-") as root:
            models.build(name, layers, tiny=tiny).save_pretrained(root)
            model = hf_tp.load_tp(root, torch.bfloat16)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    for m in model.modules():  # Qwen3-MoE's plan hooks q/k norms for backward: inference only
        m._backward_hooks.clear()
    return model


def dry_run(names, precisions, pts, *, layers: int, world: int, tiny: bool, fp8_linear: str,
            out=print) -> list[dict]:
    """Trace every (model, precision, point); one row each. Raises RuntimeError when a
    model yields no site or the pass reports an error."""
    group = fake_world(world)
    rows = []
    for name in names:
        for precision in precisions:
            if world == 1:
                model = models.build(name, layers, tiny=tiny, init=False)
                models.reduce_explicitly(model, group.group_name)
            else:
                model = load_tp_tiny(name, layers, tiny)
            if precision == "fp8":
                models.to_fp8(model, fp8_linear)
            for p in pts:
                rows.append(_trace_point(model, name, precision, p, world, out))
    return rows


def _trace_point(model, name, precision, p, world, out) -> dict:
    ids, cache = model_step.inputs(model, p, "cpu", world)
    t0 = time.perf_counter()
    reports = trace(model, ids, cache)
    layers = model.config.num_hidden_layers
    pick = model_step.runtime_backend_fn(model.config.hidden_size, world, p.batch * p.seq, "cpu")
    s = model_step.sites(reports, layers, pick)
    row = {"model": name, "precision": precision, "world_size": world, "kind": p.kind, "tokens": p.tokens,
           "trace_s": round(time.perf_counter() - t0, 2), "sites": s}
    variants = ", ".join(f"{k} x{v}" for k, v in sorted(s["variants"].items()))
    out(f"{name} {precision} {p.label} (world size {world}): {s['fused']}/{s['total']} all-reduces fused "
        f"({s['per_layer']:g} per layer; {variants}; backend here: "
        f"{', '.join(s['backends']) or '-'}) in {row['trace_s']:.1f} s")
    for reason in s["unfused_reasons"]:
        out(f"    not fused: {reason}")
    if not s["total"]:
        raise RuntimeError(f"{name} {precision} {p.label}: the compiled step has no all-reduce site")
    if s["errors"]:
        raise RuntimeError(f"{name} {precision} {p.label}: the pass failed: {s['errors']}")
    return row
