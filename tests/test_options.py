"""FusionOptions are validated when built; the pass's debugging hooks stay out of them."""

from __future__ import annotations

import dataclasses

import pytest

from fusion_passes import FusionOptions, FusionPass, backends


@pytest.mark.parametrize("backend", ["nonexistent", "", "Reference", "auto "])
def test_an_unknown_backend_is_refused_naming_the_known_ones(backend):
    with pytest.raises(ValueError, match=r"unknown backend .*; known: auto, aiter, flashinfer, triton, reference"):
        FusionOptions(backend=backend)
    with pytest.raises(ValueError, match="unknown backend"):
        FusionPass(backend=backend)


@pytest.mark.parametrize("name", ["hoist", "hoist_casts"])
@pytest.mark.parametrize("value", ["no", 0, 1, None, "True"])
def test_hoist_flags_must_be_bools(name, value):
    with pytest.raises(ValueError, match=f"{name} must be True or False"):
        FusionOptions(**{name: value})


def test_a_backend_that_is_not_a_string_is_refused():
    with pytest.raises(ValueError, match="backend must be a string"):
        FusionOptions(backend=None)


@pytest.mark.parametrize("backend", ["auto", *backends.ORDER])
def test_every_registered_backend_and_auto_are_accepted(backend):
    assert FusionPass(backend=backend, hoist=False, hoist_casts=True).options.backend == backend


def test_the_cache_key_holds_only_the_public_options():
    """No test hook in the options (they feed uuid(), the FX-graph cache key)."""
    assert [f.name for f in dataclasses.fields(FusionOptions)] == ["backend", "hoist", "hoist_casts", "calibrate"]
    assert FusionPass().uuid() != FusionPass(hoist=False).uuid()


def test_after_hoist_is_per_instance():
    a, b = FusionPass(), FusionPass()
    a.after_hoist = print
    assert b.after_hoist is None and not hasattr(FusionPass, "after_hoist")
    assert a.uuid() == b.uuid()  # a debugging hook, not part of the key
