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


# -- a memory watch (CI has 24 GB and two cores) ------------------------------------------
# In 3 of about 10 full runs on the development machine some process of the suite grew to
# 9-23 GB (once killed by the kernel) and the cause was not found: runs with per-test probes
# stayed under 2 GB. So every run watches: the first time the pytest process or any process
# it started exceeds MEMORY_WATCH_GB of resident memory, it prints ONE line naming the test
# that was running and that process's command line, and dumps the pytest process's Python
# stacks to stderr. It never kills anything; a run that stays under the mark prints nothing.
MEMORY_WATCH_GB = float(os.environ.get("FUSION_PASSES_TEST_MEMORY_WATCH_GB", "6"))
_RUNNING = {"test": None}


def pytest_configure(config):
    try:
        import psutil
    except ImportError:  # the watch is diagnostics only; psutil comes with the vllm extra
        return
    import faulthandler
    import sys
    import threading
    import time

    capman = config.pluginmanager.getplugin("capturemanager")

    def watch():
        me = psutil.Process()
        while True:
            time.sleep(1.0)
            try:
                procs = [me, *me.children(recursive=True)]
            except psutil.Error:
                continue
            for p in procs:
                try:
                    rss = p.memory_info().rss
                    if rss > MEMORY_WATCH_GB * 2**30:
                        cmd = " ".join(p.cmdline())[:300]
                        with capman.global_and_fixture_disabled():  # past the test's output capture
                            print(f"\nMEMORY WATCH: pid {p.pid} holds {rss / 2**30:.1f} GB during "
                                  f"{_RUNNING['test']}: {cmd}", file=sys.stderr, flush=True)
                            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                        return
                except psutil.Error:
                    continue

    threading.Thread(target=watch, name="memory-watch", daemon=True).start()


def pytest_runtest_logstart(nodeid, location):
    _RUNNING["test"] = nodeid
