"""Counts behind the "reading the outputs" paragraphs of reports/amazon_desc/RESULTS.md, from a run folder's
predictions.jsonl: how many outputs (and references) open with a quotation mark or name a newspaper, and how
much of each title's wording an output repeats. Prints numbers only, never a record's text (the real records
are not to be copied into the repository).

    python bench/output_reading.py runs/<run-id>
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

# Review blurbs in the references and in tuned outputs credit papers by these names (read from the outputs).
NEWSPAPERS = ("Times", "Guardian", "Telegraph", "Observer", "Independent", "Daily Mail", "Express", "Sunday")
LONG_WORD = re.compile(r"[A-Za-z]{4,}")  # words of 4+ letters: a title's content words, not its "of"/"the"


def opens_with_quote(text: str) -> bool:
    return text.lstrip().startswith(("'", '"'))


def names_newspaper(text: str) -> bool:
    return any(name in text for name in NEWSPAPERS)


def title_word_recall(title: str, text: str) -> float:
    """Share of the title's long words (case-folded) that the text repeats."""
    words = {w.lower() for w in LONG_WORD.findall(title)}
    return len(words & {w.lower() for w in LONG_WORD.findall(text)}) / max(1, len(words))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    rows = [json.loads(line) for line in (parser.parse_args().run_dir / "predictions.jsonl").open(encoding="utf-8")]
    print(f"{len(rows)} held-out examples")
    for side in ("base", "tuned", "reference"):
        texts = [row[side] for row in rows]
        line = (f"{side}: opens with a quotation mark {sum(map(opens_with_quote, texts))}, "
                f"names a newspaper {sum(map(names_newspaper, texts))}")
        if side != "reference":
            recall = statistics.mean(title_word_recall(row["title"], row[side]) for row in rows)
            line += f", title-word recall {recall:.2f}"
        print(line)


if __name__ == "__main__":
    main()
