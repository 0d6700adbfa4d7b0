"""Reading, cleaning, de-duplicating and splitting the product records.

The input is AmazonTitles-1.3MM `trn.json`: JSON lines `{"uid", "title", "content", ...}`,
2.2M lines / 1.9 GB, ~38% with empty content, HTML entities everywhere, and the odd broken
line. Everything here streams: memory grows with one 64-bit hash per kept title (the kept
examples wait in temporary files), never with the size of a file or of a single line. Big
inputs are cleaned by worker processes, with results identical to one process.

Decisions (each deliberate, see the functions for why):

* A bad line is skipped and counted under one reason (with its first 5 `file:line`
  locations); `strict=True` turns the first bad line into `DataError("file:line: reason")`.
  A path that does not exist is always an error.
* Content that is empty or shorter than `min_content_chars` after cleaning is dropped, and only
  then are titles de-duplicated: a title's first *usable* record is kept.
* The split is a pure function of the normalized title and `split_salt` (sha256), so the same
  title never lands on both sides and adding rows never moves an existing row across it.
  With `heldout_path` (a test file) every `path` row is train and every test-file row held out;
  each side is de-duplicated on its own, so a title in both stays visible to the leakage check.
* Caps keep the rows with the smallest split hash (stable as rows are added).
* Output order is file order for both train and held-out (`source` ascending).
* `read` counts every non-blank line (good or bad) plus one per cut-short/corrupt gzip stream,
  so `counts` always add up: read = malformed + empty_title + empty + too_short + duplicate
  + train + heldout + train_capped + heldout_capped.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import gzip
import hashlib
import heapq
import html
import json
import multiprocessing
import os
import re
import signal
import tempfile
import unicodedata
import weakref
import zlib
from array import array
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from harness.errors import DataError, RunError
from harness.io import atomic_write_json, atomic_writer
from harness.spec import DataSpec, TaskSpec

MAX_LINE_BYTES = 1 << 20  # 1 MiB: the longest real record is ~30 KB; anything longer is junk.
_SKIP_CHUNK = 1 << 16  # how much of an over-long line is read (and discarded) at a time
_MAX_UNESCAPE_ROUNDS = 4  # `&amp;amp;#8217;` needs 3; more rounds would only eat literal text
_MAX_FIRST = 5  # locations kept per bad-line reason
_BATCH_BYTES = 1 << 18  # lines handed to a worker at a time: enough to amortise the hand-over
_PARALLEL_MIN_BYTES = 64 << 20  # below this, starting worker processes costs more than it saves
_MAX_WORKERS = 8  # beyond this the main process (reading, de-duplicating) is the bottleneck
_READ_BLOCK = 1 << 20  # how much of a spilled side is read back at a time

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


# --------------------------------------------------------------------------------------------
# Text cleaning
# --------------------------------------------------------------------------------------------

_COMMENT_RE = re.compile(r"<!--.*?-->", re.S)
# Only things that look like real tags (`<br>`, `</p>`, `<div class="x">`), so "size < 5 in" or
# "<3" survive.
_TAG_RE = re.compile(r"</?([a-zA-Z][a-zA-Z0-9]*)\b[^<>]*/?>")
# Hand-written because no stdlib list exists: inline tags vanish without a space ("5<sup>th</sup>"
# -> "5th"), every other tag (br, p, div, li, ...) separates words ("end.<br>Next").
_INLINE_TAGS = frozenset("a abbr b bdi bdo cite code em font i mark q s small span strong sub sup u".split())
# Amazon's "--This text refers to theHardcoveredition." / "... an out of print or unavailable
# edition of this title." tail (also seen mid-text where descriptions were concatenated). The
# edition name may be glued to "edition", so no word boundary there; bounded so it cannot eat text.
_BOILERPLATE_RE = re.compile(r"this text refers to\b[^.]{0,120}?edition(?: of this title)?\.?", re.IGNORECASE)
_BOILERPLATE_LEAD = " -\u2013\u2014"  # the "--" (or dash) that introduces it, stripped with it


def _build_control_table() -> dict[int, Any]:
    """str.translate table: drop control/invisible characters, keep whitespace as a space.

    Literal C1 controls (U+0080-U+009F) in this data are cp1252 bytes decoded as Latin-1, so
    they map to their cp1252 character -- the same thing `html.unescape` does for `&#x92;` per
    HTML5; the five undefined cp1252 bytes are dropped. Built from the codec, not typed in.
    """
    table: dict[int, Any] = {}
    for cp in range(0x20):
        table[cp] = " " if chr(cp) in "\t\n\r\x0b\x0c" else None
    table[0x7F] = None
    for cp in range(0x80, 0xA0):
        try:
            table[cp] = bytes([cp]).decode("cp1252")
        except UnicodeDecodeError:
            table[cp] = None
    # Invisible format characters that only break words and de-duplication; U+FFFD is what
    # html.unescape makes of `&#0;` and invalid references.
    for cp in (0x00AD, 0x200B, 0x200C, 0x200D, 0x200E, 0x200F, 0x2060, 0xFEFF, 0xFFFD):
        table[cp] = None
    # Lone surrogates come from JSON escapes like "\ud800" and cannot be written as UTF-8.
    for cp in range(0xD800, 0xE000):
        table[cp] = None
    return table


_CONTROL_TABLE = _build_control_table()
# translate() is a per-character dict lookup; a regex scan first skips it for clean strings.
_CONTROL_RE = re.compile("[" + "".join(re.escape(chr(cp)) for cp in sorted(_CONTROL_TABLE)
                                           if not 0xD800 <= cp < 0xE000)
                         + "\ud800-\udfff]")


def _unescape(s: str) -> str:
    """html.unescape until stable: the data is sometimes escaped twice (`&amp;#8217;`)."""
    for _ in range(_MAX_UNESCAPE_ROUNDS):
        if "&" not in s:
            break
        new = html.unescape(s)
        if new == s:
            break
        s = new
    return s


def _strip_tags(s: str) -> str:
    s = _COMMENT_RE.sub(" ", s)
    return _TAG_RE.sub(lambda m: "" if m.group(1).lower() in _INLINE_TAGS else " ", s)


def clean_text(s: str) -> str:
    """Entities unescaped, tags and control characters removed, NFC, one space between words.

    Also drops Amazon's "--This text refers to ... edition." boilerplate, which would otherwise
    be learned as part of every book description.
    """
    s = _unescape(s)
    if "<" in s:
        s = _strip_tags(s)
    if _CONTROL_RE.search(s):
        s = s.translate(_CONTROL_TABLE)
    s = " ".join(unicodedata.normalize("NFC", s).split())  # str.split: any Unicode whitespace
    if "refers to" in s.lower():
        s = _drop_boilerplate(s)
    return s


def _drop_boilerplate(s: str) -> str:
    """Remove every "--This text refers to ... edition." together with its leading dashes."""
    while m := _BOILERPLATE_RE.search(s):
        s = s[: m.start()].rstrip(_BOILERPLATE_LEAD) + " " + s[m.end():]
    return " ".join(s.split())


class _PunctTable(dict):
    """Lazy str.translate table for normalize_title: punctuation and decorative symbols -> space.

    Python's `re` has no `\\p{P}`; classifying each code point once (on first sight) keeps
    normalize_title fast on 2M titles without precomputing all 1.1M code points at import.
    Math (+, =) and currency symbols are kept: "C++ Primer" and "C Primer" are different books.
    """

    def __missing__(self, cp: int) -> Any:
        cat = unicodedata.category(chr(cp))
        value: Any = " " if cat[0] == "P" or cat in ("Sk", "So") else cp
        self[cp] = value
        return value


# Apostrophes are deleted rather than spaced so "Mog's" == "Mogs" == "Mog’s".
_TITLE_TABLE = _PunctTable({ord(c): None for c in "'\u2018\u2019\u02bc`\u00b4"})


def normalize_title(s: str) -> str:
    """The de-duplication and split key: cleaned, NFKC, casefolded, punctuation-free."""
    return _title_key(clean_text(s))


def _title_key(cleaned: str) -> str:
    """normalize_title for text that is already clean (prepare cleans each title once)."""
    s = unicodedata.normalize("NFKC", cleaned).casefold()
    return " ".join(s.translate(_TITLE_TABLE).split())


def title_hash(normalized: str, salt: str) -> int:
    """64 bits of sha256(salt, normalized title): the split position and the dedupe key."""
    digest = hashlib.sha256(f"{salt}\x00{normalized}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


def split_value(normalized: str, salt: str) -> float:
    """Uniform in [0, 1); the row is held out when this is < heldout_fraction."""
    return _unit(title_hash(normalized, salt))


def _unit(h: int) -> float:
    # 53 bits, exactly representable: h / 2**64 could round up to 1.0.
    return (h >> 11) / float(1 << 53)


def truncate_words(s: str, limit: int) -> str:
    """Cut to at most `limit` characters at a word boundary (a hard cut if one word is huge)."""
    if len(s) <= limit:
        return s
    cut = s[:limit]
    if not s[limit].isspace():
        space = cut.rfind(" ")
        if space > limit // 2:
            cut = cut[:space]
    return cut.rstrip()


# --------------------------------------------------------------------------------------------
# Streaming reader
# --------------------------------------------------------------------------------------------


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


def _parse_line(line: bytes, title_field: str, content_field: str) -> dict | str:
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


def _nonblank_lines(path: Path) -> Iterator[tuple[int, bytes | None, str | None]]:
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
        for line_no, line, reason in _nonblank_lines(path):
            stats.read += 1
            if reason is None:
                parsed = _parse_line(line, title_field, content_field)
                if isinstance(parsed, dict):
                    yield RawRecord(path.name, line_no, parsed)
                    continue
                reason = parsed
            if strict:
                raise DataError(f"{path}:{line_no}: {reason}")
            stats.add_bad(reason, f"{path.name}:{line_no}")


# --------------------------------------------------------------------------------------------
# Prepare
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Example:
    """One cleaned training/held-out pair; `source` is `file:line` of the record it came from."""

    id: str
    title: str
    content: str
    source: str

    def to_dict(self) -> dict:
        # Spelled out: dataclasses.asdict deep-copies each field, 4x slower on a million examples.
        return {"id": self.id, "title": self.title, "content": self.content, "source": self.source}

    @classmethod
    def from_dict(cls, d: dict) -> "Example":
        return cls(id=str(d["id"]), title=str(d["title"]), content=str(d["content"]), source=str(d["source"]))


def _example_line(ex: Example) -> str:
    """The example as one line of train.jsonl / heldout.jsonl."""
    return json.dumps(ex.to_dict(), ensure_ascii=False) + "\n"


def _example_from_line(line: bytes | str) -> Example:
    return Example.from_dict(json.loads(line))


class SpilledExamples(Sequence):
    """Examples kept in a temporary file, one train.jsonl line each, read back on demand.

    `prepare` returns these rather than lists so that a 2.2M-line file costs 16 bytes of memory
    per kept example; indexing, slicing, iteration, len, == and + work as on the list they stand
    for, and write_prepared copies the lines without decoding them. The file goes with the object.
    """

    def __init__(self, spill: BinaryIO, offsets: array, lengths: array):
        self._spill, self._offsets, self._lengths = spill, offsets, lengths
        weakref.finalize(self, spill.close)

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return _example_from_line(os.pread(self._spill.fileno(), self._lengths[index], self._offsets[index]))

    def __iter__(self) -> Iterator[Example]:
        for block, lengths in self._blocks():
            start = 0
            for n in lengths:
                yield _example_from_line(block[start:start + n])
                start += n

    def write_to(self, out: BinaryIO) -> None:
        """Copy the examples' lines, in order, to a binary stream."""
        for block, _ in self._blocks():
            out.write(block)

    def _blocks(self) -> Iterator[tuple[bytes, array]]:
        """Rows that lie next to each other in the file, read together (about 1 MiB at a time)."""
        offsets, lengths, n, fd = self._offsets, self._lengths, len(self), self._spill.fileno()
        i = 0
        while i < n:
            start = end = offsets[i]
            j = i
            while j < n and offsets[j] == end and end - start < _READ_BLOCK:
                end += lengths[j]
                j += 1
            yield os.pread(fd, end - start, start), lengths[i:j]
            i = j

    def __eq__(self, other) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]  # compared by content, like a list

    def __add__(self, other) -> list[Example]:
        return [*self, *other]

    def __radd__(self, other) -> list[Example]:
        return [*other, *self]

    def __repr__(self) -> str:
        return f"SpilledExamples({len(self)} examples)"


