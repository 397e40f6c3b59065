"""The pass's cache key (``FusionPass.uuid()``, in Inductor's FX-graph cache key) covers
what can change a graph and nothing else: an edit of the command line keeps every user's
cache; an edit of the engine, a backend or the catalogue invalidates it. Edits are made on
a copy of the source tree, never on the real files."""

from __future__ import annotations

import pathlib
import shutil

from fusion_passes import fusion_pass
from fusion_passes.fusion_pass import FusionPass


def test_uuid_covers_the_engine_and_the_catalogue_not_the_command_line(tmp_path, monkeypatch):
    real = FusionPass().uuid()
    copy = tmp_path / "fusion_passes"
    shutil.copytree(pathlib.Path(fusion_pass.__file__).resolve().parent, copy, symlinks=False,
                    ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(fusion_pass, "_ROOT", copy)
    p = FusionPass()

    def key() -> str:
        fusion_pass.source_hash.cache_clear()
        return p.uuid()

    def edited(rel: str) -> str:
        path = copy / rel
        before = path.read_text() if path.exists() else None
        path.write_text((before or "") + "\n# an edit\n")
        try:
            return key()
        finally:
            path.unlink() if before is None else path.write_text(before)

    base = key()
    assert base == real  # the copy hashes as the real tree
    for rel in ("cli/html_diff.py", "cli/__init__.py", "cli/__main__.py", "cli/graphio/__init__.py", "cli/a_new_command.py"):
        assert edited(rel) == base, rel
    for rel in ("match.py", "epilogue.py", "backends/thresholds.py", "patterns/allreduce_rmsnorm.py",
                "a_new_engine_module.py", "backends/tables/nvidia_h100_80gb_hbm3_ws1.json"):
        assert edited(rel) != base, rel
    assert key() == base
    fusion_pass.source_hash.cache_clear()
