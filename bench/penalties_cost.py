"""What the output penalties cost a decoding step: transformers' processors vs harness' fixed-shape ones.

Usage: python bench/penalties_cost.py [--rows 1,64,512] [--vocab 49152] [--generated 96] [--repeat 5]

For each row count: a random output of `--generated` tokens and random float32 scores over `--vocab`; times
transformers' RepetitionPenaltyLogitsProcessor(1.2) + NoRepeatNGramLogitsProcessor(4) on the output (what
harness passed to `generate` before) and `harness.scoring.decoding.output_penalties` (OutputPenalties, what
every engine uses now), checks that both give the same scores, and prints milliseconds a step and the ratio,
measured in this one process. Runs on CUDA when there is one (synchronised around each timing), else CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,64,512")
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--generated", type=int, default=96)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)

    import torch
    from transformers import LogitsProcessorList, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

    from harness.scoring.decoding import output_penalties
    from harness.spec import GenerationSpec

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = GenerationSpec(max_new_tokens=args.generated, repetition_penalty=1.2, no_repeat_ngram_size=4)
    library = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.2), NoRepeatNGramLogitsProcessor(4)])
    ours = output_penalties(gen, 0, device)

    def timed(processors, ids, scores) -> tuple[float, object]:
        result = None
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(args.repeat):
            result = processors(ids, scores.clone())
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - started) / args.repeat, result

    print(f"device {device}, vocab {args.vocab}, {args.generated} generated tokens a row, "
          f"repetition_penalty 1.2 + no_repeat_ngram_size 4, mean of {args.repeat} calls")
    generator = torch.Generator().manual_seed(0)
    for rows in (int(r) for r in args.rows.split(",")):
        # a small token range, so n-grams repeat and the ban acts
        ids = torch.randint(0, 200, (rows, args.generated), generator=generator).to(device)
        scores = torch.randn(rows, args.vocab, generator=generator).to(device)
        timed(ours, ids, scores)  # warm-up
        theirs_s, expected = timed(library, ids, scores)
        ours_s, got = timed(ours, ids, scores)
        if not torch.equal(got, expected):
            raise SystemExit(f"{rows} rows: the two implementations disagree")
        print(f"{rows:>5} rows: transformers {theirs_s * 1000:8.2f} ms, harness {ours_s * 1000:7.2f} ms, "
              f"ratio {theirs_s / ours_s:5.1f}x (same scores)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
