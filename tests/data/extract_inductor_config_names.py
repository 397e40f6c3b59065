"""Regenerate torch_2_11_inductor_config.txt from a torch wheel's Inductor config.

``unzip torch-2.11.0-*.whl torch/_inductor/config.py; python tests/data/extract_inductor_config_names.py
torch/_inductor/config.py > tests/data/torch_2_11_inductor_config.txt``

Parses the file with ``ast`` (nothing is imported or run): every name assigned at module
level and in its config classes (``triton.persistent_reductions``), one per line.
"""

from __future__ import annotations

import ast
import sys

HEADER = """\
# The names torch 2.11.0's Inductor config defines (torch/_inductor/config.py of the
# torch-2.11.0 wheel on PyPI), one per line: torch 2.11 is the oldest torch pyproject.toml
# accepts and the one on the lent GPUs. tests/test_inductor_store.py runs the pass with a
# config that has only these names. Made by tests/data/extract_inductor_config_names.py.
"""


def names(source: str) -> list[str]:
    found: set[str] = set()

    def walk(body, prefix: str) -> None:
        for node in body:
            if isinstance(node, ast.Assign):
                found.update(prefix + t.id for t in node.targets if isinstance(t, ast.Name))
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                found.add(prefix + node.target.id)
            elif isinstance(node, ast.ClassDef):
                walk(node.body, f"{prefix}{node.name}.")
            elif isinstance(node, (ast.If, ast.Try)):
                walk(node.body, prefix)
                walk(node.orelse, prefix)

    walk(ast.parse(source).body, "")
    return sorted(found)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        sys.stdout.write(HEADER + "".join(n + "\n" for n in names(f.read())))
