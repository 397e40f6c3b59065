"""Real vLLM 0.33 FP8 graphs (TP=2, traced on CPU by fusion_passes.cli.capture): every
all-reduce whose norm output is quantized fuses WITH the quant.

Llama, 2 layers: the embedding all-reduce -> layer 0's rms_norm -> FP8 (qkv GEMM), then per
layer o_proj and down_proj all-reduces -> fused_add_rms_norm -> FP8, except the last one,
which feeds the final norm -> bf16 lm_head (no quant): 1 + 3 quant fusions + 1 plain.

DeepSeek-V3 block FP8 (``weight_block_size [128, 128]``, dynamic activations): the norm
outputs are quantized 1 x 128 per token group for the next block-scaled GEMM.

Numerics: the traced graphs hold ops that cannot run here (MLA attention and the MoE
experts behind opaque ops with no CPU kernels; block-FP8 GEMMs), so every fused site is
cut out of the REAL graph (the chain's own nodes, their outside inputs as placeholders)
and that subgraph runs unfused and fused on 2 simulated ranks (tests/ranks.py): bit-equal.
Slow (vLLM import + one trace per model and quant, minutes on 2 cores): marked ``vllm``.
"""

from __future__ import annotations

import copy
import operator
import os

import pytest
import torch
from torch.fx import Graph, GraphModule, Node
from torch.testing import FileCheck

from fusion_passes.recognize.fx import op_name
from ranks import run_ranks

pytestmark = pytest.mark.vllm

LAYERS = 2
TOKENS = 5  # the symbolic token count, made concrete for the site numerics (odd on purpose)


def _trace_vllm():
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    from fusion_passes.cli.vllm_cpu_ops import register_c_quant_ops

    # FP8 weight loading calls _C.static_scaled_fp8_quant (see fusion_passes.cli.vllm_cpu_ops)
    if not register_c_quant_ops():
        pytest.skip("needs vLLM 0.33's wheel (its _C schemas) installed")
    pytest.importorskip("vllm", reason="needs vLLM 0.33 (the vllm extra): the capture tool traces its models")
    from fusion_passes.cli.capture import trace_vllm

    return trace_vllm


def _fuse(gm: GraphModule):
    from fusion_passes import FusionPass

    p = FusionPass()
    p(gm.graph)
    gm.recompile()
    gm.graph.lint()
    assert not p.report.errors, p.report.errors
    return p.report


# ------------------------------------------------------------------- site numerics


def _concrete(v, tokens: int) -> list[int]:
    return [d if isinstance(d, int) else tokens for d in v.shape]


def _site_graphs(gm: GraphModule, tokens: int = TOKENS) -> list[tuple[str, GraphModule, Node]]:
    """Every all-reduce site of *gm* as its own graph: the nodes the fused op replaces,
    in graph order, their outside inputs as placeholders (symbolic sizes made *tokens*),
    outputs every value read outside the chain. Returns ``(all-reduce name, graph, the
    placeholder of the all-reduce input)``."""
    from fusion_passes.match import Site, find_site
    from fusion_passes.recognize import dead_buffers
    from fusion_passes.recognize import all_reduce

    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    out = []
    for node in list(gm.graph.nodes):
        ar = all_reduce(node)
        if ar is None or not hasattr(ar, "input"):
            continue
        site = find_site(ar)
        assert isinstance(site, Site), site
        chain = set(site.removed) | set(dead_buffers(site.quant) if site.quant is not None else ())
        g, env = Graph(), {}

        def arg(a: Node):
            if a not in env:
                v = a.meta.get("val")
                if isinstance(v, torch.SymInt):
                    env[a] = tokens
                else:
                    p = g.placeholder(a.name)
                    p.meta["val"] = v
                    env[a] = p
            return env[a]

        for n in sorted(chain, key=order.__getitem__):
            for a in n.all_input_nodes:
                if a not in chain:
                    arg(a)
            env[n] = g.node_copy(n, arg)
        g.output(tuple(env[n] for n in sorted(chain, key=order.__getitem__)
                       if any(u not in chain for u in n.users)))
        out.append((ar.node.name, GraphModule(torch.nn.Module(), g), env[ar.input]))
    return out


