"""``fusion-passes capture``: trace real vLLM models on CPU and write their post-grad graphs
before and after our passes (text and JSON dumps), with each graph's report.

The tracing is :func:`fusion_passes.cli.capture.trace_vllm`; ``--hf MODEL`` also
captures a Hugging Face transformers model loaded with ``tp_plan`` on 2 gloo processes
(:func:`fusion_passes.cli.hf_tp.trace_hf`). Every model, TP size and quant is checked
before any model is built; one model failing to trace is reported and does not hide the
others (exit 1). Files appear in ``--out`` only when the command ends.
"""

from __future__ import annotations

import json
import time

from fusion_passes.cli import terminal
from fusion_passes.cli.arguments import add_vllm_model_options, path_argument
from fusion_passes.cli import UsageError
from fusion_passes.cli.tiny_configs import MODELS, unsupported


def add_arguments(parser) -> None:
    """The command's options."""
    from fusion_passes.cli.hf_tp import MODELS as HF_MODELS

    parser.add_argument("--model", action="append", choices=MODELS, help="model(s) to trace (default: all)")
    add_vllm_model_options(parser)
    parser.add_argument("--out", default="captured", type=path_argument,
                        help="folder for the graphs (default: ./captured)")
    parser.add_argument("--json", action="store_true", help="print the fusion reports as one JSON object")
    parser.add_argument("--hf", action="append", metavar="MODEL", choices=sorted(HF_MODELS),
                        help="also trace this HF transformers model with tp_plan on 2 gloo processes "
                             f"({', '.join(sorted(HF_MODELS))})")


def _check(args) -> list[str]:
    quant = None if args.quant == "none" else args.quant
    models = args.model or list(MODELS)
    for model in models:
        why = unsupported(model, args.tp, quant)
        if why is not None:
            raise UsageError(f"{model}: {why}")
    return models


def _capture_vllm(model: str, args, out, results: dict) -> None:
    from fusion_passes import FusionPass
    from fusion_passes.cli import capture, graphio

    quant = None if args.quant == "none" else args.quant
    with terminal.step(f"tracing vLLM {model} (tp {args.tp}, {args.dtype}, quant {args.quant})"):
        start = time.perf_counter()
        graphs = capture.trace_vllm(model, args.tp, args.dtype, quant, args.layers)
    stem = f"vllm-{model}-tp{args.tp}-{args.dtype}-{args.quant}"
    name = f"capture:{model} tp={args.tp} {args.dtype} quant={args.quant} layers={args.layers}"
    reports = []
    for i, gm in enumerate(graphs):
        fusion = FusionPass()
        for stage, suffix in (("before", "before"), ("fused", "after")):
            if stage == "fused":
                fusion(gm.graph)
                gm.recompile()
            out.write(f"{stem}-g{i}-{suffix}.txt", gm.print_readable(print_output=False))
            doc = graphio.graph_to_dict(gm.graph, stage=stage, model=name, graph_name=f"graph_{i}",
                                        report=fusion.report.to_dict() if stage == "fused" else None)
            out.write(f"{stem}-g{i}-{suffix}.json", graphio.dumps(doc))
        reports.append(fusion.report.to_dict())
        if not args.json:
            print(f"{stem} graph {i}: {fusion.report.summary()}  ({time.perf_counter() - start:.1f} s)")
            print(terminal.printable_lines(fusion.report.table()))
    results[model] = {"graphs": len(graphs), "reports": reports}


def _capture_hf(model: str, args, out, results: dict) -> None:
    from fusion_passes.cli.hf_tp import trace_hf

    with terminal.step(f"loading HF {model} with tp_plan on 2 gloo processes and compiling"):
        graphs = trace_hf(model, args.dtype)
    stem = f"hf-{model}-tp2-{args.dtype}"
    for i, g in enumerate(graphs):
        out.write(f"{stem}-g{i}-before.txt", g["before"])
        out.write(f"{stem}-g{i}-after.txt", g["after"])
        if not args.json:
            print(f"{stem} graph {i}: {g['summary']}")
    results[f"hf:{model}"] = {"graphs": len(graphs), "reports": [g["report"] for g in graphs]}


def run(args) -> int:
    """Check everything, trace each model, write what traced; 1 if any model failed."""
    from fusion_passes.cli.outputs import OutputDir

    models = _check(args)
    results: dict[str, dict] = {}
    with OutputDir(args.out) as out:
        jobs = [(m, _capture_vllm) for m in models] + [(f"hf:{m}", _capture_hf) for m in args.hf or ()]
        for key, job in jobs:
            try:
                job(key.removeprefix("hf:"), args, out, results)
            except Exception as e:  # noqa: BLE001 - one model failing must not hide the others
                message = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                results[key] = {"error": message}
                if not args.json:
                    print(terminal.printable(f"{key}: trace failed: {message}"))
        written = out.commit()
    if args.json:
        print(json.dumps(results))
    else:
        print(f"wrote {len(written)} files to {args.out.rstrip('/')}/")
    return 0 if all("error" not in r for r in results.values()) else 1
