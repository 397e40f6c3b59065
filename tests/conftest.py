"""Shared fixtures: torch's fake process group, and make_fx tracing under it."""

from __future__ import annotations

import os

# vLLM on a machine without GPUs: its CPU platform (the rest of the recipe is
# fusion_passes/cli/vllm_cpu.py); never a hub download.
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The numerics tests compare the fused graph with the unfused one executed EAGERLY (and
# spawned ranks compare two compiles): they run with Inductor's eager-rounding mode, under
# which the pass rounds as eager does (fusion_passes.match.follow_inductor_precision).
# Inductor's default, where the pass follows the compile's own precision, is tested in
# tests/test_precision.py with the setting patched off.
os.environ.setdefault("TORCHINDUCTOR_EMULATE_PRECISION_CASTS", "1")

import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, settings

# Derandomized CI profile: the same examples every run, no example database (a failure
# reproduces on every machine; `make soak` runs the long random profile).
settings.register_profile(
    "ci", derandomize=True, database=None, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("soak", max_examples=20_000, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def fake_pg():
    """A world of 2 under torch's fake process group: collectives trace, never run."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if not dist.is_initialized():
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    yield dist.group.WORLD


@pytest.fixture(autouse=True)
def every_rewrite_keeps_types(monkeypatch):
    """After EVERY FusionPass run in the suite (traced graphs and Inductor compiles alike),
    each surviving node reads values of the dtypes and shapes it read before the pass
    (graphs.assert_types_kept): no fused output changes type (issue 22)."""
    from fusion_passes import FusionPass
    from graphs import assert_types_kept, types_read

    call = FusionPass.__call__

    def checked(self, graph):
        reads = types_read(graph)
        call(self, graph)
        assert_types_kept(reads, graph)

    monkeypatch.setattr(FusionPass, "__call__", checked)
