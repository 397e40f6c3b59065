"""Outputs that appear complete or not at all, and are checked before the work starts.

A command reserves its outputs first: :class:`OutputFile` creates its temporary file,
:class:`OutputDir` its staging folder, in the place the output will live. That is the
real test of "can I write there" (permissions, a read-only or special file system, a
missing folder, a file where a folder should be), and it fails with a one-line
:class:`~fusion_passes.cli.UsageError` before anything is compiled. The content is
written under the temporary name and renamed into place on :meth:`commit`; on any error
the temporary is removed, so nothing partial is left behind.
"""

from __future__ import annotations

import os
import pathlib
import secrets
import shutil

from fusion_passes.cli import UsageError


def _temp_name(folder: pathlib.Path, name: str) -> pathlib.Path:
    return folder / f".{name}.{secrets.token_hex(4)}.tmp"


NAME_MAX = 255
"""Longest file name, in bytes, of Linux file systems (ext4, XFS, btrfs: ``NAME_MAX`` in
``<linux/limits.h>``); the staging name adds :data:`STAGING_EXTRA` bytes to an output's."""
STAGING_EXTRA = len(".." + "0" * 8 + ".tmp")
PATH_MAX = 4096
"""Longest path, in bytes, the Linux kernel takes (``PATH_MAX`` in ``<linux/limits.h>``)."""


def _path(path: str | os.PathLike, what: str) -> pathlib.Path:
    """*path*, refused when it is empty or longer than a file system takes (named by its
    start: the message stays one short line)."""
    text = os.fspath(path)
    if not text:
        raise UsageError(f"{what} is an empty string, not a path")
    shown = text if len(text) <= 120 else f"{text[:120]}... ({len(text)} characters)"
    if len(os.fsencode(text)) > PATH_MAX:
        raise UsageError(f"cannot write {shown}: the path is longer than {PATH_MAX} bytes")
    longest = max((len(os.fsencode(part)) for part in pathlib.Path(text).parts), default=0)
    if longest > NAME_MAX - STAGING_EXTRA:
        raise UsageError(f"cannot write {shown}: a name in it is {longest} bytes; file systems take "
                         f"{NAME_MAX}, and the staging name adds {STAGING_EXTRA}")
    return pathlib.Path(path)


def _folder_of(path: pathlib.Path, what: str) -> pathlib.Path:
    if path.name in ("", ".", ".."):
        raise UsageError(f"{what} {str(path)!r} is not a file name")
    parent = path.parent
    if not parent.is_dir():
        raise UsageError(f"cannot write {path}: no folder {parent} (create it first)")
    return parent


class OutputFile:
    """One file, written under a temporary name beside *path* and renamed onto it."""

    def __init__(self, path: str | os.PathLike, what: str = "output"):
        self.path = _path(path, what)
        if self.path.is_dir():
            raise UsageError(f"cannot write {self.path}: it is a folder")
        self.tmp = _temp_name(_folder_of(self.path, what), self.path.name)
        try:
            os.close(os.open(self.tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except OSError as e:
            raise UsageError(f"cannot write {self.path}: {e.strerror or e}") from None

    def commit(self, text: str) -> pathlib.Path:
        """Write *text* and put the file in place."""
        try:
            self.tmp.write_text(text, encoding="utf-8")
            os.replace(self.tmp, self.path)
        finally:
            self.discard()
        return self.path

    def discard(self) -> None:
        """Remove the temporary file (nothing is left of this output)."""
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "OutputFile":
        return self

    def __exit__(self, *exc) -> None:
        self.discard()


class OutputDir:
    """A folder of files: staged in a temporary folder, moved into *path* on commit.

    A new folder is staged beside it and renamed; into an existing folder each file is
    moved (replacing a file of the same name, leaving other files alone).
    """

    def __init__(self, path: str | os.PathLike, what: str = "output folder"):
        self.path = _path(path, what)
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"cannot write into {self.path}: it exists and is not a folder")
        where = self.path if self.path.is_dir() else _folder_of(self.path, what)
        self.staging = _temp_name(where, self.path.name or "out")
        try:
            os.mkdir(self.staging, 0o777)
        except OSError as e:
            raise UsageError(f"cannot write into {self.path}: {e.strerror or e}") from None
        self.names: list[str] = []

    def write(self, name: str, text: str) -> None:
        """Stage one file (its final path is ``path / name``)."""
        (self.staging / name).write_text(text, encoding="utf-8")
        self.names.append(name)

    def commit(self) -> list[pathlib.Path]:
        """Move the staged files into place; their final paths."""
        try:
            if not self.path.exists():
                os.rename(self.staging, self.path)
            else:
                for name in self.names:
                    os.replace(self.staging / name, self.path / name)
        finally:
            self.discard()
        return [self.path / n for n in self.names]

    def discard(self) -> None:
        """Remove the staging folder and what it holds."""
        shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> "OutputDir":
        return self

    def __exit__(self, *exc) -> None:
        self.discard()


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write *text* to *path* so that the file is complete or absent (for library callers:
    errors are ``OSError`` as :func:`open` raises them)."""
    path = pathlib.Path(path)
    tmp = _temp_name(path.parent, path.name)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
