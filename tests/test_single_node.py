"""groups.is_single_node: decided once per group at its first eager call, never inside a
CUDA-graph capture, a failure logged (naming the group) and asked again, never cached.

Under torch's fake process group (its all_gather_object hands this rank's host name to
every slot); the real two-process answer is checked in tests/test_hoist_hf.py's gloo worker.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.distributed as dist

from fusion_passes import groups


@pytest.fixture
def group(fake_pg):
    name = "c10d:" + fake_pg.group_name
    groups._SINGLE_NODE.pop(name, None)
    groups._warned.clear()
    yield name
    groups._SINGLE_NODE.pop(name, None)


@pytest.fixture
def gathers(monkeypatch):
    """Counts the host-name collectives; ``fail`` makes the next ones raise."""
    real = dist.all_gather_object
    state = {"calls": 0, "fail": None}

    def all_gather_object(*args, **kwargs):
        state["calls"] += 1
        if state["fail"] is not None:
            raise state["fail"]
        return real(*args, **kwargs)

    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    return state


def test_decided_once_then_read(group, gathers):
    assert groups.is_single_node(group) is True
    assert [groups.is_single_node(group) for _ in range(5)] == [True] * 5
    assert gathers["calls"] == 1


def test_a_failure_is_logged_not_cached_and_asked_again(group, gathers, caplog):
    gathers["fail"] = RuntimeError("gloo lost a peer")
    with caplog.at_level(logging.WARNING, logger="fusion_passes"):
        assert groups.is_single_node(group) is False
    assert group not in groups._SINGLE_NODE
    (record,) = [r for r in caplog.records if group in r.getMessage()]
    assert "gloo lost a peer" in record.getMessage() and "asks again" in record.getMessage()
    gathers["fail"] = None
    assert groups.is_single_node(group) is True and groups._SINGLE_NODE[group] is True
    assert gathers["calls"] == 2


def test_an_unknown_group_is_reported_by_name(fake_pg, caplog):
    with caplog.at_level(logging.WARNING, logger="fusion_passes"):
        assert groups.is_single_node("c10d:no-such-group") is False
    assert "c10d:no-such-group" not in groups._SINGLE_NODE
    assert any("'c10d:no-such-group'" in r.getMessage() and "Could not resolve" in r.getMessage()
               for r in caplog.records)


def test_no_collective_under_cuda_graph_capture(group, gathers, monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with caplog.at_level(logging.WARNING, logger="fusion_passes"):
        assert groups.is_single_node(group) is False
    assert gathers["calls"] == 0 and group not in groups._SINGLE_NODE
    assert any("capture" in r.getMessage() for r in caplog.records)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)  # the next eager call
    assert groups.is_single_node(group) is True and gathers["calls"] == 1


def test_more_ranks_than_local_gpus_needs_no_collective(group, gathers, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert groups.is_single_node(group) is False and groups._SINGLE_NODE[group] is False
    assert gathers["calls"] == 0
