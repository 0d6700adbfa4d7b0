"""Tests for harness.data.records (cleaning, reading, de-duplication, split, caps, counts) and harness.io."""

from __future__ import annotations

import errno
import gzip
import json
import os
from pathlib import Path

import pytest

import harness.io as hio
from harness.data import reading
from harness.data.cleaning import clean_text, normalize_title, truncate_words
from harness.data.prepared import Example, PreparedData, read_prepared, write_prepared
from harness.data.reading import ReadStats, iter_records
from harness.data.records import format_counts, prepare
from harness.data.splitting import split_value, title_hash
from harness.errors import DataError, RunError
from harness.io import atomic_write_json, atomic_write_text
from harness.spec import TaskSpec, build

SHARED = Path(__file__).parents[2] / "shared" / "data"
LONG = "A sturdy and reliable product that works well for everyday use at home."


def make_spec(tmp_path: Path, **data_overrides) -> TaskSpec:
    data = {"path": ["data.jsonl"], **data_overrides}
    spec = build(TaskSpec, {"name": "test", "data": data}, "")
    spec.base_dir = str(tmp_path)
    return spec


def rec(title, content=LONG, uid=None) -> dict:
    out = {"title": title, "content": content}
    if uid is not None:
        out["uid"] = uid
    return out


def write_jsonl(path: Path, rows, gz: bool = False) -> Path:
    lines = [r if isinstance(r, (bytes, str)) else json.dumps(r) for r in rows]
    blob = b"".join((x if isinstance(x, bytes) else x.encode("utf-8")) + b"\n" for x in lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(blob) if gz else blob)
    return path


def assert_counts_add_up(c: dict) -> None:
    parts = ("malformed", "empty_title", "empty", "too_short", "duplicate",
             "train", "heldout", "train_capped", "heldout_capped")
    assert c["read"] == sum(c[k] for k in parts), c
    assert c["malformed"] == sum(v["count"] for v in c["bad_lines_by_reason"].values())


def many(n: int, start: int = 0) -> list[dict]:
    return [rec(f"Product number {i} deluxe edition", f"{LONG} Variant {i}.") for i in range(start, start + n)]


# ------------------------------------------------------------------------------------------
# clean_text / normalize_title
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Tom &amp; Jerry &quot;toy&quot; &mdash; fun", 'Tom & Jerry "toy" \u2014 fun'),
        ("Kerr&#8217;s best&#8211;selling", "Kerr\u2019s best\u2013selling"),
        ("it&#x2019;s &#X201C;ok&#x201d;", "it\u2019s \u201cok\u201d"),
        ("don&#x92;t", "don\u2019t"),  # cp1252 junk per HTML5
        ("ages 6&#150;8 &#151; fun", "ages 6\u20138 \u2014 fun"),
        ("don&amp;#8217;t", "don\u2019t"),  # double-escaped
        ("&amp;amp;quot;hi&amp;amp;quot;", '"hi"'),  # triple-escaped
        ("a&nbsp;b&#160;c&#xA0;d", "a b c d"),
        ("line one<br>line two<br/>three<BR />four", "line one line two three four"),
        ("<p>Para</p><p>graph</p>", "Para graph"),
        ('<div class="aplus"><b>Bold</b>ly 5<sup>th</sup></div>', "Boldly 5th"),
        ("&lt;br&gt;escaped tag", "escaped tag"),
        ("a <!-- comment --> b", "a b"),
        ("size < 5 inches and x>y", "size < 5 inches and x>y"),
        ("  lots \t of\n\n  space\r\n ", "lots of space"),
        ("nul\x00l and bell\x07 and del\x7f", "null and bell and del"),
        ("zero\u200bwidth soft\u00adhyphen", "zerowidth softhyphen"),
        ("raw c1 don\x92t", "raw c1 don\u2019t"),
        ("bad &#0;ref", "bad ref"),
        ("lone \ud800surrogate", "lone surrogate"),
        ("cafe\u0301", "caf\u00e9"),  # NFC
        ("Great read.--This text refers to theHardcoveredition.", "Great read."),
        ("Fun.--This text refers to an out of print or unavailable edition of this title.", "Fun."),
        ("Nice -- this TEXT refers to an alternatePaperbackedition.", "Nice"),
        ("A.--This text refers to theKindleedition. B.", "A. B."),
        ("The title refers to a site near Norfolk.", "The title refers to a site near Norfolk."),
        ("", ""),
        ("&amp;", "&"),
        ("AT&T and R&D", "AT&T and R&D"),
    ],
)
def test_clean_text(raw, expected):
    assert clean_text(raw) == expected


