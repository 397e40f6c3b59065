"""What reaches the terminal: escaping, and progress lines on a terminal only."""

from __future__ import annotations

import io
import os
import pty
import select
import time

import pytest

from fusion_passes.cli import terminal


@pytest.mark.parametrize("text,shown", [
    ("plain text, é, 中文", "plain text, é, 中文"),
    ("\x1b[2J", "\\x1b[2J"),  # clear screen
    ("\x1b]0;title\x07", "\\x1b]0;title\\x07"),  # set the window title
    ("a\nb\rc\td", "a\\x0ab\\x0dc\\x09d"),  # no fake lines, no carriage return over a line
    ("\x9b31m", "\\x9b31m"),  # the 8-bit CSI
    ("abc\u202edef", "abc\\u202edef"),  # right-to-left override
])
def test_printable_escapes_control_and_format_characters(text, shown):
    assert terminal.printable(text) == shown
    assert terminal.printable(shown) == shown  # escaping is stable


def test_printable_data_escapes_every_string_of_nested_data():
    data = {"k\x1b": ["\x1b", ("\n", 3)], "n": None}
    assert terminal.printable_data(data) == {"k\\x1b": ["\\x1b", ("\\x0a", 3)], "n": None}


def test_progress_only_on_a_terminal(monkeypatch):
    master, slave = pty.openpty()
    tty = os.fdopen(slave, "w")
    monkeypatch.setattr("sys.stderr", tty)
    with terminal.step("tracing \x1b[2J"):
        time.sleep(1.2)
    tty.flush()
    shown = b""
    while select.select([master], [], [], 0.5)[0]:
        shown += os.read(master, 4096)
    shown = shown.decode()
    assert "\r\x1b[K.. tracing \\x1b[2J (0 s)" in shown and "(1 s)" in shown, shown
    assert shown.endswith("\r\x1b[K")  # erased when the step ends
    not_a_tty = io.StringIO()
    monkeypatch.setattr("sys.stderr", not_a_tty)
    with terminal.step("tracing"):
        pass
    assert not_a_tty.getvalue() == ""
    tty.close()
    os.close(master)
