"""Probe inputs with edge values, evaluation of a region on them, and bit-exact comparison.

A spelling is accepted only if it computes what the canonical epilogue computes, bit for
bit in the graph's dtypes, on inputs chosen to separate conventions:

* norm probes (the all-reduced value, the residual): a zero row, a ``-0.0`` row, a row whose
  squares overflow neither fp32 nor the dtype but whose sum with the residual overflows the
  activation dtype (fp16: ``4e4 + 4e4``), a row whose squares underflow fp32, and random rows
  at scales from 1e-3 to 1e3 (the rounding of an activation-dtype sum shows on them);
* quant probes (the norm output): rows whose amax is ``M * k`` (``M`` = 448, the FP8 max;
  ``k`` in 1, 3, 5, 7, 3/8, ...) with elements ``k * t`` at FP8 rounding ties ``t`` (1.0625,
  2.125, 17, 304, ...: a ``y / s`` and a ``y * (1/s)`` land on different sides of them), rows
  at E2M1 ties (0.25, 0.75, ..., 5: NVFP4) with amax ``6 * k``, an all-zero row, ``-0.0``,
  amaxes under the FP8 scale floor (2^-12, 2^-40), random rows, and whole tensors that are
  tiny or zero (a per-tensor scale's floor shows only there).

The amax element sits at every 16th position, so every 1 x g group (g a multiple of 16)
holds one. Probes are deterministic (a fixed seed).
"""

from __future__ import annotations

import math

import torch
from torch.fx import Node

from fusion_passes.recognize.meaning import safe_eval

FP8_TIES = (1.0625, -1.1875, 2.125, -3.375, 9.5, -17.0, 304.0, -0.0029296875, 0.5, -448.0)
E2M1_TIES = (0.25, -0.75, 1.25, -1.75, 2.5, -3.5, 5.0, -6.0, 0.1, -0.0)
KS = (1.0, 3.0, 5.0, 7.0, 0.375, 5.0 / 64, 7.0 / 1024, 2.0 ** -7)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rows(shape: tuple, dtype: torch.dtype, fill) -> torch.Tensor:
    """A ``shape`` tensor whose row ``i`` (over the last dim) is ``fill(i, hidden)`` (fp64)."""
    hidden = shape[-1]
    rows = 1
    for s in shape[:-1]:
        rows *= s
    out = torch.stack([fill(i, hidden) for i in range(rows)]) if rows else torch.zeros(0, hidden)
    return out.reshape(shape).to(dtype)


