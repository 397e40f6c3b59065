"""``fusion-passes dump SPEC``: compile a model and write its graphs before and after our passes.

SPEC is a Python callable that returns ``(model, example_inputs)``: ``package.module:function``
or ``path/to/file.py:function`` (your own code: it is imported and called, exactly as
``torch.compile`` would run it), or ``capture:MODEL`` (``llama``, ``deepseek_v3``, ...):
real vLLM model code traced on CPU by :func:`fusion_passes.cli.capture.trace_vllm`
(``--tp``, ``--dtype``, ``--quant``, ``--layers``). The model is compiled with
``torch.compile`` (Inductor) under a ``post_grad_custom_post_pass`` that records each
graph (:mod:`.recorder`)

* ``before``: as Inductor hands it to the custom post pass (its own post-grad passes done),
* ``hoisted``: after our hoisting (unless ``--no-hoist``),
* ``fused``: after fusion,

as readable text (``print_readable``, the ``fx_graph_*.py`` style of TORCH_COMPILE_DEBUG)
and as JSON (:mod:`fusion_passes.cli.graphio`) that ``fusion-passes diff`` and
``explain`` read back. Without an initialised process group (a CPU callable), torch's
fake process group is set up with ``--tp`` ranks, so collectives trace (and run as
no-ops). The output folder is checked before compiling, and its files appear only when
every one of them is written.
"""

from __future__ import annotations

from fusion_passes.cli.arguments import (
    MAX_TP, add_backend_options, add_vllm_model_options, int_range, path_argument,
)
from fusion_passes.cli import UsageError
from fusion_passes.cli.recorder import GraphRecord, check_target, record_spec

STAGE_FILES = "{graph}.{stage}.{ext}"
"""How dump files are named inside the output directory."""


def add_arguments(parser) -> None:
    """The command's options."""
    parser.add_argument("spec", help="module:function or file.py:function returning (model, example_inputs), "
                        "or capture:MODEL (a vLLM model, see fusion_passes/cli/capture.py)")
    parser.add_argument("-o", "--out", default="fusion-passes-dump", type=path_argument,
                        help="output folder (default: %(default)s); its parent must exist")
    add_compile_arguments(parser)


def add_compile_arguments(parser) -> None:
    """Options shared with ``explain`` when it compiles a spec itself."""
    parser.add_argument("--tp", type=int_range(1, MAX_TP), default=2, help="world size of the fake process group "
                        "set up when none is initialised; for capture:MODEL one of 2, 4, 8 (default: %(default)s)")
    add_backend_options(parser)
    add_vllm_model_options(parser.add_argument_group("capture:MODEL specs (real vLLM model code, fusion_passes/cli/capture.py)"),
                           with_tp=False)


def write(records: list[GraphRecord], out) -> list:
    """Stage every stage of every graph (text and JSON) in *out* (an ``OutputDir``) and commit."""
    from fusion_passes.cli import graphio

    for rec in records:
        for stage, doc in rec.docs.items():
            head = f"# fusion-passes dump: {doc['model']} {rec.name}, stage {stage!r}\n"
            out.write(STAGE_FILES.format(graph=rec.name, stage=stage, ext="txt"), head + rec.texts[stage])
            out.write(STAGE_FILES.format(graph=rec.name, stage=stage, ext="json"), graphio.dumps(doc))
    return out.commit()


def run(args) -> int:
    """Check the spec and the output folder, compile, write the files."""
    from fusion_passes.cli.outputs import OutputDir

    check_target(args.spec, args)
    with OutputDir(args.out) as out:
        records = record_spec(args.spec, args)
        if not records:
            raise UsageError(f"{args.spec}: torch.compile produced no graph (nothing to dump)")
        written = write(records, out)
    for rec in records:
        print(f"{rec.name}: {rec.report.summary()}")
    kinds = ", ".join(sorted({p.name.split(".", 1)[1] for p in written}))
    print(f"wrote {len(written)} files to {args.out}/ ({kinds})")
    first = records[0].name
    print(f"next: fusion-passes diff {args.out}/{first}.before.json {args.out}/{first}.fused.json")
    return 0
