"""What Inductor's compile stores in tests/gpu/parity_check.py's 8-site streams, and how far
the fused chain is from it (issue 22).

Run from the repository root on a GPU (one-rank NCCL group): ``python -m tools.dump_stream_code``
(``OUT=folder`` for the files, /tmp by default). For 4 streams (bf16 with and without an
embedding gather, hidden 4096 and 1024; FP8 per token with the gather) it writes Inductor's
generated code unfused and fused (``*_unfused.py``, ``*_fused.py``), the nodes the pass's
analysis (fusion_passes.inductor_store) calls stored (``*_stores.txt``) and both outputs
(``*_outs.pt``), and prints per site the elements that differ: fused against unfused, and
the unfused compile against itself recompiled with coordinate descent or without persistent
reductions. 1x H100, torch 2.11: results/README.md, "The stored-value rules on the GPU".
"""
import os
import sys

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)

from fusion_passes import FusionPass, epilogue, inductor_store  # noqa: E402
from fusion_passes._compat import run_and_get_code  # noqa: E402
from graphs import stream_args, stream_chain  # noqa: E402

out_dir = os.environ.get("OUT", "/tmp")
_analyse = inductor_store.analyse
decisions = []


def _logged(graph):
    st = _analyse(graph)
    decisions.append([(n.name, str(n.target), st.stored(n)) for n in graph.nodes if n.op == "call_function"])
    return st


inductor_store.analyse = _logged
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29561", NCCL_NVLS_ENABLE="0")
torch.cuda.set_device(0)
dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
import torch._inductor.config as ic  # noqa: E402

for quant, gather, tokens, hidden in [(False, False, 16, 4096), (False, False, 16, 1024), (False, True, 16, 4096),
                                      (True, True, 64, 4096)]:
    name = f"{'fp8' if quant else 'bf16'}_{'gather' if gather else 'input'}_{tokens}x{hidden}"
    args = stream_args(8, int(quant), gather, tokens, hidden, "cuda")
    fn = stream_chain(8, epilogue.fp8_per_token, int(quant), gather)
    outs = []
    for fuse in (False, True):
        p = FusionPass(backend="triton") if fuse else None
        torch._dynamo.reset()
        with ic.patch(fx_graph_cache=False, post_grad_custom_post_pass=p):
            res, codes = run_and_get_code(torch.compile(fn, fullgraph=True, dynamic=False), *args)
        outs.append(res)
        with open(f"{out_dir}/{name}_{'fused' if fuse else 'unfused'}.py", "w") as f:
            f.write("\n\n# ======\n\n".join(codes))
    torch.save({"unfused": outs[0], "fused": outs[1]}, f"{out_dir}/{name}_outs.pt")
    for label, patch in (("coordinate descent", dict(coordinate_descent_tuning=True)),
                         ("no persistent reductions", {"triton.persistent_reductions": False})):
        torch._dynamo.reset()
        with ic.patch(fx_graph_cache=False, **patch):
            other = torch.compile(fn, fullgraph=True, dynamic=False)(*args)
        counts = [int((a[0].float() != b[0].float()).sum()) for a, b in zip(outs[0], other)]
        print(name, "unfused default vs unfused", label, "differing elements per site:", counts)
    counts = [int((a[0].float() != b[0].float()).sum()) for a, b in zip(*outs)]
    print(name, "unfused vs fused differing elements per site:", counts)
    shares = [float((a[0] != b[0]).float().mean()) if a[0].dtype == torch.bfloat16 else
              float((a[0].float() != b[0].float()).float().mean()) for a, b in zip(*outs)]
    with open(f"{out_dir}/{name}_stores.txt", "w") as f:
        for d in decisions[-1:]:
            f.write("\n".join(map(str, d)))
    print(name, " ".join(f"{x:.2%}" for x in shares), "stream", torch.equal(outs[0][-1][1], outs[1][-1][1]))
dist.destroy_process_group()
