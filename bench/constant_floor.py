"""The constant-answer floor for predictions scored before the floor existed (issue 12).

Usage: python bench/constant_floor.py TASK PREDICTIONS.jsonl [--set KEY=VALUE ...]

Prepares TASK's data (the same split as the run that wrote PREDICTIONS.jsonl: same data.path, salt and
limits), takes the train split's most typical reference as `harness/scoring/constant_baseline.py` does,
and prints the floor block that `metrics.json` now carries (`constant_baseline`: the constant answer's
similarity scores and tuned minus them, paired, with 95% CIs), for the tuned texts of PREDICTIONS.jsonl
(and base's, against the same floor). Then, as a post-hoc look (never a selection), how many held-out
references another record carries word for word, and the mean ROUGE-L of tuned minus base on the others.
Prints figures only, never a record's text.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task")
    parser.add_argument("predictions", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)

    import numpy as np

    from harness.data import records
    from harness.scoring.constant_baseline import constant_baseline
    from harness.scoring.heldout_scoring import metric_settings
    from harness.scoring.metrics import ModelOutputs, per_example_scores, sufficient_stats
    from harness.spec import load_spec

    spec = load_spec(args.task, args.overrides)
    prepared = records.prepare(spec)
    rows = {json.loads(line)["id"]: json.loads(line) for line in args.predictions.open(encoding="utf-8")}
    heldout = [e for e in prepared.heldout if e.id in rows]
    if len(heldout) != len(rows):
        raise SystemExit(f"{args.predictions}: {len(rows)} predictions, {len(heldout)} of them in this held-out "
                         "split: not the same data settings")
    settings = metric_settings(spec)
    references = [e.content for e in heldout]
    zeros = np.zeros(len(heldout))
    print(f"{len(heldout)} held-out examples, {len(prepared.train)} train examples")
    for side in ("base", "tuned"):
        outputs = ModelOutputs([rows[e.id][side] for e in heldout], references, zeros, zeros + 1)
        block, absent = constant_baseline(prepared.train, outputs, sufficient_stats(outputs, settings), settings,
                                          [n for n in spec.metrics.names if n != "perplexity"])
        if absent:
            raise SystemExit(f"no floor: {absent}")
        print(f"{side}:")
        for name, delta in block["tuned_minus_baseline"].items():
            low, high = delta["ci95"]
            print(f"  {name:10s} constant answer {block[name]['value']:6.2f}  {side} minus it "
                  f"{delta['value']:+6.2f} [{low:+.2f}, {high:+.2f}]")
    print(f"constant answer: sha256 {block['text_sha256'][:12]}, {block['chars']} characters ({block['source']})")
    carried = collections.Counter(e.content for e in [*prepared.train, *prepared.heldout])
    rouge_l = {side: per_example_scores(ModelOutputs([rows[e.id][side] for e in heldout], references, zeros,
                                                     zeros + 1), settings)["rougeL"] for side in ("base", "tuned")}
    unshared = np.array([carried[e.content] == 1 for e in heldout])
    print(f"held-out references carried word for word by another record: {int((~unshared).sum())} of "
          f"{len(heldout)}; mean ROUGE-L tuned - base on all: {(rouge_l['tuned'] - rouge_l['base']).mean():+.2f}, "
          f"on the {int(unshared.sum())} others: {(rouge_l['tuned'] - rouge_l['base'])[unshared].mean():+.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