def _site_inputs(sub: GraphModule, ar_input: Node, world: int, seed: int) -> list[list]:
    """Random inputs: the all-reduce input differs per rank (each rank's partial sum);
    residuals and norm weights are replicated."""
    gen = torch.Generator().manual_seed(seed)
    ranks = [[] for _ in range(world)]
    for p in sub.graph.find_nodes(op="placeholder"):
        v = p.meta["val"]
        shape = _concrete(v, TOKENS)
        if p is ar_input:
            vals = [torch.randn(shape, generator=gen).to(v.dtype) for _ in range(world)]
        else:
            t = torch.randn(shape, generator=gen)
            t = (1 + 0.2 * t) if len(shape) == 1 else t  # a norm weight around 1
            vals = [t.to(v.dtype)] * world
        for r in range(world):
            ranks[r].append(vals[r])
    return ranks


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t


def _assert_sites_bit_exact(gm: GraphModule, variants: dict[str, str]) -> None:
    """Each site of the UNFUSED real graph *gm*, unfused vs fused on 2 simulated ranks."""
    sites = _site_graphs(gm)
    assert [name for name, _, _ in sites] == list(variants)
    for i, (name, sub, ar_input) in enumerate(sites):
        fused = copy.deepcopy(sub)
        report = _fuse(fused)
        assert [s.variant for s in report.sites] == [variants[name]], name
        inputs = _site_inputs(sub, ar_input, world=2, seed=i)
        want, got = run_ranks(sub, inputs), run_ranks(fused, inputs)
        for r in range(2):
            assert len(want[r]) == len(got[r]), name
            for a, b in zip(want[r], got[r]):
                assert (a.dtype, a.shape) == (b.dtype, b.shape), name
                # the reference backend runs the chain's own math in its order: bit-identical
                assert torch.equal(_bits(a), _bits(b)), (name, a, b)


# --------------------------------------------------------------------------- Llama


@pytest.mark.parametrize("quant,kind", [("fp8_static", "fp8_static"), ("fp8_dynamic", "fp8_per_tensor")])
def test_vllm_llama_fp8_fuses_the_quant(fake_pg, quant, kind):
    """Static FP8 and dynamic FP8 fuse the quant at every quantized norm. vLLM's Fp8Config
    ``activation_scheme: dynamic`` on a per-tensor checkpoint is dynamic PER-TENSOR FP8
    (QuantFP8.forward_native: ``x.abs().max()`` over the whole norm output)."""
    trace_vllm = _trace_vllm()
    (gm,) = trace_vllm("llama", tp=2, dtype="bfloat16", quant=quant, layers=LAYERS)
    unfused = copy.deepcopy(gm)
    report = _fuse(gm)
    expected = ([f"allreduce_rmsnorm_{kind}"] + [f"allreduce_add_rmsnorm_{kind}"] * (2 * LAYERS - 1)
                + ["allreduce_add_rmsnorm_final"])
    assert [s.variant for s in report.sites] == expected
    FileCheck().check_not("vllm.all_reduce").check_not("vllm_ir.").run(gm.code)
    FileCheck().check_count(f"fusion_passes.allreduce_add_rmsnorm_{kind}.default", 2 * LAYERS,
                            exactly=True).run(gm.code)
    FileCheck().check_count("fusion_passes.allreduce_add_rmsnorm.default", 1, exactly=True).run(gm.code)
    # every activation quant left is an input of o_proj / down_proj (attention output,
    # silu_and_mul output): 2 per layer, no norm before them
    FileCheck().check_count("torch.float8_e4m3fn);", 2 * LAYERS, exactly=True).run(gm.code)
    if kind == "fp8_per_tensor":
        FileCheck().check_count("aten.max.default", 2 * LAYERS, exactly=True).run(gm.code)
    _assert_sites_bit_exact(unfused, {s.all_reduce: s.variant for s in report.sites})


# ------------------------------------------------------------------- DeepSeek-V3 block FP8


@pytest.fixture
def block_fp8_on_cpu():
    """``trace_vllm`` for block FP8: the capture tool sets up what block FP8 needs on a CPU
    (``fusion_passes.cli.vllm_cpu.prepare_block_fp8``; none of it touches the graph
    around the norms)."""
    return _trace_vllm()


def _quantized_sources(gm: GraphModule) -> list[Node]:
    """The tensor each remaining native 1 x g group quant reads (``view(x, [-1, G, g]) -> abs``)."""
    out = []
    for n in gm.graph.find_nodes(op="call_function", target=torch.ops.aten.abs.default):
        v = n.args[0]
        if (v.op == "call_function" and v.target in (torch.ops.aten.view.default, torch.ops.aten.reshape.default)
                and len(v.meta["val"].shape) == 3):
            out.append(v.args[0])
    return out


