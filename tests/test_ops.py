"""The fused op's contract: fake shapes, clear errors for bad input, reference numerics."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fusion_passes  # noqa: F401  (registers the op)
from fusion_passes import epilogue

op = torch.ops.fusion_passes.allreduce_add_rmsnorm


def test_fake_impl_shapes_and_dtypes():
    with FakeTensorMode():
        x = torch.empty(3, 7, 64, dtype=torch.bfloat16)
        out, res = op(x, x, torch.empty(64, dtype=torch.float32), 1e-6, "c10d:0", False, False)
        assert out.shape == x.shape and out.dtype == torch.float32  # w * h.to(bf16) promotes
        assert res.shape == x.shape and res.dtype == torch.bfloat16
        out, _ = op(x, None, None, 1e-6, "c10d:0")
        assert out.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(residual=torch.empty(4, 16)), "residual must match input"),
        (dict(weight=torch.empty(16)), r"weight must be \[32\]"),
        (dict(group="tp0"), "bad group"),
        (dict(input=torch.empty(4, 32, dtype=torch.int32)), "floating point"),
    ],
)
def test_bad_inputs_give_clear_errors(kwargs, error):
    args = dict(input=torch.empty(4, 32), residual=None, weight=torch.empty(32), eps=1e-6, group="c10d:0")
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=error):
        op(args["input"], args["residual"], args["weight"], args["eps"], args["group"])


def test_epilogue_matches_torch_rms_norm():
    x = torch.randn(6, 64, dtype=torch.bfloat16)
    w = torch.randn(64, dtype=torch.bfloat16)
    want = torch.nn.functional.rms_norm(x, (64,), w, 1e-6)
    torch.testing.assert_close(epilogue.rms_norm(x, w, 1e-6), want, rtol=0, atol=0)
