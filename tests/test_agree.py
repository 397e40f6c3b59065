"""Every rank decides the same (fusion_passes.backends.agree), on real gloo processes.

One start-up of WORLD processes runs every case (tests/agree_ranks.py): the same measured
table on every rank is used by every rank; different tables, or a rank without one, make
every rank fall back to the shipped table with one warning; calibration with different
(fake) timings on each rank gives one decision, from the slowest rank's times.
"""

from __future__ import annotations

import socket

import pytest
import torch.multiprocessing as mp

pytestmark = pytest.mark.gloo
WORLD = 3


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    import agree_ranks

    tmp = str(tmp_path_factory.mktemp("agree"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=agree_ranks.worker, args=(r, WORLD, tmp, port, results)) for r in range(WORLD)]
    for p in procs:
        p.start()
    got = {}
    for _ in range(WORLD):
        rank, out, err = results.get(timeout=240)
        assert err is None, f"rank {rank}:\n{err}"
        got[rank] = out
    for p in procs:
        p.join(timeout=60)
    return [got[r] for r in range(WORLD)]


def test_the_same_table_everywhere_is_used_everywhere(ranks):
    same = [r["same"] for r in ranks]
    assert all(s["agreed"] for s in same) and len({s["digest"] for s in same}) == 1
    assert all(s["entry"] == (128, "unfused", "lamport") for s in same)  # 100 tokens: the 128 bucket
    assert all(s["before"] is None for s in same)  # compile time before any eager call: the shipped table
    assert all(s["compile_time"] == s["digest"] for s in same)  # after it: the agreed one


@pytest.mark.parametrize("case", ["mismatch", "one_without"])
def test_different_tables_make_every_rank_use_the_shipped_one(ranks, case):
    answers = [r[case] for r in ranks]
    assert all(not a["agreed"] and a["entry"] is None and a["compile_time"] is None for a in answers)


def test_one_warning_per_rank_for_a_mismatch_naming_the_digests(ranks):
    for r in ranks:
        differ = [w for w in r["warnings"] if "different measured tables" in w]
        assert len(differ) == 2, r["warnings"]  # mismatch + one_without, once each
        assert "every rank uses the shipped table" in differ[0]


def test_no_table_anywhere_is_the_shipped_table_without_a_warning(ranks):
    assert all(not r["none"]["agreed"] and r["none"]["entry"] is None for r in ranks)


def test_calibration_decides_once_from_the_slowest_rank(ranks):
    picks = [tuple(r["decide"]) for r in ranks]
    assert len({(p, tuple(sorted(t.items()))) for p, t in picks}) == 1
    pick, slowest = picks[0]
    # barrier: 10, 15, 20 us on the ranks -> 20 counts; lamport 12; nccl 14, 13, 12 -> 14
    assert slowest == {"fused:barrier:8": 20.0, "fused:lamport:8": 12.0, "nccl+static": 14.0}
    assert pick == "fused:lamport:8"


def test_a_tuned_bucket_is_the_same_entry_on_every_rank(ranks):
    entries = [r["bucket"] for r in ranks]
    assert all(e == entries[0] for e in entries)
    assert entries[0]["pick"] == "fused" and entries[0]["path"] == "lamport" and entries[0]["num_warps"] == 8
    assert entries[0]["unfused_us"] == 14.0 and entries[0]["best_unfused"] == "nccl+static"