@dataclass
class PreparedData:
    """`prepare` gives SpilledExamples, `read_prepared` lists: either way sequences of Example."""

    train: Sequence[Example]
    heldout: Sequence[Example]
    counts: dict


COUNT_KEYS = ("read", "malformed", "empty_title", "empty", "too_short", "duplicate",
              "train", "heldout", "train_capped", "heldout_capped")


@functools.lru_cache(maxsize=256)
def _stem(name: str) -> str:
    return Path(name).stem


def _record_id(rec: RawRecord, id_field: str) -> str:
    """The record's id, or `file-stem:line` when it has none (most trn.json sample rows)."""
    value = rec.obj.get(id_field)
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        return f"{_stem(rec.file)}:{rec.line_no}"
    return str(value).strip()


@dataclass(frozen=True)
class _LineRules:
    """What judging one line needs from the spec: small and picklable (it goes to worker processes)."""

    title_field: str
    content_field: str
    id_field: str
    min_content_chars: int
    max_content_chars: int
    split_salt: str

    @classmethod
    def of(cls, d: DataSpec) -> "_LineRules":
        return cls(d.title_field, d.content_field, d.id_field, d.min_content_chars, d.max_content_chars,
                   d.split_salt)


@dataclass(slots=True)
class _Examined:
    """What prepare makes of one batch of lines, short of de-duplication (which needs file order).

    Only kept rows and bad lines are listed, in file order; dropped records are just counted.
    A kept row is (title hash, the example's train.jsonl line as UTF-8): all the dedupe, the
    split and the writer need.
    """

    path: Path
    read: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # "empty" / "too_short" / "empty_title" -> n
    bad: list[tuple[int, str]] = field(default_factory=list)  # (line_no, reason)
    kept: list[tuple[int, bytes]] = field(default_factory=list)


