"""What reaches the user's terminal: escaped text, progress, and third-party noise.

* :func:`printable` escapes control and format characters, so text read from a dump (a
  source line, a target name) can neither move the cursor, set the window title, nor
  fake a line of output.
* :func:`quiet` hides what other libraries write to stderr while a command works (vLLM's
  and torch's log lines, progress bars, C++ messages such as "can't allocate memory");
  ``-v`` shows it.
* :func:`step` shows a transient progress line for a long step, on a terminal only;
  :func:`note` prints one line of ours to stderr, even while :func:`quiet` hides it.
* :func:`use_colour`: colour only on a terminal and never with ``NO_COLOR`` set.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
import time
from typing import Any, Iterator

_real_stderr = None  # the user's stderr while quiet() hides fd 2 (progress goes there)


def printable(text: str) -> str:
    """*text* with every non-printable character escaped as Python would write it
    (``\\x1b``, ``\\x0a``, ``\\u202e``): ANSI escapes, newlines, bidi overrides."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def printable_lines(text: str) -> str:
    """:func:`printable` on each line of *text* (its newlines kept)."""
    return "\n".join(printable(line) for line in text.split("\n"))


def _escape(c: str) -> str:
    code = ord(c)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def printable_data(value: Any) -> Any:
    """*value* (JSON-like data) with :func:`printable` applied to every string in it."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, list):
        return [printable_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(printable_data(v) for v in value)
    if isinstance(value, dict):
        return {printable_data(k): printable_data(v) for k, v in value.items()}
    return value


def use_colour(stream=sys.stdout) -> bool:
    """Colour only on a terminal and only when NO_COLOR is not set (no-color.org)."""
    return stream.isatty() and not os.environ.get("NO_COLOR")


class _OursThrough:
    """``sys.stderr`` while :func:`quiet` runs: whole lines that start with ``fusion-passes``
    (the prefix of every message of ours, argparse's errors included) go to the user's
    stderr; everything else goes where it went before (file descriptor 2, now hidden)."""

    def __init__(self, ours, rest):
        self.ours, self.rest, self.pending = ours, rest, ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            (self.ours if line.startswith("fusion-passes") else self.rest).write(line + "\n")
        return len(text)

    def flush(self) -> None:
        if self.pending and not "fusion-passes".startswith(self.pending[:13]):
            self.rest.write(self.pending)
            self.pending = ""
        self.rest.flush()
        self.ours.flush()

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name):  # fileno, encoding, errors, ...: those of the hidden stream
        return getattr(self.rest, name)


def _on_fd2(stream) -> bool:
    try:
        return stream.fileno() == 2
    except (AttributeError, OSError, ValueError):  # a stream of its own (a test's capture)
        return False


@contextlib.contextmanager
def quiet(enabled: bool = True) -> Iterator[None]:
    """While the block runs, what anything writes to file descriptor 2 (this process and
    the processes it starts: logging, warnings, progress bars, C++ messages) goes to a
    temporary file that is then dropped. Our own messages still reach the user: lines
    written to ``sys.stderr`` that start with ``fusion-passes``, :func:`note` and
    :func:`step`."""
    global _real_stderr
    if not enabled or _real_stderr is not None:
        yield
        return
    python_stderr = sys.stderr
    python_stderr.flush()
    saved = os.dup(2)
    real = os.fdopen(os.dup(saved), "w", buffering=1)
    _real_stderr = real if _on_fd2(python_stderr) else python_stderr
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            sys.stderr = through = _OursThrough(_real_stderr, python_stderr)
            try:
                yield
            finally:
                if through.pending:
                    through.write("\n")
                with contextlib.suppress(Exception):
                    through.flush()
                sys.stderr = python_stderr
                os.dup2(saved, 2)
    finally:
        os.close(saved)
        real.close()
        _real_stderr = None


def _stderr():
    return _real_stderr if _real_stderr is not None else sys.stderr


def note(text: str) -> None:
    """One line of ours to the user's stderr, shown even while :func:`quiet` hides fd 2."""
    stream = _stderr()
    stream.write(printable(text) + "\n")
    stream.flush()


@contextlib.contextmanager
def step(text: str) -> Iterator[None]:
    """``.. text (12 s)`` on the terminal while the block runs, updated each second and
    erased when it ends. Nothing when stderr is not a terminal (logs and pipes stay clean)."""
    stream, text = _stderr(), printable(text)
    if not stream.isatty():
        yield
        return
    done = threading.Event()
    start = time.monotonic()

    def tick() -> None:
        while True:
            stream.write(f"\r\033[K.. {text} ({time.monotonic() - start:.0f} s)")
            stream.flush()
            if done.wait(1.0):
                return

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        stream.write("\r\033[K")
        stream.flush()