def _pattern(values, hidden: int, scale: float, amax: float) -> torch.Tensor:
    row = torch.tensor(values, dtype=torch.float64).repeat(hidden // len(values) + 1)[:hidden] * scale
    row[::16] = amax
    row[8::16] = -amax / 2
    return row


def _row_count(shape: tuple) -> int:
    rows = 1
    for s in shape[:-1]:
        rows *= s
    return max(rows, 1)


def sets_for(shape: tuple, kinds: int) -> int:
    """How many probe tensors of *shape* it takes for every one of *kinds* row kinds to
    appear (a graph with few tokens has few rows per tensor; at least two)."""
    return max(2, -(-kinds // _row_count(shape)))


def quant_probes(shape: tuple, dtype: torch.dtype, every_kind: bool = True) -> list[torch.Tensor]:
    """Norm-output probes for the quant part (see the module docstring); one set of them
    unless *every_kind* (every row kind then occurs, however few rows)."""
    out = []
    for n in range(sets_for(shape, len(KS)) if every_kind else 1):
        out += _quant_set(shape, dtype, n * _row_count(shape))
    return out


def _quant_set(shape: tuple, dtype: torch.dtype, offset: int) -> list[torch.Tensor]:
    g = _gen(7 + offset)
    big = 2.0 ** 14 if dtype == torch.float16 else 2.0 ** 40

    def ties(i, h, table, top):
        k = KS[(i + offset) % len(KS)]
        return _pattern(table, h, k, top * k)

    def edges(i, h):
        kind = (i + offset) % 6
        if kind == 0:
            return torch.zeros(h, dtype=torch.float64)
        if kind == 1:
            return -torch.zeros(h, dtype=torch.float64) * torch.randn(h, generator=g, dtype=torch.float64).sign()
        if kind == 2:
            return _pattern((0.5, -0.25, 0.125), h, 2.0 ** -12, 2.0 ** -12)
        if kind == 3:
            return _pattern((0.5, -0.25), h, 2.0 ** -40, 2.0 ** -40)
        if kind == 4:
            return _pattern((1.0, -0.5), h, big, big)
        return torch.randn(h, generator=g, dtype=torch.float64) * 10.0 ** (i % 5 - 2)

    return [_rows(shape, dtype, lambda i, h: ties(i, h, FP8_TIES, 448.0)),
            _rows(shape, dtype, lambda i, h: ties(i, h, E2M1_TIES, 6.0)),
            _rows(shape, dtype, edges),
            # whole tensors under the scale floors (a per-tensor amax sees every row)
            _rows(shape, dtype, lambda i, h: _pattern((0.5, -0.25), h, 2.0 ** -40, 2.0 ** -40 * (1 + i % 3))),
            torch.zeros(shape, dtype=dtype)][: 5 if offset == 0 else 3]


def norm_probes(shape: tuple, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(all-reduced value, residual)`` probes (see the module docstring); row ``i`` is of
    kind ``(i + seed) % 7``, so consecutive seeds cover every kind however few rows."""
    g = _gen(seed)
    big = 4.0e4 if dtype == torch.float16 else 2.0 ** 50
    tiny = 2.0 ** -20 if dtype == torch.float16 else 2.0 ** -100

    def fill(i, h, which):
        kind = (i + seed) % 7
        r = torch.randn(h, generator=g, dtype=torch.float64)
        if kind == 0:
            return torch.zeros(h, dtype=torch.float64)
        if kind == 1:
            return -torch.zeros(h, dtype=torch.float64)
        if kind == 2:
            return big * (0.5 + r.abs() / 8)  # the two add up past fp16's max
        if kind == 3:
            return tiny * r
        return r * 10.0 ** ((i + which) % 7 - 3)

    return _rows(shape, dtype, lambda i, h: fill(i, h, 0)), _rows(shape, dtype, lambda i, h: fill(i, h, 1))


def base_probe(shape: tuple, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A probe value for a leaf input that is not the residual: by its shape and dtype."""
    g = _gen(seed)
    if not dtype.is_floating_point:
        return torch.zeros(shape, dtype=dtype)
    if math.prod(shape) == 1:  # a scale, a global scale, an upper bound
        return torch.full(shape, (0.0173, 1.0, 3.0)[seed % 3], dtype=dtype)
    w = 1.0 + 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)
    w.view(-1)[::13] = 0.0
    return w.to(dtype)


def evaluate(nodes: list[Node], env: dict[Node, object], refused: dict | None = None, sizes=None,
             budget: safe_eval.Budget | None = None) -> dict[Node, object]:
    """Run *nodes* (in order) on the values in *env* (extended in place), each through
    :func:`fusion_passes.recognize.meaning.safe_eval.call` (pure, bounded ops only), with their size
    arguments at the probed token count (*sizes*: a :class:`fusion_passes.recognize.meaning.probe_sizes.Sizes`).
    A node that is refused or fails to run gets no value (and neither do its users);
    *refused* collects ``node -> reason`` for the refused ones."""
    for n in nodes:
        if n in env:
            continue
        try:
            args = torch.fx.node.map_arg(n.args, lambda a: env[a])
            kwargs = torch.fx.node.map_arg(n.kwargs, lambda a: env[a])
        except KeyError:
            continue
        try:
            if sizes is not None:
                args, kwargs = sizes.args(n, args, kwargs)
            env[n] = safe_eval.call(n.target, args, kwargs, budget)
        except safe_eval.Refused as e:
            if refused is not None:
                refused[n] = str(e)
        except Exception:  # noqa: BLE001 - a spelling that does not run here matches nothing
            continue
    return env


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 and t.dtype != torch.uint8 else t


def same(a: object, b: object) -> bool:
    """Bit-exact in the graph's dtypes: same dtype, shape and values (1-byte float codes as
    bytes; NaN where NaN; +0 and -0 equal, as IEEE and ``torch.equal``)."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return False
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = bits(a), bits(b)
    if torch.equal(a, b):
        return True
    if not a.is_floating_point():
        return False
    nan = torch.isnan(a)
    if not bool(nan.any()) or not torch.equal(nan, torch.isnan(b)):
        return False
    return bool(torch.equal(a.masked_fill(nan, 0), b.masked_fill(nan, 0)))


def same_flat(a: object, b: object) -> bool:
    """:func:`same` up to a reshape (same dtype and element count, equal in row-major order)."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return False
    if a.dtype != b.dtype or a.numel() != b.numel():
        return False
    return same(a.reshape(-1), b.reshape(-1))