def test_clean_text_is_idempotent():
    s = "Kerr&amp;#8217;s <b>best</b>&#150;seller.--This text refers to theHardcoveredition."
    once = clean_text(s)
    assert clean_text(once) == once


def test_normalize_title():
    assert normalize_title("Mog&#8217;s Kittens!") == "mogs kittens"
    assert normalize_title("MOG'S   kittens") == normalize_title("Mogs Kittens.")
    assert normalize_title("Spider-Man: Homecoming") == normalize_title("spider man homecoming")
    assert normalize_title("Sony\u00ae TV") == normalize_title("sony tv")
    assert normalize_title("C++ Primer") != normalize_title("C Primer")
    assert normalize_title("\uff21\uff22\uff23 Book") == "abc book"  # full-width -> NFKC
    assert normalize_title("!!!") == ""


def test_truncate_words():
    assert truncate_words("short", 10) == "short"
    assert truncate_words("hello brave new world", 13) == "hello brave"
    assert truncate_words("hello brave new world", 11) == "hello brave"
    assert truncate_words("x" * 50, 10) == "x" * 10  # one huge word: hard cut


# ------------------------------------------------------------------------------------------
# prepare: filters, dedupe, split, caps, counts
# ------------------------------------------------------------------------------------------


def test_prepare_filters_and_counts(tmp_path):
    rows = [
        rec("Alpha", LONG, uid="A1"),
        rec("Beta", ""),
        rec("Gamma", "   &nbsp; <br> "),  # empty after cleaning
        rec("Delta", "Too short."),
        rec("alpha!", LONG + " again"),  # duplicate of Alpha after normalization
        rec("&#8230;", LONG),  # title empty after normalization
        rec("Epsilon", "x " * 2000),
    ]
    write_jsonl(tmp_path / "data.jsonl", rows)
    p = prepare(make_spec(tmp_path, heldout_fraction=0.5, max_content_chars=100))
    c = p.counts
    assert (c["read"], c["empty"], c["too_short"], c["duplicate"], c["empty_title"]) == (7, 2, 1, 1, 1)
    assert c["train"] + c["heldout"] == 2
    assert_counts_add_up(c)
    kept = {e.title: e for e in p.train + p.heldout}
    assert kept["Alpha"].id == "A1" and kept["Alpha"].source == "data.jsonl:1"
    assert kept["Alpha"].content == LONG
    assert kept["Epsilon"].id == "data:7"  # no uid -> file-stem:line
    assert len(kept["Epsilon"].content) <= 100 and not kept["Epsilon"].content.endswith(" ")


def test_dedupe_keeps_first_usable_occurrence(tmp_path):
    rows = [rec("Widget", ""), rec("WIDGET", "First usable description of the widget."),
            rec("widget.", "Second usable description of the widget.")]
    write_jsonl(tmp_path / "data.jsonl", rows)
    p = prepare(make_spec(tmp_path))
    (only,) = p.train + p.heldout
    assert only.source == "data.jsonl:2" and only.content.startswith("First")
    assert p.counts["duplicate"] == 1 and p.counts["empty"] == 1


