"""Plant bugs in the library, one at a time, and check that the fast tests catch each one.

    python tests/mutants.py [--json] [--only NAME ...] [--list] [--timeout SECONDS]

Each mutant is a text patch of one library file, keyed by an ANCHOR: a string that must
occur exactly once in that file. The tool copies the repository's ``fusion_passes``,
``patterns``, ``tools``, ``tests`` and ``pyproject.toml`` to a temporary directory, applies
the patch there, and runs the mutant's tests from that copy (``PYTHONPATH`` = the copy, so
``import fusion_passes`` is the patched one; checked before anything runs). A mutant is
KILLED when its tests fail (or cannot even be collected: the error is recorded), and
SURVIVES when they pass or when nothing ran. Before any mutant, every anchor is checked
(a refactor that moves one fails the tool loudly, so no mutant is silently disabled) and
the union of the tests must pass on the unpatched copy.

The last line of ``--json`` is ``{"mutants": N, "killed": K, "survivors": [...]}``. It
re-runs tests, so it is not part of ``make test`` (pytest collects ``test_*.py`` only).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("fusion_passes", "patterns", "tools", "tests", "results", "pyproject.toml")  # results: the runs a shipped table names


@dataclasses.dataclass(frozen=True)
class Mutant:
    """One planted bug: replace *anchor* (exactly once in *path*) by *replacement*; *tests*
    are the pytest arguments that must catch it."""

    name: str
    path: str
    anchor: str
    replacement: str
    tests: tuple[str, ...]
    why: str


EPI, HOIST, RULES = "fusion_passes/epilogue.py", "fusion_passes/hoist.py", "fusion_passes/hoist_rules.py"
ORACLES = ("tests/test_oracles.py", "-k", "not triton_kernel")  # all but the Triton-interpreter test
OPS = ("tests/test_ops.py",)
VENDOR = ("tests/test_vendor_adapters.py",)
PINNED = ("tests/test_hoist_property.py", "-k", "pinned")
STREAM = ("tests/test_compile_parity.py", "-k", "stream")  # every site of a stored-and-inlined stream

MUTANTS = (
    Mutant("eps_outside_rsqrt", EPI,
           "normed = x32 * torch.rsqrt(v32.pow(2).mean(-1, keepdim=True) + eps)",
           "normed = x32 * (torch.rsqrt(v32.pow(2).mean(-1, keepdim=True)) + eps)",
           OPS, "eps added after the rsqrt instead of inside it"),
    Mutant("residual_in_fp32_ignored", EPI,
           "    if residual_in_fp32 or carry_fp32:\n        summed32 =",
           "    if False:\n        summed32 =",
           ("tests/test_vllm_dialect.py", "-k", "numerics"), "vLLM's fp32 residual add normalized as if rounded"),
    Mutant("per_group_scale_off_by_one", EPI,
           "q = _to_fp8(grouped / scales, dtype)",
           "q = _to_fp8(grouped / scales.roll(1, dims=1), dtype)",
           ORACLES, "each group divided by its neighbour's scale"),
    Mutant("nvfp4_swizzle_transposed", EPI,
           "tiled = tiled.permute(0, 3, 2, 1, 4)",
           "tiled = tiled.permute(0, 3, 1, 2, 4)",
           ORACLES, "the 4 x 32 row interleave of the 128x4 tile transposed"),
    Mutant("e2m1_round_half_up", EPI,
           "+ (a > 1.25)",
           "+ (a >= 1.25)",
           ORACLES, "the tie 1.25 rounds up to 1.5 instead of to even (1.0)"),
    Mutant("ue8m0_rounded_down", EPI,
           "scales = torch.exp2(torch.ceil(torch.log2(scales)))",
           "scales = torch.exp2(torch.floor(torch.log2(scales)))",
           ORACLES, "UE8M0 scale rounded down: values above 448 after scaling"),
    Mutant("per_token_scale_floor_dropped", EPI,
           "scales = (amax / fp8_max(dtype)).clamp(min=fp8_min_scaling_factor(dtype))",
           "scales = amax / fp8_max(dtype)",
           ORACLES, "an all-zero or tiny row: scale 0 (NaN) instead of 1/(448*512)"),
    Mutant("gemma_one_plus_w_ignored", EPI,
           "return (normed * (1.0 + weight.to(torch.float32))).to(dtype)",
           "return (normed * weight.to(torch.float32)).to(dtype)",
           ("tests/test_ops.py", "-k", "norm_flags"), "Gemma's (1 + w) multiplied as w"),
    Mutant("residual_returned_before_the_add", EPI,
           "promote_out=promote_out, variance_of=variance_of), summed",
           "promote_out=promote_out, variance_of=variance_of), x",
           OPS, "residual_out is the reduced input, not input + residual"),
    Mutant("mxfp4_amax_not_rounded", EPI,
           "rounded = ((amax.view(torch.int32) + 0x200000) & 0x7F800000)",
           "rounded = ((amax.view(torch.int32) + 0) & 0x7F800000)",
           ORACLES, "MX scale from the truncated amax (OCP FLOOR) instead of the rounded one"),
    Mutant("nvfp4_scale_reciprocal_split", EPI,
           "recip(s32 * recip(gs))",
           "(recip(s32) * gs)",
           ORACLES, "1/(s/gs) computed as (1/s)*gs: another rounding, and a zero block no longer 0"),
    Mutant("merge_across_groups", RULES,
           "if theirs.group != mine.group:",
           "if False:",
           PINNED, "two all-reduces of different process groups merged into one"),
    Mutant("hoist_over_nonlinear_op", RULES,
           "    aten.neg.default: negate,",
           "    aten.neg.default: negate,\n    aten.silu.default: negate,",
           ("tests/test_hoist.py", "-k", "blocker"), "silu treated like a sign flip: moved above the sum"),
    Mutant("summand_ancestors_replicated", HOIST,
           "        if len(tensors) == 1:\n            stack.append(tensors[0])",
           "        if False:\n            stack.append(tensors[0])",
           ("tests/test_hoist.py", "-k", "viewed_all_reduce"),
           "x in AR(view(x)) counted as replicated: a scale taken from x is hoisted over"),
    Mutant("moved_op_forgets_its_summand", HOIST,
           "        stack.extend(a for a in n.all_input_nodes if a.name in marked)",
           "        pass",
           PINNED, "after AR(x) * w -> AR(x * w), x counted as replicated on the next run"),
    Mutant("final_family_returns_the_sum", "fusion_passes/rewrite.py",
           'site.norm.out.replace_all_uses_with(edit.outs["norm_out"])',
           'site.norm.out.replace_all_uses_with(edit.outs["residual_out" if site.family.name.endswith("_final") '
           'else "norm_out"])',
           ("tests/test_fusion_pass.py", "-k", "norm_forms"), "the final-norm family hands out the residual sum"),
    Mutant("single_node_failure_cached", "fusion_passes/groups.py",
           "        return False\n    _SINGLE_NODE[group] = answer",
           "        _SINGLE_NODE[group] = False\n        return False\n    _SINGLE_NODE[group] = answer",
           ("tests/test_single_node.py",), "one failed question answers False for the life of the process"),
    Mutant("flashinfer_takes_the_fp32_residual", "fusion_passes/backends/flashinfer.py",
           "        if call.flags.residual_in_fp32 and call.residual:\n            return RESIDUAL_ROUNDED",
           "        if False:\n            return RESIDUAL_ROUNDED",
           VENDOR, "FlashInfer (rounded sum) used for vLLM's unrounded-sum norm"),
    Mutant("aiter_given_nd_input", "fusion_passes/backends/aiter.py",
           "        x = a.input.reshape(-1, hidden)",
           "        x = a.input",
           VENDOR, "AITER's per-group path reads M = input.shape[0] of an N-D input"),
    Mutant("unfused_pick_ignores_the_measured_collective", "fusion_passes/backends/symm.py",
           'return name if name in COLLECTIVES else None',
           'return None',
           ("tests/test_symm_collective.py", "tests/test_measured.py", "-k", "collective"),
           "the measured unfused pick always runs the group's own collective, never the fastest"),
    Mutant("tune_never_times_evict_first", "fusion_passes/cli/tune.py",
           "if fill is not None:  # then evict_first",
           "if False:  # then evict_first",
           ("tests/test_tune.py", "-k", "second_pass"), "the evict_first launch option is never timed"),
    Mutant("after_write_keeps_the_write", "fusion_passes/cli/tune.py",
           "return max(pair - self.write_us, AFTER_WRITE_MIN_US)",
           "return max(pair, AFTER_WRITE_MIN_US)",
           ("tests/test_tune.py", "-k", "after_write"), "tune --context after-write counts the copy in every option"),
    Mutant("after_write_unfused_chain_timed_alone", "fusion_passes/cli/tune.py",
           "times[name] = timer(chains[name])",
           "times[name] = ctx.time_graph(chains[name], inputs, calls, ctx.args.replays)",
           ("tests/test_tune.py", "-k", "after_write"),
           "tune --context after-write times the fused configs after the write, the unfused chains alone"),
    Mutant("tune_decides_on_the_first_pass", "fusion_passes/cli/tune.py",
           "pick, slowest = agree.decide(group, _inf_for_none(confirmed or times))",
           "pick, slowest = agree.decide(group, _inf_for_none(times))",
           ("tests/test_tune.py", "-k", "confirm"), "the confirm step's medians are kept but the first pass decides"),
    Mutant("confirm_rounds_in_one_order", "fusion_passes/cli/tune.py",
           "for name in best[:: 1 if r % 2 == 0 else -1]:",
           "for name in best:",
           ("tests/test_tune.py", "-k", "confirm"), "the confirm step times the fused config first every round"),
    Mutant("launch_ignores_compile_only", "fusion_passes/backends/triton.py",
           "return functools.partial(kernel.warmup, grid=(grid,)) if COMPILE_ONLY else kernel[(grid,)]",
           "return kernel[(grid,)]",
           ("tests/test_tune.py", "-k", "precompile"), "tune's precompile launches the kernels instead of compiling them"),
    Mutant("token_dynamic_prefill_caches_differ", "fusion_passes/cli/model_step.py",
           "slots if shared_prefill_cache else t",
           "t",
           ("tests/test_bench_model.py", "-k", "token_dynamic"),
           "token-dynamic prefill points get caches of different shapes (one graph cannot serve them)"),
    Mutant("numerics_decide_on_the_timed_compiles", "fusion_passes/cli/model_step.py",
           'deterministic = "fused_deterministic" in res and "unfused_deterministic" in res',
           "deterministic = False",
           ("tests/test_bench_model.py", "-k", "deterministic"),
           "the numerics check ignores the deterministic compiles and decides on the timed ones"),
    Mutant("check_compiles_not_deterministic", "fusion_passes/cli/model_step.py",
           "options.update(_compat.inductor_deterministic_options())",
           "pass",
           ("tests/test_bench_model_dynamic.py",),
           "the numerics check's extra compiles run in Inductor's default (timed-pick) mode"),
    Mutant("slower_if_any_round_is", "fusion_passes/cli/model_step.py",
           '"slower" if all(s < 1 for s in per_round)',
           '"slower" if any(s < 1 for s in per_round)',
           ("tests/test_bench_model.py", "-k", "speed_verdict"),
           "a point called slower when one round is, not every round"),
    Mutant("stored_sums_read_unrounded", "fusion_passes/match.py",
           "reads = stores.sum_reads(add, _hidden(add))",
           "reads = inductor_store.UNROUNDED",
           STREAM, "every sum read unrounded, also where the compile stores (rounds) it"),
    Mutant("stored_norm_output_quantized_unrounded", "fusion_passes/match.py",
           "return _fused_with_norm(norm, found_quant) and not _rounds_later_reads(norm.out)",
           "return _fused_with_norm(norm, found_quant)",
           STREAM, "the FP8 codes from the unrounded norm output, also where the compile stores it"),
    Mutant("carry_past_a_stored_sum", "fusion_passes/match.py",
           "if stores.stored(prev):  # the compile stores",
           "if False:  # the compile stores",
           STREAM, "the unrounded stream carried past a sum the compile stores and rounds"),
    Mutant("sum_stored_variance_of_rounded_sum", EPI,
           "v32 = x32 if variance_of is None else variance_of.to(torch.float32)",
           "v32 = x32",
           STREAM, "sum_stored's variance from the rounded sum"),
    Mutant("inductor_store_reads_threshold_off_by_one", "fusion_passes/inductor_store.py",
           "return v.ops > rules.ops or len(v.reads) > rules.reads",
           "return v.ops > rules.ops or len(v.reads) >= rules.reads",
           STREAM, "a value with exactly realize_reads_threshold reads taken as stored"),
    Mutant("inductor_store_needs_a_newer_torch", "fusion_passes/inductor_store.py",
           'users = getattr(c, "realize_opusers_threshold", None)',
           "users = c.realize_opusers_threshold",
           ("tests/test_inductor_store.py",), "the analysis reads a config name torch 2.11 lacks"),
    Mutant("amax_unrounded_codes_unrounded", EPI,
           "return FP8_CODES[variant](y, scales, params), scales",
           "return FP8_CODES[variant](y32, scales, params), scales",
           ("tests/test_inductor_store.py", "-k", "amax"), "amax_unrounded's codes from the unrounded norm value"),
    Mutant("amax_unrounded_on_cpu", "fusion_passes/match.py",
           "return (stores is not None and epilogue.amax_reads_unrounded(stores.device)",
           "return (stores is not None and True",
           ("tests/test_inductor_store.py", "-k", "amax"),
           "amax_unrounded also where the compile's amax reads the rounded value (CPU)"),
    Mutant("second_norm_reads_the_rounded_sum", "fusion_passes/rewrite.py",
           'fused.kwargs = {**fused.kwargs, "carry_fp32": True}\n    fake_vals.update(fused)\n    fake_vals.update(res)',
           'fused.kwargs = {**fused.kwargs, "carry_fp32": False}\n    fake_vals.update(fused)\n    fake_vals.update(res)',
           ("tests/test_compile_parity.py", "-k", "second_norm"),
           "a second norm of an unstored sum reads the op's rounded residual output"),
    Mutant("shipped_gpu_table_ignored", "fusion_passes/backends/measured.py",
           "found = combine(_local(None if file is None else str(file), key_json), shipped(key_json))",
           "found = combine(_local(None if file is None else str(file), key_json), None)",
           ("tests/test_measured.py", "-k", "shipped or precedence or off_turns"),
           "an H100 without its own table decided by the H200 thresholds, not the shipped H100 table"),
    Mutant("merge_ships_a_fused_pick_one_run_lost", "tools/merge_tuned.py",
           'if all(e["pick"] == "fused" for e in seen):',
           'if any(e["pick"] == "fused" for e in seen):',
           ("tests/test_measured.py", "-k", "merging"),
           "the merge ships a fused pick that one run lost"),
    Mutant("table_ignores_the_dtype", "fusion_passes/backends/measured.py",
           'return str(dtype).removeprefix("torch.")',
           'return "bfloat16"',
           ("tests/test_measured.py", "-k", "version_1 or calibration_when_asked"),
           "a float16 call decided by what tune timed in bfloat16"),
    Mutant("looped_second_pass_reads_the_input", "fusion_passes/backends/triton_kernels.py",
           "        s = _stream(res_out_ptr + off + cols, mask, EVICT).to(tl.float32)\n",
           "        s = _stream(in_ptr + off + cols, mask, EVICT).to(tl.float32)\n",
           ("tests/test_triton_interpret.py",),
           "the looped kernel normalizes the all-reduce's output instead of the stored sum"),
    Mutant("looped_kernel_runs_a_dynamic_scale", "fusion_passes/backends/triton_kernels.py",
           "    return quant in (QUANT_NONE, QUANT_FP8_STATIC) and res_fp32 in (0, 2)",
           "    return quant in (QUANT_NONE, QUANT_FP8_STATIC, QUANT_FP8_PER_TOKEN) and res_fp32 in (0, 1, 2)",
           ("tests/test_triton_interpret.py", "tests/test_measured.py", "-k", "interpret or looped or pieces"),
           "the looped kernel runs calls it does not compute (a per-token scale, the fp32 sum)"),
    Mutant("tile_kernel_reduces_across_rows", "fusion_passes/backends/triton_kernels.py",
           "    rstd = tl.math.rsqrt(tl.sum(v * v, axis=1)[:, None] / H + eps)\n",
           "    rstd = tl.math.rsqrt(tl.sum(v * v, axis=0)[None, :] / H + eps)\n",
           ("tests/test_triton_interpret.py",),
           "the tile kernel's variance sums a column of rows, not a row"),
    Mutant("tile_kernel_runs_a_dynamic_scale", "fusion_passes/backends/triton_kernels.py",
           "    return quant in (QUANT_NONE, QUANT_FP8_STATIC)\n",
           "    return quant in (QUANT_NONE, QUANT_FP8_STATIC, QUANT_FP8_PER_TOKEN)\n",
           ("tests/test_triton_interpret.py", "tests/test_measured.py", "-k", "interpret or tile"),
           "the tile kernel runs a per-token scale it does not compute"),
)


class AnchorError(RuntimeError):
    """An anchor is missing or not unique: the library moved; update the mutant."""


def patched_source(root: Path, m: Mutant) -> str:
    text = (root / m.path).read_text()
    n = text.count(m.anchor)
    if n != 1:
        raise AnchorError(f"mutant {m.name}: anchor found {n} times in {m.path} (need exactly 1): {m.anchor!r}")
    return text.replace(m.anchor, m.replacement)


def copy_tree(dest: Path) -> Path:
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, dest / name)
    return dest


def pytest_run(tree: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, float, str]:
    """``(returncode, seconds, tail of the output)``; 124 on timeout."""
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    start = time.monotonic()
    try:
        done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return 124, time.monotonic() - start, str(e.stdout or "")[-2000:]
    return done.returncode, time.monotonic() - start, (done.stdout + done.stderr)[-2000:]


def check_import(tree: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", "import fusion_passes; print(fusion_passes.__file__)"],
                         cwd=tree, env=env, capture_output=True, text=True, check=True).stdout.strip()
    if not out.startswith(str(tree)):
        raise RuntimeError(f"the copy is not what imports: fusion_passes from {out}, not {tree}")


def verdict(rc: int) -> str:
    """pytest exit codes: 0 passed, 1 failed, 2-4 errors (collection, usage), 5 nothing ran."""
    return {0: "survived", 1: "killed", 5: "survived (no test ran)", 124: "killed (timeout)"}.get(
        rc, f"killed (pytest error, exit {rc})")


def run_mutant(m: Mutant, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"mutant-{m.name}-") as tmp:
        tree = copy_tree(Path(tmp))
        (tree / m.path).write_text(patched_source(ROOT, m))
        rc, seconds, tail = pytest_run(tree, m.tests, timeout)
    result = verdict(rc)
    return {"name": m.name, "result": result, "killed": result.startswith("killed"), "seconds": round(seconds, 1),
            "tests": " ".join(m.tests), "why": m.why, "tail": "" if result.startswith("killed") else tail}


def baseline(mutants, timeout: float) -> None:
    """Every anchor unique; the union of the tests green on the unpatched copy."""
    for m in mutants:
        patched_source(ROOT, m)
    selections = sorted({m.tests for m in mutants})
    with tempfile.TemporaryDirectory(prefix="mutant-baseline-") as tmp:
        tree = copy_tree(Path(tmp))
        check_import(tree)
        for tests in selections:
            rc, seconds, tail = pytest_run(tree, tests, timeout)
            if rc != 0:
                raise RuntimeError(f"baseline: {' '.join(tests)} fails WITHOUT a mutant (exit {rc}):\n{tail}")
            print(f"baseline ok  {seconds:6.1f}s  {' '.join(tests)}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="end with one JSON line: mutants, killed, survivors")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants")
    ap.add_argument("--list", action="store_true", help="list the mutants and their tests")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per pytest run (default 900)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unpatched run (anchors still checked)")
    args = ap.parse_args(argv)
    mutants = [m for m in MUTANTS if not args.only or m.name in args.only]
    unknown = set(args.only or ()) - {m.name for m in MUTANTS}
    if unknown:
        ap.error(f"unknown mutants: {sorted(unknown)}")
    if args.list:
        for m in mutants:
            print(f"{m.name:36s} {m.path:38s} {' '.join(m.tests)}\n    {m.why}")
        return 0
    if args.no_baseline:
        for m in mutants:
            patched_source(ROOT, m)
    else:
        baseline(mutants, args.timeout)
    results = []
    for m in mutants:
        r = run_mutant(m, args.timeout)
        results.append(r)
        print(f"{r['result']:28s} {r['seconds']:6.1f}s  {m.name}  ({r['tests']})", flush=True)
        if not r["killed"]:
            print(r["tail"], flush=True)
    survivors = [r["name"] for r in results if not r["killed"]]
    if args.json:
        print(json.dumps({"mutants": len(results), "killed": len(results) - len(survivors), "survivors": survivors}))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