def _examine_batch(rules: _LineRules, batch: tuple[Path, list]) -> _Examined:
    path, lines = batch
    out = _Examined(path, read=len(lines))
    for line_no, line, reason in lines:
        parsed = _parse_line(line, rules.title_field, rules.content_field) if reason is None else reason
        if isinstance(parsed, str):
            out.bad.append((line_no, parsed))
            continue
        row = _examine_record(rules, RawRecord(path.name, line_no, parsed))
        if isinstance(row, str):
            out.dropped[row] = out.dropped.get(row, 0) + 1
        else:
            out.kept.append(row)
    return out


def _examine_record(rules: _LineRules, rec: RawRecord) -> str | tuple[int, bytes]:
    """The count key a record is dropped under, or its kept row (title hash, train.jsonl line)."""
    content = clean_text(rec.obj[rules.content_field])
    if not content:
        return "empty"
    if len(content) < rules.min_content_chars:
        return "too_short"
    title = clean_text(rec.obj[rules.title_field])
    key = _title_key(title)
    if not key:
        return "empty_title"
    ex = Example(_record_id(rec, rules.id_field), title, truncate_words(content, rules.max_content_chars),
                 rec.source)
    return title_hash(key, rules.split_salt), _example_line(ex).encode("utf-8")


def _line_batches(paths: list[Path]) -> Iterator[tuple[Path, list]]:
    """The non-blank lines of each file, about _BATCH_BYTES at a time (one worker's portion)."""
    for path in paths:
        batch: list = []
        size = 0
        for item in _nonblank_lines(path):
            batch.append(item)
            size += len(item[1] or b"")
            if size >= _BATCH_BYTES:
                yield path, batch
                batch, size = [], 0
        if batch:
            yield path, batch