def test_split_deterministic_and_salted(tmp_path):
    write_jsonl(tmp_path / "data.jsonl", many(400))
    a = prepare(make_spec(tmp_path))
    b = prepare(make_spec(tmp_path))
    assert a.train == b.train and a.heldout == b.heldout and a.counts == b.counts
    c = prepare(make_spec(tmp_path, split_salt="other-salt"))
    assert {e.title for e in c.heldout} != {e.title for e in a.heldout}
    assert 0.08 < len(a.heldout) / 400 < 0.25
    frac = len(prepare(make_spec(tmp_path, heldout_fraction=0.5)).heldout) / 400
    assert 0.4 < frac < 0.6


def test_no_leakage_and_variants_share_a_side(tmp_path):
    rows = many(300)
    # Variants of earlier titles that differ only in case/punctuation.
    rows += [rec(r["title"].upper() + "!", "A different description for the same product.") for r in rows[:100]]
    write_jsonl(tmp_path / "data.jsonl", rows)
    p = prepare(make_spec(tmp_path))
    train_keys = {normalize_title(e.title) for e in p.train}
    held_keys = {normalize_title(e.title) for e in p.heldout}
    assert not train_keys & held_keys
    assert p.counts["duplicate"] == 100
    for r in rows[:100]:
        assert split_value(normalize_title(r["title"]), "harness-v1") == split_value(
            normalize_title(r["title"].upper() + "!"), "harness-v1")


def test_adding_rows_never_moves_existing_rows(tmp_path):
    write_jsonl(tmp_path / "data.jsonl", many(200))
    before = prepare(make_spec(tmp_path))
    write_jsonl(tmp_path / "data.jsonl", many(200) + many(300, start=200))
    after = prepare(make_spec(tmp_path))
    assert {e.title for e in before.train} <= {e.title for e in after.train}
    assert {e.title for e in before.heldout} <= {e.title for e in after.heldout}
    # Prepending instead of appending: sides still unchanged (split depends on the title only).
    write_jsonl(tmp_path / "data.jsonl", many(300, start=200) + many(200))
    shuffled = prepare(make_spec(tmp_path))
    assert {e.title for e in shuffled.heldout} == {e.title for e in after.heldout}


def test_split_value_range():
    vals = [split_value(f"title {i}", "s") for i in range(2000)]
    assert all(0.0 <= v < 1.0 for v in vals)
    assert 0.4 < sum(vals) / len(vals) < 0.6


def test_caps_keep_smallest_hashes_in_file_order(tmp_path):
    write_jsonl(tmp_path / "data.jsonl", many(300))
    full = prepare(make_spec(tmp_path))
    capped = prepare(make_spec(tmp_path, max_train=20, max_heldout=5))
    c = capped.counts
    assert (c["train"], c["heldout"]) == (20, 5)
    assert c["train_capped"] == len(full.train) - 20 and c["heldout_capped"] == len(full.heldout) - 5
    assert_counts_add_up(c)

    def h(e):
        return title_hash(normalize_title(e.title), "harness-v1")

    assert {h(e) for e in capped.train} == set(sorted(h(e) for e in full.train)[:20])
    assert {h(e) for e in capped.heldout} == set(sorted(h(e) for e in full.heldout)[:5])
    for side in (capped.train, capped.heldout):
        lines = [int(e.source.rsplit(":", 1)[1]) for e in side]
        assert lines == sorted(lines)
    # Adding rows: the capped set only changes by rows with smaller hashes entering.
    write_jsonl(tmp_path / "data.jsonl", many(300) + many(300, start=300))
    grown = prepare(make_spec(tmp_path, max_train=20, max_heldout=5))
    old = {h(e) for e in capped.train}
    new = {h(e) for e in grown.train}
    assert all(x < min(old - new) for x in new - old) if old - new else new == old


def test_cap_zero(tmp_path):
    write_jsonl(tmp_path / "data.jsonl", many(50))
    p = prepare(make_spec(tmp_path, max_heldout=0))
    assert p.heldout == [] and p.counts["heldout_capped"] > 0
    assert_counts_add_up(p.counts)


