"""The torch- and vLLM-private names of the process-group code, the backends and the ops go
through fusion_passes/_compat.py (issue 24 item 5): a move between releases is a one-file fix."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from fusion_passes import _compat, groups
from fusion_passes.backends import symm

ROOT = Path(__file__).resolve().parents[1] / "fusion_passes"
PRIVATE = re.compile(r"_resolve_process_group|distributed\._symmetric_memory|_SymmetricMemory\.|parallel_state\._groups"
                     r"|torch\._ops\.")


TORCH_PRIVATE = re.compile(r"torch\._[a-z]")


@pytest.mark.parametrize("path", [ROOT / "groups.py", ROOT / "ops.py", *sorted((ROOT / "backends").glob("*.py"))],
                         ids=lambda p: p.name)
def test_no_private_name_outside_compat(path):
    # code lines only: a docstring may name the private (in ``...``) that _compat wraps
    hits = [line.strip() for line in path.read_text().splitlines() if PRIVATE.search(line) and "``" not in line]
    assert hits == [], f"{path.name} uses a private name directly: {hits}"


def test_the_compat_functions_resolve(fake_pg):
    assert _compat.resolve_process_group(fake_pg.group_name) is fake_pg
    assert groups.world_size("c10d:" + fake_pg.group_name) == 2
    assert hasattr(_compat.symmetric_memory(), "rendezvous")
    assert _compat.symmetric_memory_signal_pad_bytes() > 0
    assert isinstance(torch.ops.aten.add.Tensor, _compat.OpOverload)


def test_an_unknown_vllm_group_is_a_clear_error():
    pytest.importorskip("vllm", reason="needs vLLM (the vLLM dialect's process groups)")
    assert _compat.vllm_group("no_such_group:0") is None
    with pytest.raises(ValueError, match="vLLM group 'no_such_group:0' does not exist"):
        symm.c10d_group_name("vllm:no_such_group:0")


def test_no_module_reaches_a_torch_private_module_outside_compat():
    """Every ``torch._x`` in code (not in comments or ``...`` in docstrings), package-wide,
    command line included, is in _compat.py."""
    hits = []
    for path in sorted(ROOT.rglob("*.py")):
        if path.name == "_compat.py":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if TORCH_PRIVATE.search(code) and "``" not in code and not code.strip().startswith(('"', "'")):
                hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert hits == [], hits
