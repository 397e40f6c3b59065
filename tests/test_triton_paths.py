"""The triton backend's multi-rank path choice (a pure function: no GPU needed)."""

from __future__ import annotations

import pytest

from fusion_passes.backends import lamport, thresholds
from fusion_passes.backends.triton import PATH_ENV, path_for

LIMITS = thresholds.TRITON


def test_the_table_picks_the_measured_barrier_path_by_default(monkeypatch):
    monkeypatch.delenv(PATH_ENV, raising=False)
    for world in (2, 4, 8):
        assert path_for(world, 1, 7168, 2) == "barrier"
        assert path_for(world, 16384, 7168, 2) == "barrier"


def test_a_table_entry_selects_by_token_limit(monkeypatch):
    monkeypatch.delenv(PATH_ENV, raising=False)
    monkeypatch.setitem(LIMITS, "paths", {4: ((16, "lamport"), (512, "twoshot"), (None, "barrier"))})
    assert [path_for(4, t, 4096, 2) for t in (1, 16, 17, 512, 513)] == [
        "lamport", "lamport", "twoshot", "twoshot", "barrier"]


@pytest.mark.parametrize("path", ["lamport", "twoshot", "barrier"])
def test_the_environment_forces_a_path(monkeypatch, path):
    monkeypatch.setenv(PATH_ENV, path)
    assert path_for(2, 8, 4096, 2) == path


def test_a_bad_forced_path_is_a_named_error(monkeypatch):
    monkeypatch.setenv(PATH_ENV, "lamprey")
    with pytest.raises(ValueError, match="FUSION_PASSES_TRITON_PATH='lamprey'.*barrier, lamport, twoshot"):
        path_for(2, 8, 4096, 2)


def test_a_wait_free_workspace_over_budget_falls_back_to_the_barrier(monkeypatch):
    monkeypatch.setenv(PATH_ENV, "twoshot")
    budget = LIMITS["lamport_max_workspace_bytes"]
    # the largest power-of-two token count whose three slots of 9 regions fit at TP8, hidden 7168, bf16
    fits = max(t for t in (2**i for i in range(20)) if lamport.buffer_elems(8, t, 7168) * 2 <= budget)
    assert path_for(8, fits, 7168, 2) == "twoshot"
    assert path_for(8, fits + 1, 7168, 2) == "barrier"


def test_buffer_elems_counts_three_slots_of_world_plus_one_regions():
    assert lamport.buffer_elems(4, 8, 16) == 3 * 5 * 8 * 16
