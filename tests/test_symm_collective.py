"""Which collective the triton backend's ``unfused`` pick runs (fusion_passes/backends/symm.py).

The symmetric-memory collectives need several CUDA GPUs, which neither this machine nor CI
has: the symm branch is checked here with the workspace and torch's ``symm_mem`` ops
replaced by recorders (what is copied where, which op is called on which group), and is
labelled NOT EXECUTED at world size > 1 in the code. The other branch, the group's own
collective, runs for real under torch's fake process group.
"""

from __future__ import annotations

import types

import pytest
import torch

from fusion_passes import groups
from fusion_passes.backends import symm


@pytest.mark.parametrize("best, want", [
    ("symm_one_shot+static", "symm_one_shot"), ("symm_two_shot+tokdyn", "symm_two_shot"),
    ("nccl+max_autotune", "nccl"), ("none+static", None), (None, None), ("", None), ("multimem+static", None),
])
def test_collective_of_a_measured_best(best, want):
    assert symm.collective_of(best) == want


@pytest.fixture
def recorded(monkeypatch):
    """symm.get and torch.ops.symm_mem replaced by recorders; every call lands in the list."""
    calls = []
    buffer = torch.zeros(1 << 12, dtype=torch.uint8)
    ws = symm.Workspace("g0", buffer, None, 0, 2, 0, 0, 0)

    def get(group, nbytes, device):
        calls.append(("get", group, nbytes))
        return ws

    def one_shot(buf, op, name):
        calls.append(("one_shot", op, name, buf.data_ptr() == buffer.data_ptr(), buf.clone()))
        return buf * 2

    def two_shot_(buf, op, name):
        calls.append(("two_shot_", op, name, buf.data_ptr() == buffer.data_ptr(), buf.clone()))
        buf.mul_(2)

    monkeypatch.setattr(symm, "get", get)
    monkeypatch.setattr(torch.ops, "symm_mem", types.SimpleNamespace(one_shot_all_reduce=one_shot,
                                                                     two_shot_all_reduce_=two_shot_), raising=False)
    monkeypatch.setattr(groups, "all_reduce", lambda x, g: calls.append(("own", g)) or x + 1)
    return calls


@pytest.mark.parametrize("collective", ["symm_one_shot", "symm_two_shot"])
def test_a_symm_collective_reduces_in_the_groups_workspace(recorded, collective):
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    out = symm.all_reduce(x, "c10d:g0", collective)
    get, op = recorded
    assert get == ("get", "c10d:g0", 3 * 8 * 2)
    assert op[:4] == (collective.replace("symm_", "").replace("two_shot", "two_shot_"), "sum", "g0", True)
    assert torch.equal(op[4], x)  # the input was copied into the workspace before the op
    assert out.shape == x.shape and out.dtype == x.dtype and torch.equal(out, x * 2)


@pytest.mark.parametrize("group, collective", [
    ("c10d:g0", None), ("c10d:g0", "nccl"), ("vllm:tp", "symm_one_shot"), ("vllm:tp", None),
])
def test_otherwise_the_groups_own_collective(recorded, group, collective):
    x = torch.randn(2, 4)
    assert torch.equal(symm.all_reduce(x, group, collective), x + 1)
    assert recorded == [("own", group)]


def test_the_own_collective_runs_under_the_fake_process_group(fake_pg):
    x = torch.randn(2, 4)
    out = symm.all_reduce(x, "c10d:" + fake_pg.group_name, "nccl")
    assert out.shape == x.shape and out.data_ptr() != x.data_ptr()
