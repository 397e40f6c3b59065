"""The selector's two moments: a graph site (the unfused chain is the alternative) and a
call inside a fused op (it is not). Pure functions over Call: no GPU needed."""

from __future__ import annotations

import torch

from fusion_passes import backends
from fusion_passes.backends import Slower
from fusion_passes.backends import triton as triton_backend


def cuda_call(tokens, hidden=7168, variant="add_rmsnorm", world_size=1):
    return backends.Call(variant=variant, device="cuda", dtype=torch.bfloat16, hidden=hidden,
                         world_size=world_size, tokens=tokens)


def test_a_measured_crossover_is_a_slower_decline():
    reason = triton_backend.unsupported(cuda_call(512))  # ws1 add_rmsnorm lost to Inductor at 512 tokens
    assert isinstance(reason, Slower) and "measured crossover" in reason
    assert not isinstance(triton_backend.unsupported(cuda_call(512, world_size=4)), Slower)  # never measured


def test_a_graph_site_declines_where_measured_slower_but_a_call_inside_the_op_does_not():
    assert backends.select(cuda_call(256)) == "triton"
    assert backends.select(cuda_call(512)) == "reference"  # the matcher then leaves a GPU site unfused
    assert backends.select(cuda_call(512), "auto", run_time=True) == "triton"  # not the eager reference


def test_run_time_never_overrides_a_hard_limit():
    too_wide = cuda_call(8, hidden=32768)
    assert backends.select(too_wide, "auto", run_time=True) == "reference"


def test_a_static_graph_site_carries_its_token_count(fake_pg):
    from fusion_passes.match import compile_time_call
    from fusion_passes.recognize import all_reduce
    from graphs import all_reduce as ar_fn, hf_rms_norm, trace

    gm = trace(lambda x, r, w: hf_rms_norm(ar_fn(x) + r, w), torch.randn(6, 64), torch.randn(6, 64), torch.randn(64))
    site = next(a for n in gm.graph.nodes if (a := all_reduce(n)) is not None)
    assert compile_time_call("add_rmsnorm", site).tokens == 6