def _is(node: Node, qualified: str) -> bool:
    t = node.target
    return isinstance(t, torch._ops.OpOverload) and op_name(t).rpartition(".")[0] == qualified


def test_vllm_deepseek_v3_block_fp8_fuses_the_group_quant(fake_pg, block_fp8_on_cpu):
    """DeepSeek-V3, 2 layers (``first_k_dense_replace=1``: layer 0 dense, layer 1 MoE), block
    FP8 at TP=2. The activation quant is vLLM's NATIVE group chain (``custom_ops=none``:
    ``QuantFP8._quantize_group_native``), 1 x 128 groups, fp32 scales, row-major, no UE8M0.

    2L + 1 all-reduces: the embedding's and each layer's o_proj / MLP-or-MoE output.
    Quant fused (L + dense layers = 3): every input_layernorm (-> fused_qkv_a_proj GEMM)
    and the dense layer's post_attention_layernorm (-> gate_up_proj). Not quant-fused:
    the MoE layer's post_attention_layernorm, whose output feeds only the opaque
    ``moe_forward_shared`` (router, shared and routed experts quantize inside it), and the
    last all-reduce (final norm -> bf16 lm_head). The other quant chains are no sites:
    MLA's q_a_layernorm (-> q_b_proj, L of them) and kv_a_layernorm normalize a GEMM
    output, not an all-reduce; o_proj (L) and the dense down_proj (1) quantize the
    attention / activation output, with no norm."""
    (gm,) = block_fp8_on_cpu("deepseek_v3", tp=2, dtype="bfloat16", quant="fp8_block", layers=LAYERS)
    dense = 1  # first_k_dense_replace in the capture tool's config
    assert len(_quantized_sources(gm)) == LAYERS + dense + LAYERS + LAYERS + dense  # 8 quant chains
    unfused = copy.deepcopy(gm)
    report = _fuse(gm)
    expected = (["allreduce_rmsnorm_fp8_per_group"] + ["allreduce_add_rmsnorm_fp8_per_group"] * (LAYERS - 1 + dense)
                + ["allreduce_add_rmsnorm"] * (LAYERS - dense) + ["allreduce_add_rmsnorm_final"])
    assert [s.variant for s in report.sites] == expected
    assert all(s.fused and s.reason is None for s in report.sites)
    code = gm.code
    FileCheck().check_not("vllm.all_reduce").check_not("vllm_ir.fused_add_rms_norm").run(code)
    FileCheck().check_count("fusion_passes.allreduce_add_rmsnorm_fp8_per_group.default", LAYERS + dense,
                            exactly=True).run(code)
    FileCheck().check_count("fusion_passes.allreduce_add_rmsnorm.default", LAYERS - dense + 1, exactly=True).run(code)
    # the fused op's quant arguments: group 128, no UE8M0, row-major, vLLM's native floors
    from fusion_passes import epilogue

    for n in gm.graph.find_nodes(op="call_function",
                                 target=torch.ops.fusion_passes.allreduce_add_rmsnorm_fp8_per_group.default):
        assert n.args[5:11] == (128, False, False, 0.0, epilogue.fp8_min_scaling_factor(), torch.float8_e4m3fn)
    # what stays unfused, and why: MLA's q_a/kv_a norms read a GEMM output (no all-reduce)
    left_norms = gm.graph.find_nodes(op="call_function", target=torch.ops.vllm_ir.rms_norm.default)
    assert len(left_norms) == 2 * LAYERS
    for n in left_norms:
        src = n.args[0]
        assert src.target is operator.getitem and _is(src.args[0], "aten.split_with_sizes"), n.name
    sources = _quantized_sources(gm)
    norm_fed = [s for s in sources if _is(s, "vllm_ir.rms_norm")]
    assert len(norm_fed) == LAYERS and set(norm_fed) < set(left_norms)  # q_a_layernorm -> q_b_proj
    assert len(sources) - len(norm_fed) == LAYERS + dense  # o_proj, dense down_proj: no norm before them
    _assert_sites_bit_exact(unfused, {s.all_reduce: s.variant for s in report.sites})
