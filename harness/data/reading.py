"""Reading the record files: JSON lines, plain or gzipped, streamed line by line with bounded memory.

A bad line is skipped and counted under one reason (with its first locations), or with `strict` is a
`DataError` naming `file:line`; a cut-short or corrupt gzip stream counts as one bad line.
"""

from __future__ import annotations

import glob
import gzip
import json
import re
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from harness.errors import DataError

MAX_LINE_BYTES = 1 << 20  # 1 MiB: the longest real record is ~30 KB; anything longer is junk.


_SKIP_CHUNK = 1 << 16  # how much of an over-long line is read (and discarded) at a time


_MAX_FIRST = 5  # locations kept per bad-line reason


# Bad-line reasons (the keys of `bad_lines_by_reason`); field reasons add the field name.
R_INVALID_JSON = "invalid JSON"


R_NOT_OBJECT = "not a JSON object"


R_INVALID_UTF8 = "invalid UTF-8"


R_NUL = "NUL byte"


R_TOO_LONG = "line too long"


R_TRUNCATED_GZIP = "truncated gzip"


R_CORRUPT_GZIP = "corrupt gzip"


def r_missing(name: str) -> str:
    return f"missing field '{name}'"


def r_null(name: str) -> str:
    return f"null field '{name}'"


def r_not_string(name: str) -> str:
    return f"non-string field '{name}'"


@dataclass(slots=True)
class RawRecord:
    """One parsed line: `file` is the file name shown in counts and sources."""

    file: str
    line_no: int
    obj: dict

    @property
    def source(self) -> str:
        return f"{self.file}:{self.line_no}"


@dataclass
class ReadStats:
    """What the reader saw: records attempted (`read`) and bad lines by reason."""

    read: int = 0
    bad: dict[str, int] = field(default_factory=dict)
    first: dict[str, list[str]] = field(default_factory=dict)

    @property
    def malformed(self) -> int:
        return sum(self.bad.values())

    def add_bad(self, reason: str, where: str) -> None:
        self.bad[reason] = self.bad.get(reason, 0) + 1
        firsts = self.first.setdefault(reason, [])
        if len(firsts) < _MAX_FIRST:
            firsts.append(where)

    def by_reason(self) -> dict[str, dict]:
        return {r: {"count": n, "first": list(self.first.get(r, []))} for r, n in self.bad.items()}


_GLOB_CHARS = re.compile(r"[*?\[]")


def expand_paths(paths: Iterable[Path | str]) -> list[Path]:
    """Expand globs (sorted), check every file exists, drop repeats; errors name the path.

    A path that exists is taken literally even if it contains glob characters. Listing the same
    file twice (or via a file and a glob) reads it once, so records are not double-counted.
    """
    out: list[Path] = []
    seen: set[Path] = set()
    for p in paths:
        p = Path(p)
        if not p.exists() and _GLOB_CHARS.search(str(p)):
            matches = sorted(glob.glob(str(p)))
            if not matches:
                raise DataError(f"{p}: no files match this pattern")
            candidates = [Path(m) for m in matches]
        else:
            candidates = [p]
        for c in candidates:
            if c.is_dir():
                raise DataError(f"{c}: is a folder, expected a JSON-lines file")
            if not c.exists():
                raise DataError(f"{c}: no such file")
            key = c.resolve()
            if key not in seen:
                seen.add(key)
                out.append(c)
    return out


def _open_binary(path: Path):
    """Open plain or gzip by magic bytes (a `.gz` name is not trusted, nor needed)."""
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        magic = fh.read(2)
        fh.seek(0)
    except OSError as exc:
        fh.close()
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if magic == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=fh, mode="rb"), fh
    return fh, fh


def _read_lines(fh, path: Path) -> Iterator[tuple[int, bytes | None, str | None]]:
    """Yield (line_no, bytes, None) per line or (line_no, None, reason) for a bad one.

    `readline(limit)` bounds memory: an over-long line is reported once and the rest of it is
    read and discarded in small chunks. A cut-short or corrupt gzip stream ends the file.
    """
    line_no = 0
    while True:
        try:
            line = fh.readline(MAX_LINE_BYTES + 1)
        except EOFError:
            yield line_no + 1, None, R_TRUNCATED_GZIP
            return
        except (gzip.BadGzipFile, zlib.error):
            yield line_no + 1, None, R_CORRUPT_GZIP
            return
        except OSError as exc:
            raise DataError(f"{path}:{line_no + 1}: cannot read ({exc.strerror or exc})") from None
        if not line:
            return
        line_no += 1
        if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
            try:
                while True:
                    rest = fh.readline(_SKIP_CHUNK)
                    if not rest or rest.endswith(b"\n"):
                        break
            except EOFError:
                yield line_no, None, R_TOO_LONG
                yield line_no + 1, None, R_TRUNCATED_GZIP
                return
            except (gzip.BadGzipFile, zlib.error):
                yield line_no, None, R_TOO_LONG
                yield line_no + 1, None, R_CORRUPT_GZIP
                return
            yield line_no, None, R_TOO_LONG
            continue
        yield line_no, line, None


def parse_line(line: bytes, title_field: str, content_field: str) -> dict | str:
    """The record as a dict, or the reason it is bad."""
    if b"\x00" in line:
        return R_NUL
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return R_INVALID_UTF8
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested 100k deep
        return R_INVALID_JSON
    if not isinstance(obj, dict):
        return R_NOT_OBJECT
    for name in (title_field, content_field):
        if name not in obj:
            return r_missing(name)
        value = obj[name]
        if value is None:
            return r_null(name)
        if not isinstance(value, str):
            return r_not_string(name)
    return obj


def nonblank_lines(path: Path) -> Iterator[tuple[int, bytes | None, str | None]]:
    """_read_lines of one file without its blank lines (a trailing newline is not an error) and
    without a UTF-8 BOM at its start (an editor artifact, not an error)."""
    reader, raw = _open_binary(path)
    try:
        for line_no, line, reason in _read_lines(reader, path):
            if line is not None:
                if line_no == 1 and line.startswith(b"\xef\xbb\xbf"):
                    line = line[3:]
                if not line.strip():
                    continue
            yield line_no, line, reason
    finally:
        reader.close()
        raw.close()


def iter_records(
    paths: list[Path],
    strict: bool = False,
    *,
    title_field: str = "title",
    content_field: str = "content",
    stats: ReadStats | None = None,
) -> Iterator[RawRecord]:
    """Stream parsed records from JSON-lines files (plain or gzip, globs allowed).

    Bad lines are counted in `stats` (pass your own ReadStats to see them) and skipped, or with
    `strict=True` raise `DataError("path:line: reason")` at the first one. Blank lines are
    skipped silently (a trailing newline is not an error). Missing paths always raise.
    """
    stats = stats if stats is not None else ReadStats()
    for path in expand_paths(paths):
        for line_no, line, reason in nonblank_lines(path):
            stats.read += 1
            if reason is None:
                parsed = parse_line(line, title_field, content_field)
                if isinstance(parsed, dict):
                    yield RawRecord(path.name, line_no, parsed)
                    continue
                reason = parsed
            if strict:
                raise DataError(f"{path}:{line_no}: {reason}")
            stats.add_bad(reason, f"{path.name}:{line_no}")
