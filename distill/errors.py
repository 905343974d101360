"""Errors meant for the user: one clear line, exit status 2, no traceback.

A write that fails because the disk is full or the output directory is read-only is the
user's to fix too: :func:`storage_error` turns it into one line ("no space left on
<dir>", "<dir> is read-only"), whichever layer raised it (Python's OSError, torch's
checkpoint writer, a spawned rank's report of either).
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class UserError(Exception):
    """Bad input (recipe, shard, model output, path). The CLI prints ``error: <msg>`` and
    exits with status 2. The message names what is wrong and where."""

    exit_code = 2


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_DENIED = (errno.EACCES, errno.EPERM)
# the same failures when they come back as text: torch's zip writer, a rank's traceback
_NO_SPACE_TEXT = re.compile(r"No space left on device|Disk quota exceeded|\[Errno (28|122)\]")
_READ_ONLY_TEXT = re.compile(r"Read-only file system|\[Errno 30\]")
_WRITER_TEXT = re.compile(r"inline_container|PytorchStreamWriter|file write failed")
_PATH_TEXT = re.compile(r"\[Errno \d+\] [^:\n]+: '([^'\n]+)'")
LOW_SPACE = 64 << 20  # a failed write with less free space than this was for want of space


def storage_error(
    e: BaseException, where: str | Path | None = None, *, vague: bool = True
) -> UserError | None:
    """``e`` as a one-line :class:`UserError` when a write failed for want of space or
    because the output is read-only (or not ours to write); None for any other error.
    ``where`` is the directory the caller was writing, for errors that name no file;
    ``vague=False``: None too when neither names a directory (a caller further up may
    know it)."""
    text = str(e)
    code = e.errno if isinstance(e, OSError) else None
    if isinstance(e, OSError) and e.filename:
        path: Path | None = Path(os.fsdecode(e.filename))
    elif m := _PATH_TEXT.search(text):
        path = Path(m.group(1))
    else:
        path = Path(where) if where else None
    target = _existing_dir(path) if path else None
    if target is None and not vague:
        return None
    if (
        code == errno.EROFS
        or _READ_ONLY_TEXT.search(text)
        or (target and _WRITER_TEXT.search(text) and _read_only(target))
    ):
        return UserError(f"{target or 'the output directory'} is read-only; write elsewhere")
    if (
        code in _NO_SPACE
        or _NO_SPACE_TEXT.search(text)
        or (target and _WRITER_TEXT.search(text) and _free_bytes(target) < LOW_SPACE)
    ):
        where_ = target or "the output device"
        return UserError(
            f"no space left on {where_}; free some space and run again "
            "(what was committed is kept and resumed)"
        )
    if code in _DENIED and path is not None:
        return UserError(f"{path}: permission denied; write elsewhere or fix its permissions")
    return None


@contextmanager
def storage_errors(where: str | Path | None = None) -> Iterator[None]:
    """Raise a full disk or a read-only output met inside as its :func:`storage_error`."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        found = storage_error(e, where)
        if found is None:
            raise
        raise found from None


def _existing_dir(path: Path) -> Path:
    """The nearest directory at or above ``path`` that exists."""
    p = path
    while not p.is_dir() and p != p.parent:
        p = p.parent
    return p


def _read_only(d: Path) -> bool:
    try:
        return bool(os.statvfs(d).f_flag & os.ST_RDONLY) or not os.access(d, os.W_OK)
    except OSError:
        return False


def _free_bytes(d: Path) -> int:
    try:
        st = os.statvfs(d)
    except OSError:
        return 1 << 62
    return st.f_bavail * st.f_frsize
