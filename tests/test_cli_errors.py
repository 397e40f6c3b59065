"""Every command-line failure is ONE line on stderr with exit 2, found before any work, and
leaves no partial output: bad options and numbers (argparse, with the valid range or the
known values), unwritable output paths, unsupported vLLM model combinations."""

from __future__ import annotations

import pathlib

import pytest

from fusion_passes import cli

MODELS = pathlib.Path(__file__).parent / "test_cli_models.py"


def _one_line_error(rc: int, out: str, err: str, command: str) -> str:
    assert rc == 2, (rc, out, err)
    assert out == "", out
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith(f"fusion-passes {command}: error: ") or err.startswith("fusion-passes: error: "), err
    return err


def _known_backends() -> str:
    from fusion_passes import backends

    return ", ".join(["auto", *backends.ORDER])


RANGE = "must be an integer >= 1, got"
LAYERS = "must be an integer from 1 to 128, got"  # Llama 3.1 405B: 126 layers (fusion_passes/cli/arguments.py)
TP = "must be an integer from 1 to 72, got"  # one NVLink domain, GB200 NVL72
QUANTS = "invalid choice: 'bogus' (choose from 'none', 'fp8_static', 'fp8_dynamic', 'fp8_block')"
TP_CHOICES = "(choose from 2, 4, 8)"
BAD_OPTIONS = [
    (["dump", "m.py:make", "--quant", "bogus"], QUANTS),
    (["dump", "m.py:make", "--layers", "0"], f"argument --layers: {LAYERS} 0"),
    (["dump", "m.py:make", "--layers", "-1"], f"argument --layers: {LAYERS} -1"),
    (["dump", "capture:llama", "--layers", "1000000"], f"argument --layers: {LAYERS} 1000000"),
    (["dump", "m.py:make", "--tp", "0"], f"argument --tp: {TP} 0"),
    (["dump", "m.py:make", "--tp", "-1"], f"argument --tp: {TP} -1"),
    (["dump", "m.py:make", "--tp", "two"], f"argument --tp: {TP} 'two'"),
    (["dump", "m.py:make", "--tp", "100000000000"], f"argument --tp: {TP} 100000000000"),
    (["explain", "capture:llama", "--tp", "73"], f"argument --tp: {TP} 73"),
    (["dump", "m.py:make", "--backend", "nonexistent"], "argument --backend: unknown backend 'nonexistent'; known: "),
    (["dump", "m.py:make", "--backend", ""], "argument --backend: unknown backend ''; known: "),
    (["dump", "m.py:make", "-o", ""], "argument -o/--out: expected a path, got an empty string"),
    (["explain", "x.json", "--backend", "nonexistent"], "argument --backend: unknown backend 'nonexistent'"),
    (["capture", "--quant", "bogus"], QUANTS),
    (["capture", "--layers", "0"], f"argument --layers: {LAYERS} 0"),
    (["capture", "--layers", "-1"], f"argument --layers: {LAYERS} -1"),
    (["capture", "--layers", "1000000"], f"argument --layers: {LAYERS} 1000000"),
    (["capture", "--tp", "0"], f"argument --tp: invalid choice: 0 {TP_CHOICES}"),
    (["capture", "--tp", "-1"], f"argument --tp: invalid choice: -1 {TP_CHOICES}"),
    (["capture", "--out", ""], "argument --out: expected a path, got an empty string"),
    (["demo", "--tokens", "0"], "argument --tokens: must be an integer from 1 to 64, got 0"),
    (["demo", "--tokens", "-5"], "argument --tokens: must be an integer from 1 to 64, got -5"),
    (["demo", "--tokens", "65"], "argument --tokens: must be an integer from 1 to 64, got 65"),
    (["demo", "--tp", "0"], "argument --tp: invalid choice: 0 (choose from 2)"),
    (["demo", "--tp", "-1"], "argument --tp: invalid choice: -1 (choose from 2)"),
    (["demo", "--tp", "4"], "argument --tp: invalid choice: 4 (choose from 2)"),
    (["diff", "a.json", "b.json", "--html", ""], "argument --html: expected a path, got an empty string"),
    (["bogus"], "unknown command 'bogus'; one of: demo, patterns, bench, dump, diff, capture, explain"),
    ([], "no command; one of: demo,"),
]