def _worker_count(paths: list[Path], requested: int | None) -> int:
    """`data.workers`, else one process per CPU core (up to _MAX_WORKERS) for big inputs."""
    if requested is not None:
        return requested
    if sum(p.stat().st_size for p in paths) < _PARALLEL_MIN_BYTES:
        return 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cpus, _MAX_WORKERS)


def _examined_batches(paths: list[Path], rules: _LineRules, workers: int | None) -> Iterator[_Examined]:
    """The non-blank lines of `paths`, examined a batch at a time, in file order."""
    paths = expand_paths(paths)
    n = _worker_count(paths, workers)
    examine = functools.partial(_examine_batch, rules)
    batches = _line_batches(paths)
    yield from map(examine, batches) if n == 1 else _in_order_parallel(examine, batches, n, paths)


def _in_order_parallel(fn, items: Iterator, workers: int, paths: list[Path]) -> Iterator:
    """fn over items in `workers` processes, results in input order.

    At most 2 x workers items are in flight, so memory stays bounded on any file size
    (multiprocessing.Pool.imap reads its input ahead without limit). Workers are spawned, not
    forked: `run` prepares after torch is loaded, and a fork would copy its threads' locks. As
    with any spawned worker, a script calling this must guard its body with `if __name__ ==
    "__main__":` (the worker imports the script; `python -m harness` and notebooks are fine).
    """
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init)
    pending: deque = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool as exc:
        names = ", ".join(str(p) for p in paths)
        raise DataError(f"{names}: a prepare worker process died ({exc}); a script that calls prepare needs "
                        f"`if __name__ == '__main__':`, or set data.workers: 1") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _worker_init() -> None:
    """Ctrl-C is the main process's to handle (it stops the pool), not a traceback from each worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _Side:
    """One split side: rows spilled to a temporary file as they come (16 bytes of memory a row).

    With a cap, only the `cap` smallest hashes stay (a max-heap of (-hash, offset, length)); rows
    it pushes out stay in the file unused. Offsets grow in file order, so sorting the kept rows by
    offset restores it.
    """

    def __init__(self, cap: int | None):
        self.cap = cap
        self.total = 0
        self._spill = tempfile.TemporaryFile()
        self._closer = weakref.finalize(self, self._spill.close)  # until examples() hands the file on
        self._size = 0
        self._heap: list[tuple[int, int, int]] = []
        self._offsets, self._lengths = array("Q"), array("Q")

    def add(self, h: int, line: bytes) -> None:
        self.total += 1
        if self.cap is None:
            self._offsets.append(self._write(line))
            self._lengths.append(len(line))
        elif len(self._heap) < self.cap:
            heapq.heappush(self._heap, (-h, self._write(line), len(line)))
        elif self.cap > 0 and -self._heap[0][0] > h:
            heapq.heapreplace(self._heap, (-h, self._write(line), len(line)))

    def _write(self, line: bytes) -> int:
        offset = self._size
        self._spill.write(line)
        self._size += len(line)
        return offset

    def examples(self) -> SpilledExamples:
        """File order (offset ascending), whatever the cap kept."""
        for _, offset, length in sorted(self._heap, key=lambda row: row[1]):
            self._offsets.append(offset)
            self._lengths.append(length)
        self._spill.flush()
        self._closer.detach()
        return SpilledExamples(self._spill, self._offsets, self._lengths)


def prepare(spec: TaskSpec) -> PreparedData:
    """Read, clean, filter, de-duplicate and split the spec's data files (streaming).

    Memory: one 64-bit hash per kept title plus 16 bytes per kept example (the examples themselves
    wait in temporary files). Raises DataError when a path is missing, in strict mode at the first
    bad line, and when no example at all survives (the counts say why).
    """
    d = spec.data
    stats = ReadStats()
    counts = {k: 0 for k in COUNT_KEYS}
    seen: dict[bool, set[int]] = {False: set(), True: set()}  # by source: training file(s), test file(s)
    train, heldout = _Side(d.max_train), _Side(d.max_heldout)
    threshold = d.heldout_fraction
    with contextlib.closing(_sources(spec)) as batches:
        for batch, from_test_file in batches:
            stats.read += batch.read
            for line_no, reason in batch.bad:
                if d.strict:
                    raise DataError(f"{batch.path}:{line_no}: {reason}")
                stats.add_bad(reason, f"{batch.path.name}:{line_no}")
            for key, n in batch.dropped.items():
                counts[key] += n
            for h, line in batch.kept:
                if h in seen[from_test_file]:
                    counts["duplicate"] += 1
                    continue
                seen[from_test_file].add(h)
                held = from_test_file if d.heldout_path else _unit(h) < threshold  # _unit(h) == split_value
                side = heldout if held else train
                side.add(h, line)
    counts["read"] = stats.read
    counts["malformed"] = stats.malformed
    train_rows, heldout_rows = train.examples(), heldout.examples()
    counts["train"], counts["heldout"] = len(train_rows), len(heldout_rows)
    counts["train_capped"] = train.total - len(train_rows)
    counts["heldout_capped"] = heldout.total - len(heldout_rows)
    counts["bad_lines_by_reason"] = stats.by_reason()
    if not train_rows and not heldout_rows:
        names = ", ".join(str(p) for p in spec.data_paths())
        raise DataError(f"{names}: no usable records ({_one_line(counts)})")
    return PreparedData(train_rows, heldout_rows, counts)


def _sources(spec: TaskSpec) -> Iterator[tuple[_Examined, bool]]:
    """Every examined batch with whether it comes from `data.heldout_path`: the training file(s), then the test file(s)."""
    d = spec.data
    rules = _LineRules.of(d)
    for paths, from_test_file in ((spec.data_paths(), False), (spec.heldout_paths(), True)):
        with contextlib.closing(_examined_batches(paths, rules, d.workers)) as batches:
            yield from ((batch, from_test_file) for batch in batches)


def _one_line(counts: dict) -> str:
    return ", ".join(f"{k} {counts[k]}" for k in COUNT_KEYS if counts.get(k)) or "read 0"


def format_counts(counts: dict) -> str:
    """A short human summary for the `prepare` command: one line per count, then bad lines."""
    keys = [k for k in COUNT_KEYS if k in counts]
    width = max(len(k) for k in keys) if keys else 0
    lines = [f"{k:<{width}}  {counts[k]:>9,}" for k in keys]
    for reason, info in (counts.get("bad_lines_by_reason") or {}).items():
        first = ", ".join(info.get("first", []))
        more = ", ..." if info.get("count", 0) > len(info.get("first", [])) else ""
        lines.append(f"  {reason}: {info.get('count', 0):,} (first: {first}{more})")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Writing and reading prepared data
# --------------------------------------------------------------------------------------------

TRAIN_FILE, HELDOUT_FILE, COUNTS_FILE = "train.jsonl", "heldout.jsonl", "data_counts.json"


def _write_examples(path: Path, examples: Sequence[Example]) -> None:
    with atomic_writer(path) as fh:
        if isinstance(examples, SpilledExamples):  # already train.jsonl lines: copy the bytes
            fh.flush()
            examples.write_to(fh.buffer)
            return
        for ex in examples:
            fh.write(_example_line(ex))


def write_prepared(data: PreparedData, folder: Path) -> None:
    """Write train.jsonl, heldout.jsonl, then data_counts.json (last: it marks completion)."""
    folder = Path(folder)
    _write_examples(folder / TRAIN_FILE, data.train)
    _write_examples(folder / HELDOUT_FILE, data.heldout)
    atomic_write_json(folder / COUNTS_FILE, data.counts)


def _read_examples(path: Path) -> list[Example]:
    out = []
    try:
        with open(path, encoding="utf-8") as fh:
            for i, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    out.append(Example.from_dict(json.loads(line)))
                except (ValueError, KeyError, TypeError):
                    raise RunError(f"{path}:{i}: not a prepared example; run prepare again") from None
    except FileNotFoundError:
        raise RunError(f"{path}: missing; run prepare first") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RunError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    return out


def read_prepared(folder: Path) -> PreparedData:
    """Load what write_prepared wrote; a missing or damaged file is a one-line RunError."""
    folder = Path(folder)
    counts_path = folder / COUNTS_FILE
    try:
        counts = json.loads(counts_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"{counts_path}: missing; run prepare first") from None
    except (OSError, ValueError) as exc:
        raise RunError(f"cannot read {counts_path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not isinstance(counts, dict):
        raise RunError(f"{counts_path}: not a counts object; run prepare again")
    return PreparedData(_read_examples(folder / TRAIN_FILE), _read_examples(folder / HELDOUT_FILE), counts)
