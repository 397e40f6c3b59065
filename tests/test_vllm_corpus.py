"""Real vLLM 0.33 models, traced on CPU under fake ranks: what fuses, in closed form.

Each model is traced ONCE per test session (``fusion_passes.cli.capture.trace_vllm``
caches per process) with tiny random configs of the real architectures, TP=2 (the
session's fake world of 2), bf16, 2 decoder layers unless stated. The graph is vLLM's
post-grad graph as its pass manager hands it to a custom pass.

Closed form for a decoder of ``L`` layers in vLLM (every model here):

* 1 all-reduce after the vocab-parallel embedding, feeding layer 0's ``input_layernorm``
  (``vllm_ir.rms_norm``; the reduced value is also the first residual)
  -> family ``allreduce_rmsnorm``;
* per layer, 1 after attention (``o_proj``) into ``post_attention_layernorm`` and 1 after
  the MLP / MoE into the next layer's ``input_layernorm`` (both
  ``vllm_ir.fused_add_rms_norm``) -> ``allreduce_add_rmsnorm``, 2L - 1 of them;
* the last layer's MLP / MoE into the model's final norm, whose residual output nobody
  reads -> ``allreduce_add_rmsnorm_final``.

So 2L + 1 all-reduces and 2L + 1 fused: no site is left unfused in bf16. A model where
some site is NOT fused lists it with the reason the report must give.

The same closed form holds on the ``compile_fx`` route (``trace_vllm(route="compile_fx")``:
a plain ``torch.compile`` of the vLLM model, without vLLM's pass manager), where the
in-place norms arrive as ``auto_functionalized_v2`` and the MoE block's output, a view
of the all-reduced value, as the ``_x_alias`` form.
"""

from __future__ import annotations

import collections
import time

import pytest
import torch

pytest.importorskip("vllm", reason="needs vLLM 0.33 installed (pip install -e .[vllm])")
pytestmark = pytest.mark.vllm

from fusion_passes import FusionPass  # noqa: E402
from fusion_passes.recognize.fx import op_name  # noqa: E402
from graphs import count  # noqa: E402

LAYERS = 2


def closed_form(layers: int) -> dict[str, int]:
    """Fused sites per family for a vLLM decoder of *layers* layers (module docstring)."""
    return {"allreduce_rmsnorm": 1, "allreduce_add_rmsnorm": 2 * layers - 1, "allreduce_add_rmsnorm_final": 1}


@pytest.fixture(scope="module")
def traced(fake_pg):
    """model -> (graphs, seconds to trace). Traced lazily, once per session."""
    from fusion_passes.cli.capture import trace_vllm

    cache: dict[str, tuple] = {}

    def get(model: str, **kw):
        key = (model, tuple(sorted(kw.items())))
        if key not in cache:
            start = time.perf_counter()
            graphs = trace_vllm(model, tp=2, layers=kw.pop("layers", LAYERS), **kw)
            cache[key] = (graphs, time.perf_counter() - start)
        return cache[key][0]

    return get


def _fuse(graphs):
    p = FusionPass()
    reports = []
    for gm in graphs:
        p(gm.graph)
        gm.recompile()
        gm.graph.lint()
        reports.append(p.report)
    return reports


def _check_model(graphs, layers=LAYERS, unfused: dict[str, str] | None = None, expected=None,
                 fused_add_rms_norm_left: int = 0):
    """Exact counts before and after, per family; every unfused site with its reason.
    *expected*: fused sites per family (default :func:`closed_form`); *fused_add_rms_norm_left*:
    vLLM ``fused_add_rms_norm`` nodes that are no site (not fed by an all-reduce)."""
    assert len(graphs) == 1, "splitting_ops=[]: one graph per model"
    (gm,) = graphs
    expected = expected or closed_form(layers)
    n_sites = sum(expected.values()) + len(unfused or {})
    assert count(gm, "vllm.all_reduce") == n_sites
    assert _norm_calls(gm, "vllm_ir.fused_add_rms_norm") == 2 * layers  # two per layer in every model here
    assert _norm_calls(gm, "vllm_ir.rms_norm") >= 1  # ... and layer 0's input norm (+ MLA's q/kv norms)
    (report,) = _fuse(graphs)
    assert not report.errors, report.errors
    got = collections.Counter(s.variant for s in report.fused)
    assert dict(got) == expected, report.table()
    reasons = {s.all_reduce: s.reason for s in report.unfused}
    assert set(reasons) == set(unfused or {}), report.table()
    for site, reason in (unfused or {}).items():
        assert reason in reasons[site], (site, reasons[site])
    assert count(gm, "vllm.all_reduce") == len(unfused or {})
    assert count(gm, "fusion_passes.allreduce_add_rmsnorm") == sum(expected.values())
    assert _norm_calls(gm, "vllm_ir.fused_add_rms_norm") == fused_add_rms_norm_left
    # vLLM adds the residual in fp32 and normalizes the unrounded sum: every fused site that
    # took over a fused_add_rms_norm says so (residual_in_fp32), the others do not
    fused = [n for n in gm.graph.nodes if n.op == "call_function" and "fusion_passes" in str(n.target)]
    with_residual = [n for n in fused if n.args[1] is not None]
    assert all(n.kwargs.get("residual_in_fp32") is True for n in with_residual)
    assert not any(n.kwargs.get("residual_in_fp32") for n in fused if n.args[1] is None)
    return gm, report