def test_no_usable_records_is_a_data_error(tmp_path):
    write_jsonl(tmp_path / "data.jsonl", [rec("A", ""), rec("B", "short")])
    with pytest.raises(DataError, match="no usable records"):
        prepare(make_spec(tmp_path))


def test_field_names_from_spec(tmp_path):
    rows = [{"asin": "B00X", "name": "Guitar Strings", "desc": LONG}, {"name": "Capo", "desc": LONG}]
    write_jsonl(tmp_path / "meta.jsonl", rows)
    spec = make_spec(tmp_path, path=["meta.jsonl"], title_field="name", content_field="desc", id_field="asin")
    p = prepare(spec)
    assert sorted(e.id for e in p.train + p.heldout) == ["B00X", "meta:2"]


# ------------------------------------------------------------------------------------------
# Reader: formats, paths, bad input
# ------------------------------------------------------------------------------------------


def read_all(paths, strict=False, **kw):
    stats = ReadStats()
    recs = list(iter_records([Path(p) for p in paths], strict, stats=stats, **kw))
    return recs, stats


def test_gzip_by_magic_not_extension(tmp_path):
    rows = many(5)
    a = write_jsonl(tmp_path / "a.jsonl.gz", rows, gz=True)
    b = write_jsonl(tmp_path / "b.jsonl", rows, gz=True)  # gzip without .gz name
    c = write_jsonl(tmp_path / "c.jsonl.gz", rows)  # plain with .gz name
    for path in (a, b, c):
        recs, stats = read_all([path])
        assert [r.obj["title"] for r in recs] == [r["title"] for r in rows]
        assert stats.read == 5 and stats.malformed == 0


def test_truncated_gzip_keeps_what_was_read(tmp_path):
    rows = [rec(f"Item {i} " + "word " * 40) for i in range(3000)]
    path = write_jsonl(tmp_path / "data.jsonl.gz", rows, gz=True)
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    recs, stats = read_all([path])
    assert 0 < len(recs) < 3000
    assert stats.bad == {"truncated gzip": 1}
    assert stats.read == len(recs) + 1
    assert stats.first["truncated gzip"] == [f"data.jsonl.gz:{len(recs) + 1}"]
    with pytest.raises(DataError, match=r"data\.jsonl\.gz:\d+: truncated gzip$"):
        read_all([path], strict=True)


def test_corrupt_gzip(tmp_path):
    path = tmp_path / "data.jsonl.gz"
    path.write_bytes(b"\x1f\x8b" + b"\x00garbage" * 20)
    recs, stats = read_all([path])
    assert recs == [] and set(stats.bad) == {"corrupt gzip"}


def test_bom_crlf_blank_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    body = b"\xef\xbb\xbf" + json.dumps(rec("One")).encode() + b"\r\n\r\n   \r\n" + json.dumps(rec("Two")).encode() + b"\r\n"
    path.write_bytes(body)
    for strict in (False, True):
        recs, stats = read_all([path], strict=strict)
        assert [r.obj["title"] for r in recs] == ["One", "Two"]
        assert [r.line_no for r in recs] == [1, 4]
        assert stats.read == 2 and stats.malformed == 0


def test_bom_only_at_file_start(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [rec("One"), b"\xef\xbb\xbf" + json.dumps(rec("Two")).encode()])
    recs, stats = read_all([path])
    assert len(recs) == 1 and stats.bad == {"invalid JSON": 1}


def test_empty_file(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "empty.jsonl.gz").write_bytes(gzip.compress(b""))
    recs, stats = read_all([tmp_path / "empty.jsonl", tmp_path / "empty.jsonl.gz"], strict=True)
    assert recs == [] and stats.read == 0 and stats.malformed == 0
    write_jsonl(tmp_path / "data.jsonl", many(10))
    p = prepare(make_spec(tmp_path, path=["empty.jsonl", "data.jsonl"]))
    assert p.counts["read"] == 10


