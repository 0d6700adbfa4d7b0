"""The train/held-out split: a pure function of the normalized title and `split_salt`, so the same title never
lands on both sides and adding rows never moves an existing one; each side spills its rows to a temporary
file as they come and, under a cap, keeps those with the smallest split hash.
"""

from __future__ import annotations

import hashlib
import heapq
import tempfile
import weakref
from array import array

from harness.data.prepared import SpilledExamples


def title_hash(normalized: str, salt: str) -> int:
    """64 bits of sha256(salt, normalized title): the split position and the dedupe key."""
    digest = hashlib.sha256(f"{salt}\x00{normalized}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


def split_value(normalized: str, salt: str) -> float:
    """Uniform in [0, 1); the row is held out when this is < heldout_fraction."""
    return unit(title_hash(normalized, salt))


def unit(h: int) -> float:
    # 53 bits, exactly representable: h / 2**64 could round up to 1.0.
    return (h >> 11) / float(1 << 53)


class SplitSide:
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
