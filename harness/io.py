"""Atomic file writing for every artifact the harness leaves behind.

A crash, a full disk or Ctrl-C while writing must never leave a half-written `metrics.json`
or `train.jsonl` that a later step would read as complete. So every artifact is written to a
temp file in the same folder (same file system, so the rename is atomic), fsynced, and then
`os.replace`d over the target. On any failure the temp file is removed and the old target (if
any) is left untouched. OS errors become a one-line `RunError` naming the path.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from harness.errors import RunError

# Human words for the errors a user can fix; anything else falls back to the OS's strerror.
_ERRNO_WORDS = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "read-only file system",
    errno.ENOENT: "folder does not exist",
    errno.ENOTDIR: "a parent is not a folder",
    errno.EISDIR: "is a folder",
}


def _current_umask() -> int:
    # mkstemp creates files 0600; the final artifact should get the usual mode (0666 & ~umask).
    # os.umask can only be read by setting it, so read it once at import, not per write.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def os_error_message(path: Path | str, exc: OSError, verb: str = "write") -> str:
    """`cannot write PATH: disk full` -- the one-line form of an OSError."""
    words = _ERRNO_WORDS.get(exc.errno) or exc.strerror or type(exc).__name__
    return f"cannot {verb} {path}: {words}"


@contextlib.contextmanager
def atomic_writer(path: Path | str, encoding: str = "utf-8") -> Iterator[TextIO]:
    """Open a text stream whose content replaces `path` only if the `with` block succeeds.

    Streaming (rather than one big string) lets a 1 GB `train.jsonl` be written without holding
    its text in memory twice. Parent folders are created.
    """
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w", encoding=encoding, newline="\n") as fh:
            os.fchmod(fh.fileno(), 0o666 & ~_UMASK)
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except OSError as exc:
        raise RunError(os_error_message(path, exc)) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable; some file systems cannot fsync a folder, which is fine."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically; OSError -> one-line RunError, no temp file left."""
    with atomic_writer(path) as fh:
        fh.write(text)


def atomic_write_json(path: Path | str, obj: Any) -> None:
    """Write `obj` as indented JSON atomically, keeping key order.

    `allow_nan=False`: NaN/Infinity are not JSON and would silently poison a metrics file, so
    they raise ValueError (before any file is touched) instead of being written.
    """
    try:
        text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False, ensure_ascii=False)
    except ValueError as exc:
        raise ValueError(f"cannot write {path}: {exc}") from None
    atomic_write_text(path, text + "\n")
