"""Leakage between train and held-out: the held-out score means nothing if the model saw the answers.

The split hashes the normalized title, so an exact leak should be impossible; this check proves
it for every run (and catches a hand-made split that breaks it). Near-exact leaks — the same
product as another edition or format ("Dune (Paperback)" vs "Dune - Hardcover") — are counted
and listed so the report can show them; they do not fail the run.
"""

from __future__ import annotations

import re

from harness.data.cleaning import normalize_title
from harness.errors import DataError

# Edition/format words that mark the same product in another binding or release.
_FORMAT_WORDS = (
    "paperback|hardcover|hardback|kindle edition|kindle|audio cd|audiobook|audio cassette|mass market paperback|"
    "board book|library binding|spiral bound|vhs|dvd|blu ray|cd|vinyl|lp|import|unabridged|abridged|"
    "large print|reprint|revised|illustrated|annotated|special edition|collectors edition|deluxe edition|"
    r"\d+(?:st|nd|rd|th) edition|edition|volume \d+|vol \d+|set of \d+|pack of \d+|\d+ pack"
)
_FORMAT_SUFFIX = re.compile(rf"(?:\s+(?:{_FORMAT_WORDS}))+$")


def near_key(title: str) -> str:
    """The normalized title without trailing edition/format words."""
    key = normalize_title(title)
    stripped = _FORMAT_SUFFIX.sub("", key).strip()
    return stripped or key


def leakage_report(train, heldout, max_listed: int = 20) -> dict:
    """Counts of held-out titles found in train exactly and near-exactly, with examples."""
    train_exact = {normalize_title(e.title) for e in train}
    train_near: dict[str, str] = {}
    for e in train:
        train_near.setdefault(near_key(e.title), e.title)
    exact, near = [], []
    for e in heldout:
        if normalize_title(e.title) in train_exact:
            exact.append(e.title)
        elif near_key(e.title) in train_near:
            near.append({"heldout": e.title, "train": train_near[near_key(e.title)]})
    return {"heldout": len(heldout), "exact": len(exact), "near": len(near),
            "exact_examples": exact[:max_listed], "near_examples": near[:max_listed]}


def assert_no_exact_leak(report: dict) -> None:
    if report["exact"]:
        raise DataError(f"{report['exact']} held-out title(s) also appear in train, e.g. "
                        f"{report['exact_examples'][0]!r}: the held-out score would be meaningless")
