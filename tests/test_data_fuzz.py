"""Seeded fuzzing of the data reader: corrupted lines must be counted, never crash, and memory
must stay bounded on a pathological 20 MB single line."""

from __future__ import annotations

import gzip
import json
import random
import tracemalloc
from pathlib import Path

import pytest

from harness.data.prepared import read_prepared, write_prepared
from harness.data.reading import ReadStats, iter_records
from harness.data.records import prepare
from harness.errors import DataError
from harness.spec import TaskSpec, build


def make_spec(tmp_path: Path, **data_overrides) -> TaskSpec:
    data = {"path": ["data.jsonl"], **data_overrides}
    spec = build(TaskSpec, {"name": "fuzz", "data": data}, "")
    spec.base_dir = str(tmp_path)
    return spec


WORDS = "sturdy brand new vintage deluxe kit for home garden kids &amp; adults &#8217; &#x92; <br> caf\u00e9".split()


def good_record(rng: random.Random, i: int) -> dict:
    title = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6))) + f" {i}"
    content = " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 60)))
    return {"uid": f"U{i}", "title": title, "content": content}


def corrupt(rng: random.Random, line: bytes) -> bytes:
    kind = rng.randrange(12)
    if kind == 0:  # truncation
        return line[: rng.randrange(len(line))]
    if kind == 1:  # byte flips
        b = bytearray(line)
        for _ in range(rng.randint(1, 5)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b).replace(b"\n", b" ")
    if kind == 2:  # random bytes
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 300))).replace(b"\n", b"")
    if kind == 3:  # wrong types
        obj = json.loads(line)
        obj[rng.choice(["title", "content", "uid"])] = rng.choice([None, 1, 2.5, True, [], {}, ["x"]])
        return json.dumps(obj).encode()
    if kind == 4:  # missing keys
        obj = json.loads(line)
        obj.pop(rng.choice(["title", "content", "uid"]))
        return json.dumps(obj).encode()
    if kind == 5:  # not an object
        return rng.choice([b"[]", b"null", b"42", b'"s"', b"true", b"[1, {\"title\": 2}]"])
    if kind == 6:  # huge line (over the 1 MiB cap)
        return json.dumps({"title": "huge", "content": "z" * (1 << 20)}).encode()
    if kind == 7:  # deep nesting (RecursionError in json)
        return b"[" * 100_000 + b"]" * 100_000
    if kind == 8:  # escapes that decode to junk: lone surrogates, NUL, controls
        return json.dumps({"title": "t\ud800\udfff\x00" + str(rng.random()), "content": "\x07\ud83d" + "x" * 40}).encode()
    if kind == 9:  # NUL byte / invalid UTF-8 inside an otherwise fine line
        return line.replace(b'"', b'"\x00', 1) if rng.random() < 0.5 else line + b"\xc3\x28"
    if kind == 10:  # HTML/entity soup
        return json.dumps({"title": "&amp;amp;#" * 20, "content": "<b>&#x110000;&#xD800;&#99999999;</b>" * 5}).encode()
    return b"   \t"  # blank-ish line


def test_fuzzed_lines_never_crash_and_counts_add_up(tmp_path):
    rng = random.Random(1234)
    lines: list[bytes] = []
    for i in range(600):
        line = json.dumps(good_record(rng, i)).encode()
        lines.append(corrupt(rng, line) if rng.random() < 0.5 else line)
    (tmp_path / "data.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "data.jsonl.gz").write_bytes(gzip.compress(b"\n".join(lines))[:-50])  # cut short too

    for paths in (["data.jsonl"], ["data.jsonl.gz"], ["data.jsonl*"]):
        p = prepare(make_spec(tmp_path, path=paths))
        c = p.counts
        parts = ("malformed", "empty_title", "empty", "too_short", "duplicate",
                 "train", "heldout", "train_capped", "heldout_capped")
        assert c["read"] == sum(c[k] for k in parts), c
        assert c["malformed"] == sum(v["count"] for v in c["bad_lines_by_reason"].values())
        assert c["malformed"] > 50 and c["train"] > 50
        assert all(len(v["first"]) <= 5 for v in c["bad_lines_by_reason"].values())
        # Whatever survived must be writable and readable (no lone surrogates etc.).
        out = tmp_path / ("out_" + str(len(paths[0])))
        write_prepared(p, out)
        back = read_prepared(out)
        assert back.train == p.train and back.heldout == p.heldout

    with pytest.raises(DataError, match=r"data\.jsonl:\d+: "):
        prepare(make_spec(tmp_path, strict=True))


def _write_huge_line_file(path: Path, size: int, gz: bool) -> None:
    head = json.dumps({"title": "Before", "content": "A perfectly fine description line."}).encode() + b"\n"
    tail = json.dumps({"title": "After", "content": "Another perfectly fine description."}).encode() + b"\n"
    opener = gzip.open if gz else open
    with opener(path, "wb") as fh:
        fh.write(head)
        fh.write(b'{"title": "huge", "content": "')
        chunk = b"abcdefgh " * (1 << 16)
        written = 0
        while written < size:
            fh.write(chunk)
            written += len(chunk)
        fh.write(b'"}\n')
        fh.write(tail)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_20mb_single_line_memory_is_bounded(tmp_path, gz):
    path = tmp_path / ("huge.jsonl.gz" if gz else "huge.jsonl")
    _write_huge_line_file(path, 20 << 20, gz)
    stats = ReadStats()
    tracemalloc.start()
    try:
        titles = [r.obj["title"] for r in iter_records([path], False, stats=stats)]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert titles == ["Before", "After"]
    assert stats.bad == {"line too long": 1} and stats.first["line too long"] == [f"{path.name}:2"]
    assert peak < 8 << 20, f"peak {peak / 2**20:.1f} MiB"

    tracemalloc.start()
    try:
        p = prepare(make_spec(tmp_path, path=[path.name]))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert p.counts["read"] == 3 and p.counts["malformed"] == 1
    assert peak < 8 << 20, f"peak {peak / 2**20:.1f} MiB"
