"""``bench model`` on CPU: the dry run of both model configs (so the benchmark's model code
keeps tracing and fusing), and the pieces of a GPU run that do not need a GPU.

The dry run builds the same HF models as the GPU run at toy sizes (``tiny``), traces a
decode step under torch's fake process group (a one-rank group of the session's fake
world, tests/conftest.py) up to Inductor's post-grad passes and counts
the pass's sites: two per decoder layer (after the attention's ``o_proj`` and after the
MLP's ``down_proj`` / MoE ``experts``), the last one into the final norm.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers", reason="needs HF transformers (the dev extra)")

from fusion_passes import epilogue  # noqa: E402
from fusion_passes.report import FusionReport, SiteReport  # noqa: E402
from fusion_passes.cli import bench_model, model_step, model_trace, models  # noqa: E402
from fusion_passes.cli import main as cli_main  # noqa: E402

LAYERS = 2
DECODE = model_step.points([2], [], 8)


def _variants(rows):
    (row,) = rows
    return row["sites"]["total"], row["sites"]["fused"], row["sites"]["variants"], row["sites"]["backends"]


@pytest.mark.parametrize("name, precision, expected", [
    ("llama", "bf16", {"allreduce_add_rmsnorm": 3, "allreduce_add_rmsnorm_final": 1}),
    # HF's separate q/k/v (gate/up) linears quantize the same norm output 3 (2) times; the
    # identical chains merge (fusion_passes.dedup) and the one fused quant output has 3 (2)
    # readers: no norm output is left for a quant kernel (no _out variant)
    ("llama", "fp8", {"allreduce_add_rmsnorm_fp8_per_token": 3, "allreduce_add_rmsnorm_final": 1}),
    ("qwen3_moe", "bf16", {"allreduce_add_rmsnorm": 3, "allreduce_add_rmsnorm_final": 1}),
    # MoE FP8: attention linears only; the post-attention norm feeds the bf16 router and experts
    ("qwen3_moe", "fp8", {"allreduce_add_rmsnorm": 2, "allreduce_add_rmsnorm_fp8_per_token": 1,
                          "allreduce_add_rmsnorm_final": 1}),
    # transformers' own FP8 linear (quantize_fp8_per_row: an all-zero row's amax taken as 1)
    ("llama", "fp8-hf", {"allreduce_add_rmsnorm_fp8_per_token": 3, "allreduce_add_rmsnorm_final": 1}),
])
def test_dry_run_fuses_every_site(name, precision, expected, fake_pg):
    lines = []
    precision, _, linear = precision.partition("-")
    rows = model_trace.dry_run([name], [precision], DECODE, layers=LAYERS, world=1, tiny=True,
                               fp8_linear=linear or "vllm", out=lines.append)
    assert _variants(rows) == (2 * LAYERS, 2 * LAYERS, expected, {"reference": 2 * LAYERS})
    assert rows[0]["sites"]["per_layer"] == 2
    assert lines and "4/4 all-reduces fused (2 per layer" in lines[0]


def test_dry_run_fails_on_a_model_without_sites(monkeypatch, fake_pg):
    monkeypatch.setattr(models, "reduce_explicitly", lambda model, group: [])
    with pytest.raises(RuntimeError, match="no all-reduce site"):
        model_trace.dry_run(["llama"], ["bf16"], DECODE, layers=1, world=1, tiny=True, fp8_linear="vllm",
                            out=lambda s: None)


# -- pieces of the GPU run, on CPU ------------------------------------------------------------


def test_fp8_activation_quant_is_vllms_native_per_token_quant():
    """Bit for bit the library's epilogue.fp8_per_token, which tests/test_quant.py checks
    against vLLM's own QuantFP8.forward_native: the spelling the pass recognizes."""
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16) * torch.logspace(-3, 3, 64).to(torch.bfloat16)
    q, s = models.quant_per_token(x)
    q_ref, s_ref = epilogue.fp8_per_token(x)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)