@pytest.mark.parametrize("argv,message", BAD_OPTIONS, ids=[" ".join(a) or "(none)" for a, _ in BAD_OPTIONS])
def test_bad_option_is_one_line_with_the_valid_values(capsys, argv, message):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    err = _one_line_error(rc, out, err, argv[0] if argv else "")
    assert message in err, err
    if "unknown backend" in message:
        assert err.rstrip().endswith(f"known: {_known_backends()} (see fusion-passes {argv[0]} --help)"), err


BAD_BENCH = [  # (argv, WORLD_SIZE or None, the message after "fusion-passes bench WHAT: error: ")
    (["model", "--dry-run", "--layers", "1000000"], None, f"argument --layers: {LAYERS} 1000000"),
    (["model", "--dry-run", "--decode", str(10**12)],
     None, f"argument --decode: must be an integer from 1 to 1024, got {10**12}"),  # vLLM's max_num_seqs
    (["model", "--dry-run", "--prefill", "40961"],
     None, "argument --prefill: must be an integer from 1 to 40960, got 40961"),  # Qwen3-30B-A3B's context
    (["model", "--dry-run", "--world-size", "100"], None, f"argument --world-size: {TP} 100"),
    (["kernels", "--plan", "--tokens", str(10**12)],
     None, f"argument --tokens: must be an integer from 1 to 131072, got {10**12}"),  # Llama 3.1's context
    (["compile", "--layers", "8", "1000000"], None, f"argument --layers: {LAYERS} 1000000"),
    (["kernels", "--plan", "--replays", str(10**9)],
     None, f"argument --replays: must be an integer from 1 to 1000, got {10**9}"),
    (["model", "--dry-run", "--replays", "1001"], None, "argument --replays: must be an integer from 1 to 1000, got 1001"),
    (["model", "--plan", "--rounds", "101"], None, "argument --rounds: must be an integer from 1 to 100, got 101"),
    (["kernels", "--plan"], "abc", f"environment variable WORLD_SIZE {TP} 'abc'"),
    (["kernels", "--plan"], "-3", f"environment variable WORLD_SIZE {TP} -3"),
    (["model", "--plan"], "0", f"environment variable WORLD_SIZE {TP} 0"),
]


@pytest.mark.parametrize("argv,world,message", BAD_BENCH, ids=[" ".join(a) + f" {w}" for a, w, _ in BAD_BENCH])
def test_bench_ranges_are_refused_before_work(capsys, monkeypatch, argv, world, message):
    from fusion_passes.cli import model_trace

    monkeypatch.setattr(model_trace, "dry_run", _no_trace)
    if world is not None:
        monkeypatch.setenv("WORLD_SIZE", world)
    rc = cli.main(["bench", *argv])
    out, err = capsys.readouterr()
    assert (rc, out) == (2, ""), (rc, out, err)
    # an option: bench WHAT's parser says it; the environment: the command's one line
    what = "fusion-passes bench" if world is not None else f"fusion-passes bench {argv[0]}"
    assert err.startswith(f"{what}: error: {message}") and err.count("\n") == 1, err


# ------------------------------------------------------------------ outputs, checked first


@pytest.fixture
def spec(tmp_path, monkeypatch):
    """A spec whose call leaves a marker: if the marker exists, the work had started."""
    monkeypatch.chdir(tmp_path)
    pathlib.Path("model.py").write_text(
        "import pathlib\n"
        f"from test_cli_models import tiny_block\n"
        "def make():\n"
        "    pathlib.Path('CALLED').touch()\n"
        "    return tiny_block()\n"
        "def broken():\n"
        "    pathlib.Path('CALLED').touch()\n"
        "    class Broken(__import__('torch').nn.Module):\n"
        "        def forward(self, x):\n"
        "            raise ValueError('the model itself fails')\n"
        "    return Broken(), (__import__('torch').ones(2),)\n"
        "def child_failed():\n"
        "    raise RuntimeError('-- Process 1 terminated with the following error:\\nTraceback (most recent call '\n"
        "                       'last):\\n  File x.py, line 1\\nValueError: the real cause')\n")
    return "model.py"


