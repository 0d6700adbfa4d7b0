import pytest

from harness.data.leakage import assert_no_exact_leak, leakage_report, near_key
from harness.data.prepared import Example
from harness.errors import DataError


def ex(title: str) -> Example:
    return Example(id=title, title=title, content="c", source="t:1")


def test_near_key_strips_edition_and_format_suffixes():
    assert near_key("Dune (Paperback)") == near_key("DUNE - Hardcover") == near_key("Dune, 2nd Edition") == "dune"
    assert near_key("Paperback") == "paperback"  # never strips a title down to nothing
    assert near_key("Garlic Press") != near_key("Garlic Crusher")


def test_exact_and_near_leaks_are_counted_and_exact_fails():
    train = [ex("Dune (Paperback)"), ex("Garlic Press"), ex("Rain Boots")]
    report = leakage_report(train, [ex("Dune - Hardcover"), ex("garlic press!"), ex("Wool Socks")])
    assert (report["exact"], report["near"], report["heldout"]) == (1, 1, 3)
    assert report["near_examples"] == [{"heldout": "Dune - Hardcover", "train": "Dune (Paperback)"}]
    with pytest.raises(DataError, match="1 held-out title\\(s\\) also appear in train"):
        assert_no_exact_leak(report)
    assert_no_exact_leak(leakage_report(train, [ex("Wool Socks")]))


def test_the_hash_split_never_leaks_on_the_demo_data(tiny_run):
    import json

    manifest = json.loads((tiny_run / "manifest.json").read_text())
    assert manifest["leakage"]["exact"] == 0 and manifest["leakage"]["heldout"] == 8
