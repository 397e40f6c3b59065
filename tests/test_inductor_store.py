"""fusion_passes.inductor_store under torch 2.11's Inductor config: the oldest torch
pyproject.toml accepts and the one on the lent GPUs.

torch 2.11 has one op-count and one accumulated-reads threshold for every device and no
``realize_opusers_threshold``; the pass once read that name, failed on every graph there
("internal error, graph left unchanged"), and no CPU test could see it because this
machine runs a later torch. Here the pass reads a config that has only the names torch
2.11.0's defines (tests/data/torch_2_11_inductor_config.txt) with 2.11's values of the
thresholds, and the analysis must store the sums that Inductor 2.11 stored on an H100 for
the same chains (its generated Triton kernels: results/README.md, "Rounding where the
compile stores", on the GPU).
"""

from __future__ import annotations

import pathlib

import pytest

from fusion_passes import _compat, inductor_store
from graphs import run_pass, stream_args, stream_chain, trace

pytestmark = pytest.mark.usefixtures("fake_pg")
NAMES = frozenset(line for line in (pathlib.Path(__file__).parent / "data" / "torch_2_11_inductor_config.txt")
                  .read_text().splitlines() if line and not line.startswith("#"))
# torch 2.11.0's values where they differ from this torch's (its config.py)
VALUES_2_11 = {"realize_opcount_threshold": 30, "realize_acc_reads_threshold": 8}


class Torch211Config:
    """This torch's Inductor config seen through torch 2.11.0's names: any other name
    raises AttributeError, as it would there."""

    def __init__(self, real, prefix: str = ""):
        self._real, self._prefix = real, prefix

    def __getattr__(self, name: str):
        full = self._prefix + name
        if full in NAMES:
            return VALUES_2_11.get(full, getattr(self._real, name))
        if any(n.startswith(full + ".") for n in NAMES):
            return Torch211Config(getattr(self._real, name), full + ".")
        raise AttributeError(f"torch 2.11's Inductor config has no {full}")


@pytest.fixture
def default_precision():
    """Inductor's default precision (the suite runs with emulated casts: tests/conftest.py)."""
    with _compat.inductor_config.patch(emulate_precision_casts=False):
        yield


@pytest.fixture
def torch_2_11(monkeypatch):
    monkeypatch.setattr(_compat, "inductor_config", Torch211Config(_compat.inductor_config))


def test_the_proxy_refuses_a_name_torch_2_11_lacks(torch_2_11):
    assert "realize_reads_threshold" in NAMES and "realize_opusers_threshold" not in NAMES
    with pytest.raises(AttributeError, match="no realize_opusers_threshold"):
        _compat.inductor_config.realize_opusers_threshold  # noqa: B018
    assert _compat.inductor_config.triton.persistent_reductions in (True, False)


def test_thresholds_under_torch_2_11(torch_2_11):
    for device in ("cuda", "cpu"):
        rules = inductor_store._rules(device)
        assert (rules.reads, rules.acc, rules.ops, rules.users) == (4, 8, 30, None)
        assert rules.heavy_cpu == {"exp", "sigmoid"} and rules.delay_cheap_outputs is False


@pytest.mark.parametrize("gather,stored", [
    (True, ["add_4", "add_12", "add_14"]),  # H100, torch 2.11: kernels 3, 7 and 8 store the stream
    (False, ["add_6", "add_14"]),  # kernels 4 and 5
])
def test_the_pass_stores_what_inductor_2_11_stored_on_an_h100(torch_2_11, monkeypatch, gather, stored):
    """The 8-site stream of tests/gpu/parity_check.py (bf16, no quant) traced here, the
    analysis run as for a CUDA graph: the sums it stores are the ones Inductor 2.11's
    generated Triton code stored (16 x 4096 with the gather, 16 x 1024 without), and the
    pass fuses all 8 sites with no internal error."""
    seen = []
    analyse = inductor_store.analyse

    def logged(graph):
        stores = analyse(graph)
        seen.append([n.name for n in graph.nodes if n.op == "call_function" and n.name.startswith("add")
                     and "aten.add" in str(n.target) and stores.stored(n)])
        return stores

    monkeypatch.setattr(inductor_store, "analyse", logged)
    monkeypatch.setattr(inductor_store, "_device", lambda graph: "cuda")
    gm = trace(stream_chain(8, None, 0, gather), *stream_args(8, 0, gather, 4, 64))
    _, report = run_pass(gm)
    assert seen == [stored]
    assert sum(s.fused for s in report.sites) == 8 and not report.errors, report.summary()


def _flags(gm) -> list[dict]:
    return [dict(n.kwargs) for n in gm.graph.nodes if "fusion_passes" in str(n.target)]


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_a_stored_norm_output_gets_its_amax_unrounded_on_a_gpu_only(default_precision, torch_2_11, monkeypatch,
                                                                    device):
    """The FP8 stream with an embedding gather at hidden 4096 (no persistent reduction):
    the compile stores the first site's norm output (its inlined computation reads 5
    buffers, more than 4, and the quant reads it twice). Inductor's Triton code then takes
    the amax in the loop that stores it, unrounded, and the codes a loop later from the
    stored value (on an H100, 1.49% of that site's codes differed from the compile's while
    the fused op took the amax from the rounded value): ``amax_unrounded`` there, on a GPU;
    on CPU the amax reads the rounded value too, so no flag."""
    from fusion_passes import epilogue

    monkeypatch.setattr(inductor_store, "_device", lambda graph: device)
    gm = trace(stream_chain(8, epilogue.fp8_per_token, 1, True), *stream_args(8, 1, True, 4, 4096))
    _, report = run_pass(gm, backend="reference")
    assert sum(s.fused for s in report.sites) == 8
    first = _flags(gm)[0]
    assert not first.get("quant_unrounded") and first.get("amax_unrounded", False) is (device == "cuda"), first


def test_amax_unrounded_scales_from_the_unrounded_value_and_codes_from_the_rounded():
    """epilogue.quantize's ``codes_rounded`` (the flag's reference) against torch ops: the
    per-token scale from the fp32 value's amax, the codes from the bf16 value; each half
    differs from the other readings, so a swap is caught."""
    import torch

    from fusion_passes import epilogue

    g = torch.Generator().manual_seed(0)
    y32 = torch.randn(64, 512, generator=g) * 3
    y = y32.to(torch.bfloat16)
    params = {"fp8_dtype": torch.float8_e4m3fn, "scale_ub": None}
    q, s = epilogue.quantize("add_rmsnorm_fp8_per_token", y, params, y32, amax_unrounded=True, codes_rounded=True)
    want_s = (y32.abs().amax(-1, keepdim=True) / 448.0).clamp(min=1 / (448.0 * 512))
    want_q = (y.float() * want_s.reciprocal()).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(s, want_s) and torch.equal(q.float(), want_q.float())
    q_all, s_all = epilogue.quantize("add_rmsnorm_fp8_per_token", y, params, y32, amax_unrounded=True)
    q_none, s_none = epilogue.quantize("add_rmsnorm_fp8_per_token", y, params)
    assert torch.equal(s_all, s) and not torch.equal(q_all.float(), q.float())  # codes: rounded vs unrounded
    assert not torch.equal(s_none, s)  # scales: the rounded value's amax
    with pytest.raises(ValueError, match="amax_unrounded"):
        epilogue.quantize("add_rmsnorm_nvfp4", y, {}, y32, codes_rounded=True)