BAD_LINES = [
    ("invalid JSON", b'{"title": "Cut", "content": "A line cut short in the mid'),
    ("invalid JSON", b"{not json at all}"),
    ("not a JSON object", b'["title", "content"]'),
    ("not a JSON object", b'"just a string"'),
    ("missing field 'title'", json.dumps({"content": LONG}).encode()),
    ("missing field 'content'", json.dumps({"title": "No content"}).encode()),
    ("null field 'title'", json.dumps({"title": None, "content": LONG}).encode()),
    ("null field 'content'", json.dumps({"title": "Null", "content": None}).encode()),
    ("non-string field 'title'", json.dumps({"title": 12345, "content": LONG}).encode()),
    ("non-string field 'content'", json.dumps({"title": "Num", "content": 3.5}).encode()),
    ("non-string field 'content'", json.dumps({"title": "List", "content": ["a"]}).encode()),
    ("invalid UTF-8", b'{"title": "Bad \xff\xfe bytes", "content": "' + LONG.encode() + b'"}'),
    ("NUL byte", b'{"title": "Nul\x00", "content": "' + LONG.encode() + b'"}'),
]


@pytest.mark.parametrize("reason, line", BAD_LINES, ids=[f"{r}-{i}" for i, (r, _) in enumerate(BAD_LINES)])
def test_bad_line_default_and_strict(tmp_path, reason, line):
    path = write_jsonl(tmp_path / "data.jsonl", [rec("Good one"), line, rec("Good two")])
    recs, stats = read_all([path])
    assert [r.obj["title"] for r in recs] == ["Good one", "Good two"]
    assert stats.read == 3
    assert stats.bad == {reason: 1} and stats.first == {reason: ["data.jsonl:2"]}
    p = prepare(make_spec(tmp_path))
    assert p.counts["malformed"] == 1
    assert p.counts["bad_lines_by_reason"] == {reason: {"count": 1, "first": ["data.jsonl:2"]}}
    assert_counts_add_up(p.counts)
    with pytest.raises(DataError) as exc:
        prepare(make_spec(tmp_path, strict=True))
    assert str(exc.value) == f"{path}:2: {reason}"


def test_first_locations_capped_at_five(tmp_path):
    write_jsonl(tmp_path / "data.jsonl", [rec("ok")] + [b"{bad"] * 8)
    _, stats = read_all([tmp_path / "data.jsonl"])
    assert stats.bad == {"invalid JSON": 8}
    assert stats.first["invalid JSON"] == [f"data.jsonl:{i}" for i in range(2, 7)]


def test_over_long_line_is_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(reading, "MAX_LINE_BYTES", 500)
    long_line = json.dumps(rec("Huge", "word " * 5000)).encode()
    path = write_jsonl(tmp_path / "data.jsonl", [rec("Before"), long_line, rec("After")])
    recs, stats = read_all([path])
    assert [(r.obj["title"], r.line_no) for r in recs] == [("Before", 1), ("After", 3)]
    assert stats.bad == {"line too long": 1} and stats.first["line too long"] == ["data.jsonl:2"]
    with pytest.raises(DataError, match=r"data\.jsonl:2: line too long$"):
        read_all([path], strict=True)
    # Same through gzip, and an over-long last line without a newline.
    gz = write_jsonl(tmp_path / "data2.jsonl.gz", [rec("Before"), long_line, rec("After")], gz=True)
    assert [r.obj["title"] for r in read_all([gz])[0]] == ["Before", "After"]
    (tmp_path / "tail.jsonl").write_bytes(json.dumps(rec("Before")).encode() + b"\n" + long_line)
    recs, stats = read_all([tmp_path / "tail.jsonl"])
    assert len(recs) == 1 and stats.bad == {"line too long": 1}


def test_real_size_limit_line(tmp_path):
    line = json.dumps(rec("Huge", "x" * (reading.MAX_LINE_BYTES + 10))).encode()
    path = write_jsonl(tmp_path / "data.jsonl", [line, rec("After")])
    recs, stats = read_all([path])
    assert [r.line_no for r in recs] == [2] and stats.bad == {"line too long": 1}


