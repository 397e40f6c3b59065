"""Regenerate aiter_signatures.json from a checkout of ROCm/aiter at a pinned commit.

``python tests/data/extract_aiter_signatures.py /path/to/aiter-git-dir COMMIT > tests/data/aiter_signatures.json``

Reads the files with ``git show COMMIT:path`` (no work tree needed) and parses them with
``ast`` (AITER imports only on ROCm): the parameters of every function the aiter adapter
(fusion_passes/backends/aiter.py) calls, the quant_type strings AITER accepts, and where
the module-level names the adapter reads are defined. The ``returns`` entries are written
by hand from AITER's own fake (meta) functions and are cited by file and function.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys

FUNCTIONS = {
    "aiter/dist/communication_op.py": (
        "tensor_model_parallel_fused_allreduce_rmsnorm",
        "tensor_model_parallel_fused_allreduce_rmsnorm_quant",
        "tensor_model_parallel_fused_allreduce_rmsnorm_mxfp4_quant",
    ),
    "aiter/dist/parallel_state.py": ("get_tp_group",),
}
NAMES = {  # module-level names the adapter reads: file -> names that must be bound there
    "aiter/dist/communication_op.py": ("get_tp_group",),
    "aiter/utility/dtypes.py": ("fp8",),
}


# What each function returns, read from AITER's fake (meta) implementations, which the
# real ops must match under torch.compile. Shapes use `input` for the first argument.
RETURNS = {
    "tensor_model_parallel_fused_allreduce_rmsnorm": {
        "source": "aiter/dist/parallel_state.py fused_allreduce_rmsnorm_fake",
        "outputs": [["norm", "input.shape", "input.dtype"], ["residual_out", "input.shape", "input.dtype"]],
    },
    "tensor_model_parallel_fused_allreduce_rmsnorm_quant": {
        "source": "aiter/dist/parallel_state.py fused_allreduce_rmsnorm_quant[_emit_bf16]_fake (per_token), "
                  "fused_allreduce_rmsnorm_quant_per_group[_emit_bf16]_fake (per_group: M = input.shape[0], "
                  "2-D only; transpose_scale: stride (1, M))",
        "outputs": [["q", "input.shape", "fp8"], ["residual_out", "input.shape", "input.dtype"],
                    ["scale", "per_token: input.shape[:-1] + (1,); per_group: (input.shape[0], K // group_size)",
                     "float32"],
                    ["norm (emit_bf16 only)", "input.shape", "input.dtype"]],
    },
    "tensor_model_parallel_fused_allreduce_rmsnorm_mxfp4_quant": {
        "source": "aiter/dist/device_communicators/custom_all_reduce.py custom_fused_ar_rms_mxfp4_quant "
                  "(its capture-time dummies give the shapes)",
        "outputs": [["q", "input.shape[:-1] + (K // 2,)", "uint8"], ["residual_out", "input.shape", "input.dtype"],
                    ["scale", "input.shape[:-1] + (K // 32,)", "uint8"],
                    ["norm (emit_bf16 only)", "input.shape", "input.dtype"]],
    },
    "get_tp_group": {"source": "aiter/dist/parallel_state.py get_tp_group", "outputs": [["GroupCoordinator"]]},
}
ATTRIBUTES = {"aiter/dist/parallel_state.py": {"GroupCoordinator": ("world_size",)}}


def _params(fn: ast.FunctionDef) -> list[list]:
    """``[name, kind, default source or None]`` per parameter (the adapter binds by these)."""
    a = fn.args
    positional = a.posonlyargs + a.args
    defaults = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
    out = [[p.arg, "POSITIONAL_OR_KEYWORD", None if d is None else ast.unparse(d)] for p, d in zip(positional, defaults)]
    out += [[p.arg, "KEYWORD_ONLY", None if d is None else ast.unparse(d)] for p, d in zip(a.kwonlyargs, a.kw_defaults)]
    return out


def _self_attributes(tree: ast.Module, cls: str) -> set[str]:
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    return {t.attr for n in ast.walk(node) if isinstance(n, ast.Assign) for t in n.targets
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}


def _bound_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.ImportFrom):
            names.update(alias.asname or alias.name for alias in node.names)
    return names


def main(git_dir: str, commit: str) -> dict:
    def source(path):
        return subprocess.run(["git", "-C", git_dir, "show", f"{commit}:{path}"], check=True,
                              capture_output=True, text=True).stdout

    table = {"repository": "ROCm/aiter", "commit": commit, "functions": {}, "module_names": {}}
    for path, names in FUNCTIONS.items():
        tree = ast.parse(source(path))
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name in names:
                table["functions"][node.name] = {"file": path, "line": node.lineno, "params": _params(node),
                                                 "returns": RETURNS[node.name]}
    for path, names in NAMES.items():
        bound = _bound_names(ast.parse(source(path)))
        table["module_names"][path] = sorted(n for n in names if n in bound)
    table["attributes"] = {
        f"{path}:{cls}": sorted(set(attrs) & _self_attributes(ast.parse(source(path)), cls))
        for path, classes in ATTRIBUTES.items() for cls, attrs in classes.items()}
    comm = ast.parse(source("aiter/dist/communication_op.py"))
    aliases = next(n.value for n in comm.body if isinstance(n, ast.Assign)
                   and any(getattr(t, "id", "") == "_FUSED_AR_RMS_QUANT_ALIASES" for t in n.targets))
    table["quant_type_aliases"] = ast.literal_eval(aliases)
    return table


if __name__ == "__main__":
    json.dump(main(sys.argv[1], sys.argv[2]), sys.stdout, indent=1, sort_keys=True)
    print()
