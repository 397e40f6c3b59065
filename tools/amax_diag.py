"""Which scale does Inductor's compile of vLLM's native dynamic FP8 quant compute? (issue 22)

Run from the repository root on a GPU: `python -m tools.amax_diag`. For each dtype,
quant and shape it prints the share of the compiled chain's scales equal to each candidate:
the amax of the unrounded (fp32) or the rounded norm value, divided by 448 or multiplied by
its fp32 reciprocal. 1x H100 (torch 2.11): no candidate equal (the unrounded sum of squares
differs in its last bits; the codes from the unrounded amax are 0.011% off the compile's:
tests/gpu/parity_check.py's "hypothesis" lines); on the CPU (no GPU here: it runs there),
the rounded amax / 448 in 100% of rows."""
import os
import sys

import torch
sys.path.insert(0, os.getcwd())
from fusion_passes import epilogue

M = 448.0
DEV = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = ((64, 4096), (7, 7168), (2048, 8192)) if DEV == "cuda" else ((64, 4096), (7, 7168))
def chain_tok(x, res, w):
    h = x + res
    y = epilogue.rms_norm(h, w, 1e-6, gemma=False, weight_in_fp32=True)
    return (h, *epilogue.fp8_per_token(y))
def chain_grp(x, res, w):
    h = x + res
    y = epilogue.rms_norm(h, w, 1e-6, gemma=False, weight_in_fp32=True)
    return (h, *epilogue.fp8_per_group(y, 128))

for dtype in (torch.bfloat16, torch.float16):
    for name, fn, g in (("per_token", chain_tok, None), ("per_group", chain_grp, 128)):
        for tokens, hidden in SHAPES:
            gen = torch.Generator(device=DEV).manual_seed(tokens)
            x = torch.randn(tokens, hidden, device=DEV, generator=gen).to(dtype)
            res = torch.randn(tokens, hidden, device=DEV, generator=gen).to(dtype)
            w = (torch.rand(hidden, device=DEV, generator=gen) + 0.5).to(dtype)
            torch._dynamo.reset()
            h, q, s = torch.compile(fn, dynamic=False, fullgraph=True)(x, res, w)
            y32 = epilogue.norm_unrounded(x, res, w, 1e-6, weight_in_fp32=True)
            yr = y32.to(dtype).float()
            def amax(v):
                return (v.abs().amax(-1, keepdim=True) if g is None else v.reshape(tokens, -1, g).abs().amax(-1)).reshape(s.shape)
            smin = 1.0 / (M * 512)
            cands = {}
            for an, a in (("unrounded", amax(y32)), ("rounded", amax(yr))):
                cands[f"{an} a/M"] = (a / M).clamp(min=smin)
                cands[f"{an} a*(1/M)"] = (a * torch.tensor(1.0 / M, dtype=torch.float32)).clamp(min=smin)
                cands[f"{an} a/M cpu"] = (a.cpu() / M).clamp(min=smin).to(DEV)
            best = {k: (v == s).float().mean().item() for k, v in cands.items()}
            print(f"{str(dtype)[6:]} {name} {tokens}x{hidden}: " + ", ".join(f"{k} {v:.1%}" for k, v in best.items()), flush=True)
