"""``install()`` / ``uninstall()`` / ``enabled()`` next to passes that others set: a second
install never stacks a duplicate, and uninstall never drops a pass it did not put there."""

from __future__ import annotations

import warnings

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