@pytest.mark.parametrize("strict", [False, True])
def test_missing_path_and_folder(tmp_path, strict):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        read_all([tmp_path / "nope.jsonl"], strict=strict)
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match=r"folder: is a folder"):
        read_all([tmp_path / "folder"], strict=strict)
    with pytest.raises(DataError, match=r"zzz_\*\.jsonl: no files match"):
        read_all([tmp_path / "zzz_*.jsonl"], strict=strict)
    with pytest.raises(DataError, match="nope.jsonl"):
        prepare(make_spec(tmp_path, path=["nope.jsonl"], strict=strict))


def test_glob_sorted_and_counts_add(tmp_path):
    write_jsonl(tmp_path / "data" / "part_b.jsonl", many(30, start=100))
    write_jsonl(tmp_path / "data" / "part_a.jsonl", many(40))
    recs, _ = read_all([tmp_path / "data" / "part_*.jsonl"])
    assert [r.file for r in recs] == ["part_a.jsonl"] * 40 + ["part_b.jsonl"] * 30
    both = prepare(make_spec(tmp_path, path=["data/part_*.jsonl"]))
    a = prepare(make_spec(tmp_path, path=["data/part_a.jsonl"]))
    b = prepare(make_spec(tmp_path, path=["data/part_b.jsonl"]))
    for key in ("read", "train", "heldout", "empty", "too_short"):
        assert both.counts[key] == a.counts[key] + b.counts[key]
    # The same file listed twice (directly and by glob) is read once.
    again = prepare(make_spec(tmp_path, path=["data/part_a.jsonl", "data/part_*.jsonl"]))
    assert again.counts == both.counts


# ------------------------------------------------------------------------------------------
# Real shared records (read from ../shared/data, never copied)
# ------------------------------------------------------------------------------------------

needs_shared = pytest.mark.skipif(not (SHARED / "amazon_titles_sample.jsonl").is_file(),
                                  reason="shared real data not present")


@needs_shared
def test_real_sample_prepares_plausibly(tmp_path):
    p = prepare(make_spec(tmp_path, path=[str(SHARED / "amazon_titles_sample.jsonl")]))
    c = p.counts
    assert c["read"] == 449 and c["malformed"] == 0
    assert_counts_add_up(c)
    kept = c["train"] + c["heldout"]
    assert kept > 400 and 0.08 < c["heldout"] / kept < 0.25
    for e in p.train + p.heldout:
        assert "&#" not in e.content and "&amp;" not in e.content and "<br" not in e.content
        assert "this text refers to" not in e.content.lower()
        assert len(e.content) <= 1200 and e.content == e.content.strip()
    assert len({normalize_title(e.title) for e in p.train + p.heldout}) == kept


@needs_shared
def test_real_files_counts_add_across_files_and_glob(tmp_path):
    names = ["amazon_titles_sample.jsonl", "amazon_titles_more.jsonl"]
    singles = [prepare(make_spec(tmp_path, path=[str(SHARED / n)])).counts for n in names]
    listed = prepare(make_spec(tmp_path, path=[str(SHARED / n) for n in names])).counts
    globbed = prepare(make_spec(tmp_path, path=[str(SHARED / "amazon_titles_*.jsonl")])).counts
    assert singles[1]["read"] == 346
    for key in ("read", "train", "heldout", "empty", "too_short", "malformed"):
        assert listed[key] == globbed[key] == singles[0][key] + singles[1][key]
    assert_counts_add_up(listed)


@needs_shared
def test_real_meta_sample_with_spec_fields(tmp_path):
    p = prepare(make_spec(tmp_path, path=[str(SHARED / "amazon_meta_sample.jsonl")], id_field="asin"))
    assert p.counts["read"] == 70
    assert_counts_add_up(p.counts)
    ids = [e.id for e in p.train + p.heldout]
    assert all(":" not in i for i in ids)  # every record has an asin
    assert not any("<br" in e.content or "</a>" in e.content for e in p.train + p.heldout)


