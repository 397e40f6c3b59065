"""``fusion-passes bench compile``: what our passes cost inside a real vLLM compile.

A DeepSeek-V3-shaped model (real vLLM layers: MLA attention, first layer dense, MoE after;
tiny hidden size) is compiled by vLLM's Inductor backend on CPU under torch's fake process
group (see :mod:`fusion_passes.cli.capture`) with :class:`fusion_passes.vllm.VllmFusionPass`
in its pass manager. For each layer count it reports the whole compile (Dynamo + AOT +
post-grad passes + Inductor code generation and C++ build) and the seconds spent in our
pass, from the pass's own :class:`~fusion_passes.FusionReport` timings. Goal: our pass
under 3% of the compile and linear in layers.

Every compile starts cold: a fresh Inductor cache directory and no FX-graph cache.
``splitting_ops=[]``: one graph per model (vLLM's piecewise split compiles the same layers
as N smaller graphs; our pass sees the same nodes either way).

``--pass-only`` traces each model (Dynamo + AOT, no code generation) and times our pass
alone on the post-grad graph, best of 3: how it scales in layers without the noise of a
compile on a shared machine.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time

DEFAULT_LAYERS = (8, 16, 32, 61)  # 61: DeepSeek-V3's real depth (config.json num_hidden_layers)


def add_arguments(parser) -> None:
    """The benchmark's options."""
    from fusion_passes.cli.arguments import MAX_LAYERS, int_range
    from fusion_passes.cli.tiny_configs import DTYPES, MODELS, TP_SIZES

    parser.add_argument("--layers", type=int_range(1, MAX_LAYERS), nargs="+", default=list(DEFAULT_LAYERS),
                        help="decoder layer counts to compile (default: 8 16 32 61)")
    parser.add_argument("--tp", type=int, default=8, choices=TP_SIZES, help="tensor-parallel size (fake ranks; default 8)")
    parser.add_argument("--model", default="deepseek_v3", choices=MODELS,
                        help="a model of `fusion-passes capture` (default deepseek_v3)")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--pass-only", action="store_true",
                        help="trace each model once (no Inductor code generation) and time only our pass on "
                             "the post-grad graph, best of 3: its scaling in layers without compile noise")


_REPORTS: list = []  # every report of every TimedPass copy (vLLM deep-copies its config)


def _timed_pass_cls():
    from fusion_passes.vllm import VllmFusionPass

    class TimedPass(VllmFusionPass):
        """VllmFusionPass whose reports land in a module-level list, whichever copy runs."""

        def __call__(self, graph) -> None:
            super().__call__(graph)
            _REPORTS.append(self.report)

    return TimedPass


def compile_once(model: str, layers: int, tp: int, dtype: str) -> dict:
    """Compile *model* with *layers* layers cold; the row of timings."""
    from fusion_passes import _compat
    import torch
    inductor_config = _compat.inductor_config

    from fusion_passes.cli import capture
    from fusion_passes.cli import vllm_cpu
    from fusion_passes.cli.tiny_configs import write_config

    capture.prepare(None)
    capture.fake_world(tp)
    vllm_cpu.patch_cpu_wheel_for_compile()
    torch.compiler.reset()
    fusion = _timed_pass_cls()()
    _REPORTS.clear()
    with tempfile.TemporaryDirectory(prefix="fusion-passes-bench-") as root:
        path = write_config(model, layers, dtype, None, root)
        cfg = capture.engine_config(path, tp, dtype, fusion)
        capture.vllm_parallel_state(tp, cfg)
        net = capture.build_model(cfg)
        old_dir = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(root, "inductor")
        try:
            with inductor_config.patch(fx_graph_cache=False, autotune_local_cache=False):
                start = time.perf_counter()
                error = None
                try:
                    capture.run_model(net, cfg)
                except Exception as e:  # noqa: BLE001 - see below
                    # MoE kernels have no CPU implementation in the CUDA wheel: the forward
                    # after the compile fails for MoE models. The compile itself finished
                    # if our pass saw the graph and Inductor wrote code (checked below).
                    error = f"{type(e).__name__}: {str(e)[:200]}"
                total = time.perf_counter() - start
        finally:
            if old_dir is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = old_dir
    torch.compiler.reset()
    ours = sum(r.seconds for r in _REPORTS)
    sites = sum(len(r.sites) for r in _REPORTS)
    fused = sum(len(r.fused) for r in _REPORTS)
    return {"model": model, "layers": layers, "tp": tp, "dtype": dtype, "compile_s": round(total, 3),
            "ours_s": round(ours, 4), "ratio": ours / total if total else None, "graphs": len(_REPORTS),
            "all_reduces": sites, "fused": fused, "ours_ms_per_layer": round(1e3 * ours / layers, 3),
            "forward_error": error}


def pass_only(model: str, layers: int, tp: int, dtype: str, repeats: int = 3) -> dict:
    """Our pass alone on *model*'s post-grad graph (traced, not compiled), best of *repeats*."""
    from fusion_passes import FusionPass
    from fusion_passes.cli import capture

    best, report = float("inf"), None
    for _ in range(repeats):
        (gm,) = capture.trace_vllm(model, tp, dtype, None, layers)  # cached: a fresh copy each time
        fusion = FusionPass()
        start = time.perf_counter()
        fusion(gm.graph)
        best, report = min(best, time.perf_counter() - start), fusion.report
    nodes = len(capture.trace_vllm(model, tp, dtype, None, layers)[0].graph.nodes)
    return {"model": model, "layers": layers, "tp": tp, "dtype": dtype, "ours_s": round(best, 4),
            "ours_ms_per_layer": round(1e3 * best / layers, 3), "nodes": nodes,
            "all_reduces": len(report.sites), "fused": len(report.fused)}


def run(args) -> int:
    rows = []
    if args.pass_only:
        for n in args.layers:
            row = pass_only(args.model, n, args.tp, args.dtype)
            rows.append(row)
            if not args.json:
                print(f"{row['model']} {n:3d} layers: {row['nodes']} nodes, ours {row['ours_s'] * 1e3:8.1f} ms, "
                      f"{row['ours_ms_per_layer']:.2f} ms/layer, {row['fused']}/{row['all_reduces']} fused", flush=True)
        return _print_json(rows) if args.json else 0
    for n in args.layers:
        row = compile_once(args.model, n, args.tp, args.dtype)
        rows.append(row)
        if not args.json:
            print(f"{row['model']} {n:3d} layers: compile {row['compile_s']:8.1f} s, ours {row['ours_s'] * 1e3:8.1f} ms "
                  f"({100 * row['ratio']:.2f}%), {row['ours_ms_per_layer']:.2f} ms/layer, "
                  f"{row['fused']}/{row['all_reduces']} all-reduces fused"
                  + (f" (forward after compile: {row['forward_error']})" if row["forward_error"] else ""), flush=True)
    return _print_json(rows) if args.json else 0


def _print_json(rows: list[dict]) -> int:
    import torch
    import vllm

    print(json.dumps({"machine": platform.node(), "cpus": os.cpu_count(), "torch": torch.__version__,
                      "vllm": vllm.__version__, "rows": rows}, indent=2))
    return 0


__all__ = ["compile_once", "DEFAULT_LAYERS"]
