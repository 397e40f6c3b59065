"""A small hand-written tensor-parallel Llama-like decoder for the compile-parity tests.

Each layer: RMSNorm -> attention (causal, no KV cache) -> ``o_proj`` -> all-reduce ->
residual add -> RMSNorm -> SiLU-gated MLP -> ``down_proj`` -> all-reduce -> residual add;
then a final RMSNorm and the logits. The norms are Hugging Face Llama's
(``weight * normed.to(dtype)``), the all-reduces ``_c10d_functional`` + ``wait_tensor`` on
the default group (the plain dialect, as DTensor / HF tp_plan emit it). Weights are random
and seeded; :func:`to` casts a copy to another dtype (fp32 / fp64 for the references).
"""

from __future__ import annotations

import math

import torch

from graphs import all_reduce, hf_rms_norm


def make(layers: int, hidden: int, vocab: int = 256, heads: int = 4, seed: int = 0) -> dict:
    """The fp32 weights: a dict of tensors."""
    g = torch.Generator().manual_seed(seed)

    def lin(o, i):
        return torch.randn(o, i, generator=g) / math.sqrt(i)

    w = {"heads": heads, "layers": layers, "final": torch.rand(hidden, generator=g) + 0.5,
         "head": lin(vocab, hidden), "embed": torch.randn(vocab, hidden, generator=g)}
    for i in range(layers):
        w[i] = {"ln1": torch.rand(hidden, generator=g) + 0.5, "ln2": torch.rand(hidden, generator=g) + 0.5,
                "qkv": lin(3 * hidden, hidden), "o": lin(hidden, hidden),
                "up": lin(4 * hidden, hidden), "gate": lin(4 * hidden, hidden), "down": lin(hidden, 4 * hidden)}
    return w


def to(w: dict, dtype: torch.dtype, norm_dtype: torch.dtype | None = None) -> dict:
    """A copy of *w* in *dtype* (norm weights in *norm_dtype*, default the same)."""
    nd = norm_dtype or dtype
    out = {k: v for k, v in w.items() if not isinstance(v, (dict, torch.Tensor))}
    out["final"], out["head"], out["embed"] = w["final"].to(nd), w["head"].to(dtype), w["embed"].to(dtype)
    for i in range(w["layers"]):
        out[i] = {k: v.to(nd if k.startswith("ln") else dtype) for k, v in w[i].items()}
    return out


def _attention(x, lw, heads):
    t, h = x.shape
    q, k, v = (x @ lw["qkv"].t()).split(h, dim=-1)
    q, k, v = (a.reshape(t, heads, h // heads).transpose(0, 1) for a in (q, k, v))
    att = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    return att.transpose(0, 1).reshape(t, h) @ lw["o"].t()


def forward(w: dict, ids: torch.Tensor, reduce=all_reduce) -> torch.Tensor:
    """Logits ``[T, vocab]`` of the token ids *ids* ``[T]``."""
    h = w["embed"][ids]
    for i in range(w["layers"]):
        lw = w[i]
        h = reduce(_attention(hf_rms_norm(h, lw["ln1"], 1e-6), lw, w["heads"])) + h
        x = hf_rms_norm(h, lw["ln2"], 1e-6)
        h = reduce((torch.nn.functional.silu(x @ lw["gate"].t()) * (x @ lw["up"].t())) @ lw["down"].t()) + h
    return hf_rms_norm(h, w["final"], 1e-6) @ w["head"].t()


def distance(out: torch.Tensor, ref: torch.Tensor) -> float:
    """RMS of ``out - ref`` over RMS of ``ref`` (computed in fp64)."""
    d = out.double() - ref.double()
    return float(d.pow(2).mean().sqrt() / ref.double().pow(2).mean().sqrt())
