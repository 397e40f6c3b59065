"""``install()`` / ``uninstall()`` / ``enabled()`` next to passes that others set: a second
install never stacks a duplicate, and uninstall never drops a pass it did not put there.
And across threads (a server compiles in worker threads): the installation is process-wide."""

from __future__ import annotations

import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch._inductor import config
from torch.fx.experimental.proxy_tensor import make_fx

import fusion_passes
from fusion_passes import _compat
from test_cli_models import example_args, two_sites


class Mine(_compat.CustomGraphPass):
    """A user's own post-grad pass: counts the graphs it sees."""

    def __init__(self):
        self.seen = 0

    def __call__(self, graph):
        self.seen += 1

    def uuid(self):
        return "mine"


@pytest.fixture(autouse=True)
def clean_slot():
    old = config.post_grad_custom_post_pass
    config.post_grad_custom_post_pass = None
    yield
    while fusion_passes.registration._installed is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fusion_passes.uninstall()
    config.post_grad_custom_post_pass = old


def _run_slot() -> None:
    with torch.no_grad():
        gm = make_fx(two_sites, tracing_mode="fake")(*example_args())
    config.post_grad_custom_post_pass(gm.graph)


def test_a_second_install_with_the_same_options_is_the_same_pass(fake_pg):
    first = fusion_passes.install()
    assert fusion_passes.install() is first
    assert config.post_grad_custom_post_pass is first  # nothing stacked
    _run_slot()
    assert first.report.summary().startswith("2/2 all-reduces fused")  # a duplicate would say 0/2
    fusion_passes.uninstall()
    assert config.post_grad_custom_post_pass is None
    with pytest.raises(RuntimeError, match="nothing installed"):
        fusion_passes.uninstall()


def test_a_second_install_with_other_options_raises(fake_pg):
    fusion_passes.install()
    with pytest.raises(RuntimeError, match=r"already installed with FusionOptions\(backend='auto'.*"
                                           r"call fusion_passes.uninstall\(\) before installing with "
                                           r"FusionOptions\(backend='reference'"):
        fusion_passes.install(backend="reference")


def test_uninstall_keeps_a_pass_set_after_install_and_warns(fake_pg):
    fusion_passes.install()
    mine = Mine()
    config.post_grad_custom_post_pass = mine
    with pytest.warns(UserWarning, match="post_grad_custom_post_pass was changed after install"):
        fusion_passes.uninstall()
    assert config.post_grad_custom_post_pass is mine
    fusion = fusion_passes.install()  # installs again, chained after the user's pass
    _run_slot()
    assert mine.seen == 1 and len(fusion.report.fused) == 2
    fusion_passes.uninstall()
    assert config.post_grad_custom_post_pass is mine


def test_enabled_inside_install_leaves_it_installed(fake_pg):
    outer = fusion_passes.install()
    with fusion_passes.enabled() as inner:
        assert inner is outer
    assert config.post_grad_custom_post_pass is outer
    with pytest.raises(RuntimeError, match="already installed"), fusion_passes.enabled(hoist=False):
        pass
    assert config.post_grad_custom_post_pass is outer


# --- threads: torch 2.14 keeps config assignments per thread; the installation is process-wide


def _in_thread(fn, *args):
    """Run *fn* in a fresh worker thread (a ThreadPoolExecutor, as servers compile in)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(fn, *args).result(timeout=600)


def _compile_and_run():
    """A real Inductor compile of ``two_sites`` in the calling thread (caches off, so the
    post-grad pass runs), and its outputs."""
    torch._dynamo.reset()
    with torch.no_grad(), config.patch(force_disable_caches=True):
        return torch.compile(two_sites)(*example_args())


def _eager():
    with torch.no_grad():
        return two_sites(*example_args())


def test_a_worker_thread_compile_runs_the_pass_installed_in_the_main_thread(fake_pg):
    fusion = fusion_passes.install()
    out = _in_thread(_compile_and_run)
    assert [r.summary().split(" (")[0] for r in fusion.reports] == ["2/2 all-reduces fused"]
    assert [s.variant for s in fusion.report.sites] == ["allreduce_add_rmsnorm", "allreduce_add_rmsnorm_final"]
    assert all(torch.equal(a, b) for a, b in zip(out, _eager(), strict=True))


def test_uninstall_in_a_worker_thread_restores_every_thread(fake_pg):
    first = fusion_passes.install()
    assert _in_thread(_slot_of_thread) is first
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "changed after install()" warning
        _in_thread(fusion_passes.uninstall)
    assert config.post_grad_custom_post_pass is None and _in_thread(_slot_of_thread) is None
    second = fusion_passes.install()  # a fresh install, not stacked on the first
    assert config.post_grad_custom_post_pass is second and _in_thread(_slot_of_thread) is second
    _in_thread(_run_slot)
    assert first.reports == [] and second.report.summary().startswith("2/2 all-reduces fused")


def _slot_of_thread():
    return config.post_grad_custom_post_pass


def test_enabled_blocks_in_two_threads_share_one_installation(fake_pg):
    """The first block to leave keeps the pass on for the other, whose compile runs it;
    the last to leave takes it off, and uninstall() refuses while a block is inside."""
    inside, first_left = threading.Barrier(2, timeout=60), threading.Event()

    def first():
        try:
            with fusion_passes.enabled() as fusion:
                inside.wait()
        finally:
            first_left.set()
        return fusion

    def second():
        with fusion_passes.enabled() as fusion:
            inside.wait()
            assert first_left.wait(timeout=60)
            with pytest.raises(RuntimeError, match=r"1 fusion_passes.enabled\(\) block\(s\) still inside"):
                fusion_passes.uninstall()
            out = _compile_and_run()
        return fusion, out

    with ThreadPoolExecutor(max_workers=2) as pool:
        a, b = pool.submit(first), pool.submit(second)
        fusion_a, (fusion_b, out) = a.result(timeout=600), b.result(timeout=600)
    assert fusion_a is fusion_b
    assert [r.summary().split(" (")[0] for r in fusion_a.reports] == ["2/2 all-reduces fused"]
    assert all(torch.equal(x, y) for x, y in zip(out, _eager(), strict=True))
    assert fusion_passes.registration._installed is None
    assert config.post_grad_custom_post_pass is None and _in_thread(_slot_of_thread) is None


def test_a_thread_that_assigned_the_slot_itself(fake_pg):
    """torch's precedence: a thread's own assignment hides the process-wide value. install()
    there refuses with the reason; one that config.patch left (the value install() chained)
    is dropped, so that thread sees the installation."""
    def assigns():
        config.post_grad_custom_post_pass = Mine()
        with pytest.raises(RuntimeError, match="this thread assigned post_grad_custom_post_pass itself"):
            fusion_passes.install()
        return _slot_of_thread()

    def patched():
        with config.patch(post_grad_custom_post_pass=Mine()):
            pass  # the exit assigns the prior value (None) in this thread
        with fusion_passes.enabled() as fusion:
            _run_slot()
        return fusion

    fusion = fusion_passes.install()
    assert isinstance(_in_thread(assigns), Mine)
    assert _in_thread(patched) is fusion and fusion.report.summary().startswith("2/2 all-reduces fused")
    assert config.post_grad_custom_post_pass is fusion