# ------------------------------------------------------------------------------------------
# Writing / reading prepared data, atomic writes
# ------------------------------------------------------------------------------------------


def test_write_read_prepared_roundtrip(tmp_path):
    write_jsonl(tmp_path / "data.jsonl", many(60) + [rec("Unicode \u2019\u00e9\u4e2d", LONG), b"{bad"])
    p = prepare(make_spec(tmp_path))
    out = tmp_path / "prepared"
    write_prepared(p, out)
    assert sorted(x.name for x in out.iterdir()) == ["data_counts.json", "heldout.jsonl", "train.jsonl"]
    back = read_prepared(out)
    assert back.train == p.train and back.heldout == p.heldout and back.counts == p.counts
    first = json.loads((out / "train.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert list(first) == ["id", "title", "content", "source"]


def test_read_prepared_missing_or_damaged(tmp_path):
    with pytest.raises(RunError, match="data_counts.json: missing"):
        read_prepared(tmp_path)
    write_prepared(PreparedData([Example("1", "t", "c", "f:1")], [], {"read": 1}), tmp_path)
    (tmp_path / "heldout.jsonl").write_text("{broken\n")
    with pytest.raises(RunError, match=r"heldout.jsonl:1"):
        read_prepared(tmp_path)


def test_format_counts(tmp_path):
    write_jsonl(tmp_path / "data.jsonl", many(20) + [b"{bad", b"[1]"])
    text = format_counts(prepare(make_spec(tmp_path)).counts)
    lines = text.splitlines()
    assert lines[0].split() == ["read", "22"]
    assert any(line.split()[:2] == ["malformed", "2"] for line in lines)
    assert "invalid JSON: 1 (first: data.jsonl:21)" in text
    assert "not a JSON object: 1 (first: data.jsonl:22)" in text


def test_atomic_write_text_and_json(tmp_path):
    target = tmp_path / "sub" / "out.json"
    atomic_write_json(target, {"b": 1, "a": [1.5, "\u2019"]})
    assert target.read_text(encoding="utf-8") == '{\n  "b": 1,\n  "a": [\n    1.5,\n    "\u2019"\n  ]\n}\n'
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]


def test_atomic_write_json_rejects_nan(tmp_path):
    with pytest.raises(ValueError, match="out.json"):
        atomic_write_json(tmp_path / "out.json", {"x": float("nan")})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("err, words", [(errno.ENOSPC, "disk full"), (errno.EACCES, "permission denied"),
                                        (errno.EROFS, "read-only file system")])
@pytest.mark.parametrize("where", ["fsync", "replace", "mkstemp"])
def test_atomic_write_failure_leaves_no_partial_file(tmp_path, monkeypatch, err, words, where):
    target = tmp_path / "metrics.json"
    target.write_text("old content")

    def boom(*a, **k):
        raise OSError(err, os.strerror(err))

    if where == "fsync":
        monkeypatch.setattr(hio.os, "fsync", boom)
    elif where == "replace":
        monkeypatch.setattr(hio.os, "replace", boom)
    else:
        monkeypatch.setattr(hio.tempfile, "mkstemp", boom)
    with pytest.raises(RunError) as exc:
        atomic_write_text(target, "new content " * 1000)
    assert str(exc.value) == f"cannot write {target}: {words}"
    assert target.read_text() == "old content"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_write_prepared_failure_midway_leaves_no_temp(tmp_path, monkeypatch):
    p = PreparedData([Example(str(i), f"t{i}", "c", f"f:{i}") for i in range(100)], [], {"read": 100})
    real_dumps = json.dumps
    calls = {"n": 0}

    def flaky_dumps(*a, **k):
        calls["n"] += 1
        if calls["n"] == 50:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_dumps(*a, **k)

    monkeypatch.setattr(json, "dumps", flaky_dumps)
    with pytest.raises(RunError, match=r"train.jsonl: disk full"):
        write_prepared(p, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []
