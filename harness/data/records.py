"""Preparing the product records (`prepare`): reading, cleaning, de-duplicating and splitting them.

The steps live in `reading`, `cleaning`, `splitting` and `prepared` (the examples in memory and on disk);
this module runs them over every file, in worker processes for big inputs.

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
import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

from harness.data.cleaning import clean_text, title_key, truncate_words
from harness.data.prepared import Example, PreparedData, example_line
from harness.data.reading import RawRecord, ReadStats, expand_paths, nonblank_lines, parse_line
from harness.data.splitting import SplitSide, title_hash, unit
from harness.errors import DataError
from harness.spec import DataSpec, TaskSpec

_BATCH_BYTES = 1 << 18  # lines handed to a worker at a time: enough to amortise the hand-over
_PARALLEL_MIN_BYTES = 64 << 20  # below this, starting worker processes costs more than it saves
_MAX_WORKERS = 8  # beyond this the main process (reading, de-duplicating) is the bottleneck


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
        parsed = parse_line(line, rules.title_field, rules.content_field) if reason is None else reason
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
    key = title_key(title)
    if not key:
        return "empty_title"
    ex = Example(_record_id(rec, rules.id_field), title, truncate_words(content, rules.max_content_chars),
                 rec.source)
    return title_hash(key, rules.split_salt), example_line(ex).encode("utf-8")


def _line_batches(paths: list[Path]) -> Iterator[tuple[Path, list]]:
    """The non-blank lines of each file, about _BATCH_BYTES at a time (one worker's portion)."""
    for path in paths:
        batch: list = []
        size = 0
        for item in nonblank_lines(path):
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
    train, heldout = SplitSide(d.max_train), SplitSide(d.max_heldout)
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
                held = from_test_file if d.heldout_path else unit(h) < threshold  # unit(h) == split_value
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
