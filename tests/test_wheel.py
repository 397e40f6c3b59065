"""Only the product ships, and it runs installed (a packaging test: ``-m packaging``).

The wheel is built from a clean copy of the checkout (the files git tracks or would track:
no ``.venv``, no caches, no outputs) with ``pip wheel . --no-deps``, offline: no build
isolation, the environment's setuptools builds it. It must hold ``fusion_passes`` and
nothing else: the library, the catalogue and the command line, and none of the developer
tools, tests or the vLLM end-to-end harness.

It is then installed into a temporary folder (``pip install --no-deps --target``) and the
installed command line runs from a folder outside the checkout, under ``python -S`` with
that folder and this environment's site-packages as plain path entries: the ``.pth`` files
there (an editable install of some checkout) are not run, so the wheel's ``fusion_passes``
is the only one that can be imported (checked). ``demo`` is not run here (two gloo
processes compiling the model twice each: minutes); tests/test_demo_gloo.py runs it from
the checkout, and the installed ``demo`` was run by hand (see the commit that added this).
About 25 s on 2 CPU cores.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import site
import subprocess
import sys
import zipfile

import pytest

pytestmark = pytest.mark.packaging

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOT_SHIPPED = ("tools/", "tests/", "patterns/README", "/ab_", "testing/", "vllm_e2e")
"""Parts of a wheel path that name what is not product (the wheel's paths are checked for each)."""


def _tracked_files() -> list[str]:
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("needs a git checkout and git: the wheel is built from the files git tracks")
    done = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                          capture_output=True, text=True, check=True, timeout=60)
    return [f for f in done.stdout.split("\0") if f and (ROOT / f).is_file()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    pytest.importorskip("setuptools", minversion="64", reason="the wheel is built offline with this setuptools")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for f in _tracked_files():
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp / "dist")], cwd=src, check=True, capture_output=True, timeout=300)
    (built,) = (tmp / "dist").glob("fusion_passes-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel) -> pathlib.Path:
    target = wheel.parent.parent / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    return target


def test_the_wheel_holds_the_library_the_catalogue_and_the_command_line_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/RECORD"))
    assert {n.split("/")[0] for n in names} == {"fusion_passes", info}
    shipped = [n for n in names if not n.startswith(info)]
    assert not [n for n in shipped if any(part in n for part in NOT_SHIPPED)]
    for must in ("fusion_passes/__init__.py", "fusion_passes/backends/__init__.py", "fusion_passes/patterns/__init__.py",
                 "fusion_passes/cli/__init__.py", "fusion_passes/cli/__main__.py", "fusion_passes/cli/graphio/__init__.py",
                 "fusion_passes/cli/vllm_cpu.py"):
        assert must in shipped, must
    # every source of the package ships (a subfolder that packages.find missed would not)
    sources = {f for f in _tracked_files() if f.startswith("fusion_passes/") and f.endswith(".py")}
    assert sources == {n for n in shipped if n.endswith(".py")}
    # and every shipped per-GPU table (package data, read by fusion_passes.backends.measured)
    tables = {f for f in _tracked_files() if f.startswith("fusion_passes/backends/tables/")}
    assert tables and tables == {n for n in shipped if n.startswith("fusion_passes/backends/tables/")}
    entry_points = zipfile.ZipFile(wheel).read(f"{info}/entry_points.txt").decode()
    assert "fusion-passes = fusion_passes.cli:main" in entry_points


def _run(installed: pathlib.Path, cwd: pathlib.Path, *args: str) -> subprocess.CompletedProcess:
    """``python -S ARGS`` in *cwd* with the installed wheel first on the path, then site-packages."""
    path = [str(installed), *site.getsitepackages()]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    return subprocess.run([sys.executable, "-S", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_installed_command_line_runs_outside_the_checkout(installed, tmp_path):
    from fusion_passes.patterns import CATALOGUE

    where = _run(installed, tmp_path, "-c", "import fusion_passes, importlib.util as u; print(fusion_passes.__file__); "
                 "print([n for n in ('fusion_passes.tools', 'tools', 'patterns') if u.find_spec(n)])")
    assert where.returncode == 0, where.stderr
    file, importable = where.stdout.splitlines()
    assert pathlib.Path(file).is_relative_to(installed) and importable == "[]", where.stdout

    patterns = _run(installed, tmp_path, "-m", "fusion_passes.cli", "patterns")
    assert patterns.returncode == 0, patterns.stderr
    assert [ln for ln in patterns.stdout.splitlines() if not ln.startswith(" ")] == [f.name for f in CATALOGUE]

    shutil.copy(ROOT / "tests" / "golden" / "two_sites.before.json", tmp_path / "dump.json")
    explain = _run(installed, tmp_path, "-m", "fusion_passes.cli", "explain", "dump.json")
    assert explain.returncode == 0, explain.stderr
    assert explain.stdout.splitlines()[-1] == "2/2 all-reduces fused", explain.stdout