def test_fp8_linear_and_its_reference():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32, bias=False).to(torch.bfloat16)
    holder = torch.nn.Module()
    holder.model = torch.nn.Module()
    layer = torch.nn.Module()
    layer.self_attn, layer.mlp = torch.nn.Module(), torch.nn.Module()
    for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
        setattr(layer.self_attn, n, torch.nn.Linear(64, 64, bias=False).to(torch.bfloat16))
    for n in ("gate_proj", "up_proj", "down_proj"):
        setattr(layer.mlp, n, lin if n == "gate_proj" else torch.nn.Linear(64, 64, bias=False).to(torch.bfloat16))
    holder.model.layers = torch.nn.ModuleList([layer])
    w = lin.weight.detach().float().clone()
    assert models.to_fp8(holder) == 7
    assert isinstance(lin, models.Fp8Linear) and lin.weight.dtype == models.FP8
    deq = lin.weight.float() * lin.weight_scale.t()
    assert (deq - w).abs().max() <= w.abs().amax(dim=1, keepdim=True).max() / 16  # e4m3: 3 mantissa bits
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    lin.reference = True
    assert torch.equal(lin(x), x.float() @ deq.t())
    lin.reference = False
    y = lin(x)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 3, 32)
    q, s = models.quant_per_token(x)
    assert torch.allclose(y.float(), (q.float() * s) @ deq.t(), rtol=1e-2, atol=1e-2)