def _norm_calls(gm, name: str) -> int:
    """Calls of a vLLM IR norm, functional or through ``auto_functionalized(_v2)``."""
    return count(gm, name) + _count_functionalized(gm, name)


def test_llama(traced):
    _check_model(traced("llama"))


def test_deepseek_v3(traced):
    """MLA attention, layer 0 dense MLP, layer 1 MoE with a shared expert
    (``moe_forward_shared -> routed + shared -> all_reduce``): one all-reduce per MoE."""
    graphs = traced("deepseek_v3")
    gm = graphs[0]
    assert count(gm, "vllm.moe_forward_shared") == LAYERS - 1  # first_k_dense_replace = 1
    _check_model(graphs)


def _count_functionalized(gm, name: str) -> int:
    """Calls of a mutating custom op, which post-grad graphs wrap in ``auto_functionalized``."""
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.args
               and isinstance(n.args[0], torch._ops.OpOverload)
               and op_name(n.args[0]).rpartition(".")[0] == name)


def test_mixtral(traced):
    """Mixtral: sparse MoE in every layer (``moe_forward``, no shared expert); the MoE
    output is all-reduced once per layer like a dense MLP's."""
    graphs = traced("mixtral")
    assert _count_functionalized(graphs[0], "vllm.moe_forward") == LAYERS
    _check_model(graphs)


def test_qwen3_moe(traced):
    """Qwen3-MoE: q/k norms inside attention (``vllm_ir.rms_norm`` on head views, fed by
    the qkv GEMM, not by an all-reduce: no sites) and a MoE in every layer."""
    graphs = traced("qwen3_moe")
    assert _count_functionalized(graphs[0], "vllm.moe_forward") == LAYERS
    _check_model(graphs)


def test_gemma3(traced):
    """Gemma 3: "sandwich" norms. Each block's all-reduce feeds a plain RMSNorm
    (``post_attention_layernorm`` / ``post_feedforward_layernorm``, no residual); the
    residual add happens in the NEXT norm (``pre_feedforward_layernorm`` / the next
    ``input_layernorm``), which no all-reduce feeds. So every site is
    ``allreduce_rmsnorm``: 2 per layer + the embedding's, which reaches layer 0's
    input norm only after hoisting over the embedding scale ``* sqrt(hidden)``. The
    weight is vLLM's ``1 + w`` computed in the graph, so ``gemma=False`` on the fused op."""
    graphs = traced("gemma3")
    _, report = _check_model(graphs, expected={"allreduce_rmsnorm": 2 * LAYERS + 1},
                             fused_add_rms_norm_left=2 * LAYERS)
    hoisted = [s.hoisted_over for s in report.fused if s.hoisted_over]
    assert hoisted == [["aten.mul.Tensor"]], report.table()


def test_traced_graphs_are_fresh_copies(traced):
    """trace_vllm returns copies: a test that rewrites its graphs cannot break the next."""
    from fusion_passes.cli.capture import trace_vllm

    a, b = trace_vllm("llama", tp=2, layers=LAYERS), trace_vllm("llama", tp=2, layers=LAYERS)
    assert a[0].graph is not b[0].graph
    _fuse(a)
    assert count(b[0], "vllm.all_reduce") == 2 * LAYERS + 1


def test_weights_are_activation_dtype(traced):
    """The vLLM norm weights are bf16 here: fused with weight_in_fp32=False (HF order),
    exactly vLLM's ``x.to(weight.dtype) * weight``."""
    (gm,) = traced("llama")
    _fuse([gm])
    fused = [n for n in gm.graph.nodes if n.op == "call_function" and "fusion_passes" in str(n.target)]
    assert len(fused) == 2 * LAYERS + 1
    assert {n.args[6] for n in fused} == {False}
    assert {n.args[2].meta["val"].dtype for n in fused} == {torch.bfloat16}
    assert {n.args[0].meta["val"].dtype for n in fused} == {torch.bfloat16}
    (group,) = {n.args[4] for n in fused}  # one TP group, qualified by its dialect
    assert group.startswith("vllm:tp:")


@pytest.mark.parametrize("model", ["llama", "mixtral", "qwen3_moe", "deepseek_v3"])
def test_compile_fx_route(traced, model):
    """The closed form through ``compile_fx`` directly (no vLLM pass manager): in-place
    norms under ``auto_functionalized_v2``; in Mixtral and DeepSeek-V3 the MoE output
    reaches its norm as a view of the all-reduced value (``_x_alias``: ``MixtralMoE`` /
    ``DeepseekV2MoE`` return ``final_hidden_states.view(...)``), one per MoE layer; Qwen3-MoE
    hands the norm the all-reduced value itself."""
    graphs = traced(model, route="compile_fx")
    v2 = [n for n in graphs[0].graph.nodes if getattr(n.target, "__name__", "") == "auto_functionalized_v2"
          and op_name(n.args[0]).startswith("vllm_ir.fused_add_rms_norm")]
    assert len(v2) == 2 * LAYERS
    moe_layers = {"llama": 0, "mixtral": LAYERS, "qwen3_moe": 0, "deepseek_v3": LAYERS - 1}[model]
    assert sum(1 for n in v2 if n.kwargs.get("_x_alias")) == moe_layers
    _check_model(graphs)
