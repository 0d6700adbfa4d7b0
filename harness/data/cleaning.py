"""Cleaning product text: HTML entities and tags, control characters and Amazon's edition boilerplate out of
titles and descriptions; the normalized title that de-duplication and the split compare.
"""

from __future__ import annotations

import html
import re
import unicodedata
from typing import Any

_MAX_UNESCAPE_ROUNDS = 4  # `&amp;amp;#8217;` needs 3; more rounds would only eat literal text


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
    return title_key(clean_text(s))


def title_key(cleaned: str) -> str:
    """normalize_title for text that is already clean (prepare cleans each title once)."""
    s = unicodedata.normalize("NFKC", cleaned).casefold()
    return " ".join(s.translate(_TITLE_TABLE).split())


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
