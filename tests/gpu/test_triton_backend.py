"""GPU tests of the triton backend: every case of ``triton_check.py`` at world size 1 and 2.

Each runs the check script in fresh processes (NCCL and symmetric memory want one
process per GPU), with NVLink multicast off.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

CHECK = Path(__file__).with_name("triton_check.py")
ROOT = Path(__file__).resolve().parents[2]


def _env():
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _run(cmd):
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    assert " 0 failed" in proc.stdout, proc.stdout[-6000:]


@pytest.mark.skipif(not torch.cuda.is_available() or torch.version.hip is not None, reason="needs an NVIDIA CUDA GPU")
def test_triton_backend_world_size_1():
    _run([sys.executable, str(CHECK)])


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.version.hip is not None or torch.cuda.device_count() < 2,
    reason="needs 2 NVIDIA CUDA GPUs of one host",
)
def test_triton_backend_world_size_2():
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(CHECK)])