def test_reference_context_is_fp32_and_restores_the_model_exactly():
    model = models.build("qwen3_moe", 1, tiny=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    impl = model.config._experts_implementation
    with models.reference(model):
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert model.config._experts_implementation == "eager"
    assert model.config._experts_implementation == impl
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


def test_replayed_step_writes_the_same_cache_slots():
    model = models.build("llama", 1, tiny=True)
    p = model_step.points([3], [], 8)[0]
    ids, cache = model_step.inputs(model, p, "cpu", 1)
    with torch.no_grad():
        first = models.step(model, ids, cache)
        keys = cache.layers[0].keys.clone()
        second = models.step(model, ids, cache)
    assert torch.equal(first, second) and torch.equal(cache.layers[0].keys, keys)
    assert int(cache.layers[0].cumulative_length) == 8
    _, copy = model_step.inputs(model, p, "cpu", 1, torch.float32, like=cache)
    assert torch.equal(copy.layers[0].values, cache.layers[0].values.float())


def test_points():
    pts = model_step.points([1, 64], [512], 1024)
    assert [(p.kind, p.tokens, p.batch, p.seq, p.max_len, p.start) for p in pts] == [
        ("decode", 1, 1, 1, 1025, 1024), ("decode", 64, 64, 1, 1025, 1024), ("prefill", 512, 1, 512, 512, 0)]


def test_token_dynamic_points_share_one_prefill_cache_and_compile_at_the_largest():
    pts = model_step.points([1, 64], [512, 2048], 1024, shared_prefill_cache=True)
    assert [(p.kind, p.tokens, p.max_len) for p in pts] == [
        ("decode", 1, 1025), ("decode", 64, 1025), ("prefill", 512, 2048), ("prefill", 2048, 2048)]
    assert model_step.compile_point(pts[:2]) is pts[1] and model_step.compile_point(pts[2:]) is pts[3]
    # Dynamo specializes a size of 1: a lone decode 1 compiles at 2 sequences, prefill 1 at 2 tokens
    assert model_step.compile_point(pts[:1]).tokens == 2 and model_step.compile_point(pts[:1]).batch == 2
    one = model_step.points([], [1], 8, shared_prefill_cache=True)
    assert (model_step.compile_point(one).seq, model_step.compile_point(one).max_len) == (2, 2)
    assert model_step.token_dims(pts[0]) == (0, 0) and model_step.token_dims(pts[2]) == (1, -1)


def test_numerics_check_allows_one_rounding_of_the_reference():
    torch.manual_seed(0)
    ref = torch.randn(4, 1, 100)
    unfused = ref + 0.01 * torch.randn_like(ref)
    n = model_step.numerics({"unfused": unfused, "fused": unfused.clone(), "eager": ref}, ref)
    assert n["fused_no_further"] and n["eager"] == {"max": 0.0, "rms": 0.0}
    n = model_step.numerics({"unfused": unfused, "fused": ref + 0.05 * torch.randn_like(ref)}, ref)
    assert not n["fused_no_further"] and not n["max_no_further"]
    ref = torch.randn(4, 1, 10000)
    unfused = ref + 0.01 * torch.randn_like(ref)
    spike = unfused.clone()
    spike[0, 0, 0] += 0.5  # one element far off: the max moves, the RMS barely
    n = model_step.numerics({"unfused": unfused, "fused": spike}, ref)
    assert n["fused_no_further"] and not n["max_no_further"]


def test_numerics_report_the_fused_to_unfused_ratio_and_hold_it_to_1_02():
    """``ratio``: fused / unfused RMS distance from the fp32 reference; a point whose ratio
    exceeds model_step.RATIO_MAX fails even within one bf16 rounding of the reference."""
    ref = torch.randn(4, 512)
    noise = torch.randn(4, 512)
    unfused = ref + 0.01 * noise
    n = model_step.numerics({"unfused": unfused, "fused": ref + 0.0101 * noise, "eager": ref}, ref)
    assert n["ratio"] == pytest.approx(1.01, rel=1e-3) and n["ratio_ok"] and model_step.numerics_ok(n)
    n = model_step.numerics({"unfused": unfused, "fused": ref + 0.0105 * noise, "eager": ref}, ref)
    assert n["fused_no_further"] and not n["ratio_ok"] and not model_step.numerics_ok(n)
    assert model_step.RATIO_MAX == 1.02


def test_numerics_decide_on_the_deterministic_compiles_where_there_are_some():
    """With ``unfused_deterministic`` and ``fused_deterministic`` (GPU default), those two
    decide: the timed compiles' ratio is reported (``ratio_timed``) with the unfused
    compile's own movement between its timed and deterministic forms (``unfused_spread``),
    and a timed pair apart by more than 1.02 does not fail the point, nor does a timed pair
    within it pass one whose deterministic pair is apart. Distances of session 14's failing
    prefill point on 1x H100: unfused 0.02536 (timed), fused 0.02597."""
    torch.manual_seed(0)
    ref = torch.randn(4, 2048)
    noise = torch.randn(4, 2048)
    at = lambda rms: ref + rms * noise  # noqa: E731
    rms = noise.pow(2).mean().sqrt().item()
    outs = {"unfused": at(0.02536 / rms), "fused": at(0.02597 / rms),
            "unfused_deterministic": at(0.0261 / rms), "fused_deterministic": at(0.0260 / rms)}
    timed = model_step.numerics({k: outs[k] for k in ("unfused", "fused")}, ref)
    assert timed["decided_by"] == "timed compiles" and timed["ratio"] == pytest.approx(1.024, abs=1e-3)
    assert not model_step.numerics_ok(timed) and "ratio_timed" not in timed
    n = model_step.numerics(outs, ref)
    assert n["decided_by"] == "deterministic compiles" and model_step.numerics_ok(n)
    assert n["ratio"] == pytest.approx(0.0260 / 0.0261, abs=1e-4)
    assert n["ratio_timed"] == pytest.approx(timed["ratio"]) and not n["ratio_timed"] <= model_step.RATIO_MAX
    assert n["unfused_spread"] == pytest.approx(0.02536 / 0.0261, abs=1e-4)
    # the other way round: the timed pair within the bound, the deterministic pair apart
    outs.update(fused=outs["unfused"].clone(), fused_deterministic=at(0.0261 * 1.03 / rms))
    n = model_step.numerics(outs, ref)
    assert n["ratio_timed"] == 1.0 and n["fused_no_further"] and not n["ratio_ok"] and not model_step.numerics_ok(n)


def test_sites_summary_counts_per_layer_and_backend():
    report = FusionReport(sites=[
        SiteReport("ar0", fused=True, variant="allreduce_add_rmsnorm", backend="triton"),
        SiteReport("ar1", fused=True, variant="allreduce_add_rmsnorm_final", backend="triton"),
        SiteReport("ar2", fused=False, reason="blocked by relu"),
    ])
    s = model_step.sites([report], 1, lambda family: "triton" if family else None)
    assert (s["total"], s["fused"], s["per_layer"]) == (3, 2, 2.0)
    assert s["variants"] == {"allreduce_add_rmsnorm": 1, "allreduce_add_rmsnorm_final": 1}
    assert s["runtime_backends"] == {"triton": 2} and s["unfused_reasons"] == ["blocked by relu"]


def test_runtime_backend_follows_the_selector():
    pick = model_step.runtime_backend_fn(4096, 1, 8, "cuda")
    assert pick("allreduce_add_rmsnorm_fp8_per_token_out") == "triton"
    assert pick("not a family") is None
    assert model_step.runtime_backend_fn(4096, 4, 8, "cuda")("allreduce_add_rmsnorm") == "reference"
    # 1024 tokens at hidden 7168: the shipped table measured the kernel slower there, so a
    # graph site would stay unfused; inside a fused op (token-dynamic graph) the kernel runs
    assert model_step.runtime_backend_fn(7168, 1, 1024, "cuda")("allreduce_add_rmsnorm") == "triton"


def test_plan_counts_compiles():
    args = type("A", (), dict(decode=[1, 8, 32, 64], prefill=[512, 4096], model=["llama"], precision=["bf16"],
                              layers=4, token_dynamic=False))()
    args.numerics = "timed"
    assert bench_model.plan(args, 1)["compiles"] == 18
    assert bench_model.plan(args, 2)["compiles"] == 12
    args.token_dynamic = True  # one graph per step kind and form
    assert bench_model.plan(args, 1)["compiles"] == 6
    # the GPU default compiles unfused and fused again under Inductor's deterministic mode
    args.numerics = None
    assert bench_model.default_numerics(args) == "deterministic"
    assert bench_model.plan(args, 1)["compiles"] == 2 * (3 + len(model_step.CHECK_FORMS)) == 10
    args.device = "cpu"
    assert bench_model.default_numerics(args) == "timed" and bench_model.plan(args, 1)["compiles"] == 6


@pytest.mark.parametrize("argv, message", [
    (["--decode", "--prefill"], "nothing to run"),
    (["--world-size", "2"], "--world-size is for --dry-run"),
    (["--out", "/nonexistent-folder/x.json"], "does not exist"),
    (["--token-dynamic", "--dry-run"], "--dry-run only traces"),
    (["--rounds", "100", "--replays", "11"], "--rounds 100 x --replays 11 is more than 1000 timed replays"),
])
def test_bad_arguments_exit_2(argv, message, capsys):
    assert cli_main(["bench", "model", "--plan", *argv]) == 2
    assert message in capsys.readouterr().err


def test_plan_flag(capsys):
    assert cli_main(["bench", "model", "--plan", "--model", "llama", "--precision", "bf16"]) == 0
    assert "3 forms (+2 untimed, for the numerics) each: 30 compiles" in capsys.readouterr().out
    assert cli_main(["bench", "model", "--plan", "--model", "llama", "--precision", "bf16", "--numerics", "timed"]) == 0
    assert "3 forms each: 18 compiles" in capsys.readouterr().out


def test_format_point_line():
    row = {"kind": "decode", "tokens": 8, "step_us": {"nocoll": 100.0, "unfused": 104.0, "fused": 99.0},
           "speedup": 104 / 99, "speedup_vs_nocoll": 100 / 99,
           "sites": {"fused": 8, "total": 8, "per_layer": 2.0, "runtime_backends": {"triton": 8}},
           "numerics": {"fused": {"rms": 0.019}, "unfused": {"rms": 0.015}, "eager": {"rms": 0.019},
                        "tolerance": {"rms": 0.001}, "fused_no_further": False}}
    line = model_step.format_point("llama bf16", row)
    assert "x1.051" in line and "no collective 100.0 us" in line and "FAILED" in line and "rounds" not in line
    row["rounds_us"] = {form: [t, t] for form, t in row["step_us"].items()}
    row["speedup_range"] = [0.98, 1.06]
    row.update(model_step.speed_verdict([0.98, 1.06]))
    assert "(x1.051, x0.980-1.060 over 2 rounds: within noise)" in model_step.format_point("llama bf16", row)
    row["numerics"].update(fused_no_further=True, ratio=1.0211, ratio_ok=False)
    line = model_step.format_point("llama bf16", row)
    assert "ratio 1.021): FAILED" in line
    # both checks decide: FP8 decode 1 on an H100 was 0.1910 against 0.1887 + one bf16
    # rounding 0.0022 (over by 0.0001) at ratio 1.012 (within issue 22's 1.02)
    row["numerics"].update(fused={"rms": 0.1910}, unfused={"rms": 0.1887}, tolerance={"rms": 0.0022},
                           fused_no_further=False, ratio=0.1910 / 0.1887, ratio_ok=True)
    assert model_step.format_point("llama fp8", row).endswith("ratio 1.012): FAILED")
    row["numerics"].update(fused_deterministic={"rms": 0.1880}, unfused_deterministic={"rms": 0.1887},
                           decided_by="deterministic compiles", ratio=0.1880 / 0.1887, ratio_timed=0.1910 / 0.1887,
                           fused_no_further=True, ratio_ok=True)
    assert model_step.format_point("llama fp8", row).endswith(
        "ratio 1.012; deterministic compiles: rms fused 0.188 vs unfused 0.1887, ratio 0.996): ok")
    assert json.loads(json.dumps(row)) == row


def test_rounds_interleave_the_forms_and_report_the_median_and_range():
    """GPU timing (``deferred``): every form's captured step is replayed once per round,
    each round starting at the next form; a step's time is the median of its rounds, and
    the row's speedup range spans the per-round speedups. Fake replays stand in for the
    CUDA graphs: each returns its form's next planned time and logs the order."""
    import types

    log = []
    planned = {"nocoll": [9, 9, 9], "unfused": [10, 30, 12], "fused": [8, 20, 12]}

    def replay_of(form):
        times = iter(planned[form])
        return lambda: (log.append(form), next(times))[1]

    ctx = types.SimpleNamespace(rounds=3, replays=1, empty_cache=lambda: None)
    per_form = {form: {"compile_s": 0.0, "reports": None,
                       "points": [{"logits": None, "replay": replay_of(form), "rounds_us": []}]}
                for form in planned}
    model_step.interleave(ctx, per_form)
    assert log == ["nocoll", "unfused", "fused", "unfused", "fused", "nocoll", "fused", "nocoll", "unfused"]
    got = {form: model_step._point_result(r, 0) for form, r in per_form.items()}
    assert {f: g["us"] for f, g in got.items()} == {"nocoll": 9, "unfused": 12, "fused": 12}
    assert all("replay" not in r["points"][0] for r in per_form.values())
    rounds = {f: g["rounds_us"] for f, g in got.items()}
    per_round = [u / f for u, f in zip(rounds["unfused"], rounds["fused"])]
    assert per_round == [1.25, 1.5, 1.0] and (min(per_round), max(per_round)) == (1.0, 1.5)


def test_speed_verdict_is_a_sign_test_over_the_rounds():
    """``faster`` / ``slower`` only where every round agrees; a round at exactly 1.0 or
    rounds on both sides are ``within noise``; ``p_noise`` is 0.5 ** rounds. The prefill
    2048 rows of session 14 on 1x H100 (3 rounds): 0.958-1.022 within noise, 0.962-0.988
    slower (p 0.125)."""
    assert model_step.speed_verdict([1.25, 1.5, 1.0]) == {"speed": "within noise", "p_noise": 0.125}
    assert model_step.speed_verdict([1.001, 1.01, 1.002, 1.2, 1.003]) == {"speed": "faster", "p_noise": 0.03125}
    assert model_step.speed_verdict([0.958, 1.0, 1.022])["speed"] == "within noise"
    assert model_step.speed_verdict([0.962, 0.988, 0.975]) == {"speed": "slower", "p_noise": 0.125}

