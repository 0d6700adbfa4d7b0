"""Prepared data in memory and on disk: the cleaned examples, kept in temporary files while a big input is
prepared (`SpilledExamples`), and a run's `data/` folder (train.jsonl, heldout.jsonl, data_counts.json).
"""

from __future__ import annotations

import json
import os
import weakref
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from harness.errors import RunError
from harness.io import atomic_write_json, atomic_writer

_READ_BLOCK = 1 << 20  # how much of a spilled side is read back at a time


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


def example_line(ex: Example) -> str:
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


TRAIN_FILE, HELDOUT_FILE, COUNTS_FILE = "train.jsonl", "heldout.jsonl", "data_counts.json"


def _write_examples(path: Path, examples: Sequence[Example]) -> None:
    with atomic_writer(path) as fh:
        if isinstance(examples, SpilledExamples):  # already train.jsonl lines: copy the bytes
            fh.flush()
            examples.write_to(fh.buffer)
            return
        for ex in examples:
            fh.write(example_line(ex))


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
