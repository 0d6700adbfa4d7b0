"""Numbered titles from a `.txt` file (one title a line), a `.jsonl` file (objects with a title
field) or stdin, for `harness generate --input`.

A bad line does not stop the job: it comes back with the reason it has no title, so the
caller can name it (`titles.jsonl:7: invalid JSON ...`) and describe the rest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from harness.errors import DataError

JSONL_SUFFIXES = (".jsonl", ".ndjson")


@dataclass(frozen=True)
class TitleLine:
    number: int  # 1-based, as editors and `sed -n Np` count
    title: str | None
    problem: str | None = None  # why the line has no usable title


def is_jsonl(path: Path) -> bool:
    """JSON Lines by suffix; a `.json` file (one document, not one per line) is refused."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        raise DataError(f"{path}: --input takes .txt (one title a line) or .jsonl (one object a line), not .json")
    return suffix in JSONL_SUFFIXES


def read_title_lines(stream: BinaryIO, jsonl: bool, title_field: str = "title") -> Iterator[TitleLine]:
    """Every line of `stream` as a TitleLine, streamed (a large file is never held whole)."""
    for number, raw in enumerate(stream, 1):
        try:
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8").rstrip("\r\n")
        except UnicodeDecodeError as exc:
            yield TitleLine(number, None, f"not UTF-8 (byte {exc.start + 1})")
            continue
        if not text.strip():
            yield TitleLine(number, None, "blank line")
        elif jsonl:
            yield _json_title(number, text, title_field)
        else:
            yield TitleLine(number, text)


def _json_title(number: int, text: str, field: str) -> TitleLine:
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        return TitleLine(number, None, f"invalid JSON ({exc.msg} at column {exc.colno})")
    if not isinstance(row, dict):
        return TitleLine(number, None, f"a JSON {_json_kind(row)}, not an object with a '{field}' field")
    if field not in row:
        return TitleLine(number, None, f"no '{field}' field" + ("" if field != "title" else
                                                                " (name another with --title-field)"))
    if not isinstance(row[field], str):
        return TitleLine(number, None, f"'{field}' is a JSON {_json_kind(row[field])}, not a string")
    return TitleLine(number, row[field])


def _json_kind(value) -> str:
    """JSON's name for a parsed value's type (what the user wrote), not Python's."""
    if value is None:
        return "null"
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "array"}.get(type(value), "object")
