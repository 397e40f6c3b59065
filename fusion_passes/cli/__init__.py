"""``fusion-passes``: one entry point, subcommands imported lazily (like ``vllm``, ``torchrun``).

The console script is :func:`main`; ``python -m fusion_passes.cli`` runs it too
(``__main__.py``). This package is the command line: nothing in the engine imports it,
and its sources are not in the pass's cache key (``fusion_passes.fusion_pass.NOT_IN_KEY``).

Each subcommand is a module of this package with ``add_arguments(parser)`` and
``run(args) -> int``; :data:`COMMANDS` maps its name to the module and a one-line help.
``fusion-passes --help`` imports neither a subcommand nor torch (the package defers its
own imports in this process, see ``fusion_passes/__init__.py``).

Failures: bad input (an option, a path, a file) is ONE line,
``fusion-passes CMD: error: ...``, exit 2, found before any work starts. A failure
during the work is one line ``fusion-passes CMD: failed: ...``, exit 1 (``-v`` shows
the traceback). While a command works, what other libraries write to stderr is hidden
unless ``-v`` (:func:`fusion_passes.cli.terminal.quiet`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import threading

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("demo", "run a real HF tensor-parallel model on 2 gloo CPU processes, fused vs unfused"),
    "patterns": ("patterns_cmd", "list the pattern catalogue: what each family matches and becomes"),
    "bench": ("bench", "benchmarks: `bench kernels` times the fused kernels against the unfused chain"),
    "dump": ("dump", "compile a model; write its graphs before/after our passes (text + JSON)"),
    "diff": ("diff", "structural diff of two graph dumps: which chains became which fused ops"),
    "capture": ("capture_cmd", "trace real vLLM models on CPU (fake ranks); write post-grad graphs before/after our passes"),
    "explain": ("explain", "for every all-reduce: fused (variant, ops hoisted over) or the op that blocked it"),
    "tune": ("tune", "time the fused paths against the best unfused chain on this machine; write the measured table"),
}
VERBOSE = ("-v", "--verbose")


class UsageError(Exception):
    """Bad input from the user (a file that is not a dump, an unknown spec): exit 2 with the message."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``PROG: error: MESSAGE (see PROG --help)``, exit 2."""

    def error(self, message: str):
        from fusion_passes.cli.terminal import printable

        self.exit(2, f"{self.prog}: error: {printable(message)} (see {self.prog} --help)\n")


def _top_parser() -> Parser:
    parser = Parser(prog="fusion-passes", description="Fuse tensor-parallel all-reduce + residual add + RMSNorm "
                                                      "(+ quant) in torch.compile graphs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show what other libraries print (logs, "
                        "progress bars) and tracebacks; also accepted after the command")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``fusion-passes ARGV``; the exit status (argparse's exits are returned, not raised)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = bool(argv) and argv[0] in VERBOSE
    argv = argv[1:] if verbose else argv
    try:
        module, name, args = _parse(argv)
    except SystemExit as e:  # --help (0) or a usage error, already printed on one line (2)
        return e.code if isinstance(e.code, int) else 2
    return _run(module, name, args, verbose or args.verbose)


def _parse(argv: list[str]):
    if not argv or argv[0] in ("-h", "--help"):
        parser = _top_parser()
        if not argv:
            parser.error(f"no command; one of: {', '.join(COMMANDS)}")
        parser.print_help()
        raise SystemExit(0)
    name = argv[0]
    if name not in COMMANDS:
        _top_parser().error(f"unknown command {name!r}; one of: {', '.join(COMMANDS)}")
    import fusion_passes

    fusion_passes._load()  # what `import fusion_passes` does outside this console script
    module = importlib.import_module(f"fusion_passes.cli.{COMMANDS[name][0]}")
    cmd = Parser(prog=f"fusion-passes {name}", description=COMMANDS[name][1])
    cmd.add_argument("-v", "--verbose", action="store_true", help="show other libraries' output and tracebacks")
    module.add_arguments(cmd)
    return module, name, cmd.parse_args(argv[1:])


class Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, a CI cancel, ``docker stop``) while a command works: raised in
    the main thread like Ctrl-C, so outputs are cleaned up the same way."""


def _on_sigterm(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM raises :class:`Terminated` while the command runs (main thread only: that is
    where Python delivers signals); the previous handler is restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)  # None: set outside Python


def _run(module, name: str, args, verbose: bool) -> int:
    from fusion_passes.cli.terminal import printable, quiet

    try:
        with _sigterm_as_interrupt(), quiet(not verbose):
            return int(module.run(args) or 0)
    except UsageError as e:
        print(f"fusion-passes {name}: error: {printable(str(e))}", file=sys.stderr)
        return 2
    except SystemExit as e:  # argparse inside a subcommand (`bench WHAT ...`): its error line got through;
        if isinstance(e.code, int) or e.code is None:  # sys.exit(MESSAGE) in a spec: the message is shown
            return e.code or 0
        lines = str(e.code).strip().splitlines() or [""]
        print(f"fusion-passes {name}: error: {printable(lines[0])}", file=sys.stderr)
        return 2
    except Terminated:
        print(f"fusion-passes {name}: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"fusion-passes {name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`... | head`): stop quietly, as Unix tools do
        with contextlib.suppress(OSError):  # no second error when Python flushes stdout at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except Exception as e:  # noqa: BLE001 - one line for the user; -v shows the traceback
        if verbose:
            raise
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        # a message that only introduces what follows ("... terminated with the following
        # error:") is not the error: its last line is (a child process's exception)
        first = (lines[-1] if lines[0].endswith(":") else lines[0]) if lines else ""
        print(f"fusion-passes {name}: failed: {type(e).__name__}: {printable(first)} (-v shows the traceback "
              "and other libraries' output)", file=sys.stderr)
        return 1


def use_colour(stream=sys.stdout) -> bool:
    """Colour only on a terminal and only when NO_COLOR is not set (see :mod:`.terminal`)."""
    from fusion_passes.cli.terminal import use_colour as terminal_use_colour

    return terminal_use_colour(stream)

