"""Where a decoding step of the graphs engine spends its time (issue 14: ~29 ms a step at 512 rows on an
H100, against ~0.9 ms to read the weights and the static cache once).

Usage: python bench/profile_decode.py [ROWS] [--set KEY=VALUE ...]

Decodes one batch of ROWS (default 512) demo prompts with the task's generation settings, eagerly
(the step the graphs engine captures, run uncaptured so the profiler sees every kernel), once with
scoring's deterministic kernels and once without, and prints the per-step wall time of each and
torch.profiler's table of the steps under deterministic kernels. CUDA gives the kernel table; on a
CPU it runs too (a smoke test of the script).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", nargs="?", type=int, default=512)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # as harness.cli does before any CUDA work

    import torch

    from harness import models
    from harness.data import records
    from harness.data.prompts import build_prompt, encode_prompt
    from harness.recipes.run import load_base_tokenizer
    from harness.scoring.generation import GenerationStats, bucket_width, deterministic_kernels, left_pad
    from harness.scoring.graph_decoding import GraphDecoder
    from harness.spec import load_spec

    spec = load_spec("amazon_desc", args.overrides)
    device = models.pick_device()
    model_ref, tokenizer = load_base_tokenizer(spec)
    model = models.load_model(model_ref, spec.model, tokenizer, device).eval()
    examples = list(records.prepare(spec).train)
    prompts = [build_prompt(tokenizer, spec.prompt, examples[i % len(examples)].title) for i in range(args.rows)]
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    width = bucket_width(max(len(e) for e in encoded), spec.generation.prompt_buckets)
    ids, mask = left_pad(encoded, tokenizer.pad_token_id, width)
    gen = replace(spec.generation, engine="graphs")
    steps = min(16, gen.max_new_tokens - 1)

    def sync():
        if device.kind == "cuda":
            torch.cuda.synchronize(device.index)

    def run_steps(decoder) -> float:
        decoder._new_shape(tuple(ids.shape))  # noqa: SLF001 (the bench drives the engine's own step)
        decoder._prefill(ids.to(device.torch_device), mask.to(device.torch_device))  # noqa: SLF001
        sync()
        started = time.perf_counter()
        for _ in range(steps):
            decoder._step()  # noqa: SLF001
        sync()
        return (time.perf_counter() - started) / steps

    print(f"device {device.torch_device}, {args.rows} rows x {width} prompt tokens, {steps} eager steps each")
    with torch.no_grad():
        for label, context in (("without deterministic kernels", nullcontext()),
                               ("with deterministic kernels (scoring)", deterministic_kernels())):
            with context:
                run_steps(GraphDecoder(model, tokenizer, gen, device, GenerationStats()))  # warm-up
                per_step = run_steps(GraphDecoder(model, tokenizer, gen, device, GenerationStats()))
            print(f"{label}: {per_step * 1000:.2f} ms a step, {args.rows / per_step:,.0f} tokens/s")
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.kind == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with deterministic_kernels(), torch.profiler.profile(activities=activities) as prof:
            run_steps(GraphDecoder(model, tokenizer, gen, device, GenerationStats()))
    sort = "cuda_time_total" if device.kind == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=70))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
