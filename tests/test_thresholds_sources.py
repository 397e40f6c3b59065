"""The FlashInfer entries of fusion_passes/backends/thresholds.py against the sources
they cite, read (never imported or run) from the installed packages: the pinned
flashinfer-python wheel's kernel header and vLLM's crossover table."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import pathlib
import re

import pytest

from fusion_passes.backends.thresholds import FLASHINFER

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _package_dir(name: str) -> pathlib.Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"needs {name} installed (its sources are read, not run)")
    return pathlib.Path(next(iter(spec.submodule_search_locations)))


def test_flashinfer_facts_hold_in_the_pinned_wheel():
    pin = re.search(r'"flashinfer-python==([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    header = _package_dir("flashinfer") / "data/include/flashinfer/comm/trtllm_allreduce_fusion.cuh"
    assert importlib.metadata.version("flashinfer-python") == pin, "the installed wheel is not the pin"
    text = header.read_text()
    ranks = re.search(r"Supported ranks: ([\d, ]+)\.", text).group(1)
    assert tuple(int(r) for r in ranks.split(",")) == FLASHINFER["world_sizes"]
    assert f"static constexpr int kBytesPerAccess = {FLASHINFER['bytes_per_access']};" in text
    assert 'FLASHINFER_CHECK(params.hidden_dim % VEC_SIZE == 0' in text
    cvt = text[text.index("__device__ uint32_t cvt_warp_fp16_to_fp4("):]
    assert cvt[:400].count(f"#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= {FLASHINFER['fp4_min_sm'] * 10})") == 1


def test_flashinfer_crossovers_are_vllms():
    """vLLM's FI_ALLREDUCE_FUSION_MAX_SIZE_MB, less its world-size-16 (multi-node) entries."""
    path = _package_dir("vllm") / "compilation/passes/fusion/allreduce_rms_fusion.py"
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and "FI_ALLREDUCE_FUSION_MAX_SIZE_MB" in ast.dump(node)[:200]:
            table = ast.literal_eval(node.value)
            break
    else:
        pytest.fail(f"no FI_ALLREDUCE_FUSION_MAX_SIZE_MB in {path}")
    assert FLASHINFER["max_input_mib"] == {sm: {w: mb for w, mb in row.items() if w != 16} for sm, row in table.items()}