def _left(folder: pathlib.Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("out,message", [
    ("afile", "cannot write into afile: it exists and is not a folder"),
    ("missing/sub", "cannot write missing/sub: no folder missing (create it first)"),
    ("/proc/dump", "cannot write into /proc/dump:"),
])
def test_dump_checks_its_output_folder_before_compiling(fake_pg, spec, capsys, out, message):
    pathlib.Path("afile").write_text("mine")
    rc = cli.main(["dump", f"{spec}:make", "-o", out])
    err = _one_line_error(rc, *capsys.readouterr(), "dump")
    assert message in err, err
    assert not pathlib.Path("CALLED").exists()  # the model was never built, let alone compiled
    assert pathlib.Path("afile").read_text() == "mine" and _left(pathlib.Path(".")) == ["afile", "model.py"]


def test_a_failed_dump_leaves_nothing(fake_pg, spec, capsys):
    pathlib.Path("kept").mkdir()
    pathlib.Path("kept/graph_0.before.json").write_text("old")
    for out in ("new", "kept"):
        rc = cli.main(["dump", f"{spec}:broken", "-o", out])
        _, err = capsys.readouterr()
        assert rc == 1 and err.count("\n") == 1 and err.startswith("fusion-passes dump: failed: "), err
        assert "the model itself fails" in err
    assert _left(pathlib.Path(".")) == ["CALLED", "kept", "model.py"]  # no "new", no staging folder
    assert _left(pathlib.Path("kept")) == ["graph_0.before.json"]
    assert pathlib.Path("kept/graph_0.before.json").read_text() == "old"


def test_a_failure_in_the_work_is_one_line_naming_the_cause(fake_pg, spec, capsys):
    rc = cli.main(["dump", f"{spec}:child_failed", "-o", "out"])
    out, err = capsys.readouterr()
    assert (rc, out) == (1, "")
    assert err == ("fusion-passes dump: failed: RuntimeError: ValueError: the real cause (-v shows the traceback and "
                   "other libraries' output)\n")
    assert _left(pathlib.Path(".")) == ["model.py"]


@pytest.mark.parametrize("page,message", [
    ("/proc/x.html", "cannot write /proc/x.html:"),
    ("missing/x.html", "cannot write missing/x.html: no folder missing (create it first)"),
    (".", "cannot write .: it is a folder"),
])
def test_diff_checks_its_page_before_reading_the_dumps(tmp_path, monkeypatch, capsys, page, message):
    monkeypatch.chdir(tmp_path)
    rc = cli.main(["diff", "--html", page, "no_such_a.json", "no_such_b.json"])
    err = _one_line_error(rc, *capsys.readouterr(), "diff")
    assert message in err and "no_such" not in err, err


def test_a_failed_diff_leaves_no_page(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    pathlib.Path("b.json").write_text('{"hello": 1}')
    rc = cli.main(["diff", "--html", "page.html", "b.json", "b.json"])
    err = _one_line_error(rc, *capsys.readouterr(), "diff")
    assert "b.json is not a fusion-passes graph dump" in err
    assert _left(tmp_path) == ["b.json"]


def _no_trace(*args, **kwargs):
    raise AssertionError("traced: the check did not come first")


@pytest.mark.parametrize("argv,message", [
    (["capture", "--out", "afile"], "cannot write into afile: it exists and is not a folder"),
    (["capture", "--model", "deepseek_v3", "--tp", "4", "--quant", "fp8_block"],
     "deepseek_v3: fp8_block traces at tp <= 2 only"),
    (["dump", "capture:deepseek_v3", "--tp", "8", "--quant", "fp8_block"],
     "capture:deepseek_v3: fp8_block traces at tp <= 2 only"),
    (["dump", "capture:llama", "--tp", "3"], "capture:llama: tp 3 is not one of 2, 4, 8"),
    (["dump", "capture:gpt2"], "capture:gpt2: unknown model 'gpt2'; known: llama, deepseek_v3"),
    (["explain", "capture:gpt2"], "capture:gpt2: unknown model 'gpt2'"),
])
def test_capture_refuses_before_tracing(tmp_path, monkeypatch, capsys, argv, message):
    from fusion_passes.cli import capture

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(capture, "trace_vllm", _no_trace)
    pathlib.Path("afile").write_text("")
    rc = cli.main(argv)
    err = _one_line_error(rc, *capsys.readouterr(), argv[0])
    assert message in err, err
    assert _left(tmp_path) == ["afile"]


@pytest.mark.parametrize("argv,message", [
    (["--tokens", str(10**12)], f"argument --tokens: must be an integer from 1 to 131072, got {10**12}"),
    (["--replays", "5000"], "argument --replays: must be an integer from 1 to 1000, got 5000"),
])
def test_tune_ranges_are_refused_before_work(capsys, argv, message):
    rc = cli.main(["tune", *argv])
    out, err = capsys.readouterr()
    assert (rc, out) == (2, ""), (rc, out, err)
    assert err.startswith(f"fusion-passes tune: error: {message}") and err.count("\n") == 1, err
