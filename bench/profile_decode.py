"""Where a decoding step of the graphs engine spends its time (issue 14: at 512 rows on an H100 a captured
step took 24 ms under scoring's kernels; what this showed brought it to 6.3 ms: bench/RESULTS.md).

Usage: python bench/profile_decode.py [ROWS] [--tables DIR] [--set KEY=VALUE ...]

Decodes one batch of ROWS (default 512) demo prompts with the task's generation settings, eagerly
(the step the graphs engine captures, run uncaptured so the profiler sees every kernel), under three
kernel settings: none (PyTorch's defaults), scoring's deterministic kernels (deterministic algorithms,
SDPA restricted), and the graphs engine's own (SDPA restricted, deterministic algorithms off). Prints
each one's time a step (eager, and captured as the engine replays it), how many rows decoded the same
tokens as under PyTorch's defaults and as under scoring's kernels, and
torch.profiler's table of the steps under scoring's kernels and under the engine's (`--tables DIR`
also writes them whole). CUDA gives the kernel table; on a CPU it runs too (a smoke test).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", nargs="?", type=int, default=512)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--tables", help="folder to write the whole profiler tables to")
    args = parser.parse_args(argv)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # as harness.cli does before any CUDA work

    import torch

    from harness import devices, models
    from harness.data import records
    from harness.data.prompts import build_prompt, encode_prompt
    from harness.recipes.run import load_base_tokenizer
    from harness.scoring.decoding import GenerationStats, deterministic_algorithms, deterministic_kernels
    from harness.scoring.generation import bucket_width, left_pad
    from harness.scoring.graph_decoding import WARMUP_STEPS, GraphDecoder
    from harness.spec import load_spec

    spec = load_spec("amazon_desc", args.overrides)
    device = devices.pick_device()
    model_ref, tokenizer = load_base_tokenizer(spec)
    model = models.load_model(model_ref, spec.model, tokenizer, device).eval()
    examples = list(records.prepare(spec).train)
    prompts = [build_prompt(tokenizer, spec.prompt, examples[i % len(examples)].title) for i in range(args.rows)]
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    width = bucket_width(max(len(e) for e in encoded), spec.generation.prompt_buckets)
    ids, mask = left_pad(encoded, tokenizer.pad_token_id, width)
    gen = replace(spec.generation, engine="graphs")
    steps = min(16, gen.max_new_tokens - 1)

    @contextmanager
    def engine_kernels():  # what GraphDecoder.__call__ runs its steps under, inside scoring's kernels
        with deterministic_kernels(), deterministic_algorithms(False):
            yield

    def sync():
        if device.kind == "cuda":
            torch.cuda.synchronize(device.index)

    def replayed_steps(decoder) -> float:
        """Seconds a step as the engine runs it: warm-up, capture, then timed replays (CPU: eager)."""
        decoder._new_shape(tuple(ids.shape))  # noqa: SLF001
        decoder._prefill(ids.to(device.torch_device), mask.to(device.torch_device))  # noqa: SLF001
        for step in range(1, WARMUP_STEPS + 2):
            decoder._advance(step)  # noqa: SLF001 (the last one captures, then replays)
        sync()
        started = time.perf_counter()
        for step in range(WARMUP_STEPS + 2, WARMUP_STEPS + 2 + steps):
            decoder._advance(step)  # noqa: SLF001
        sync()
        return (time.perf_counter() - started) / steps

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
    settings = {"PyTorch defaults": nullcontext, "scoring's deterministic kernels": deterministic_kernels,
                "graphs engine (deterministic algorithms off)": engine_kernels}
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.kind == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    sort = "cuda_time_total" if device.kind == "cuda" else "cpu_time_total"
    tokens, tables = {}, {}
    with torch.no_grad():
        for label, context in settings.items():
            with context():
                run_steps(GraphDecoder(model, tokenizer, gen, device, GenerationStats()))  # warm-up
                decoder = GraphDecoder(model, tokenizer, gen, device, GenerationStats())
                per_step = run_steps(decoder)
                tokens[label] = decoder.buffers.out.cpu()
                replayed = replayed_steps(GraphDecoder(model, tokenizer, gen, device, GenerationStats()))
                if label != "PyTorch defaults":
                    with torch.profiler.profile(activities=activities) as prof:
                        run_steps(GraphDecoder(model, tokenizer, gen, device, GenerationStats()))
                    tables[label] = prof.key_averages().table(sort_by=sort, row_limit=-1, max_name_column_width=90)
            same = int((tokens[label] == tokens["PyTorch defaults"]).all(dim=1).sum())
            print(f"{label}: eager {per_step * 1000:.2f} ms a step, captured {replayed * 1000:.2f} ms "
                  f"({args.rows / replayed:,.0f} tokens/s); "
                  f"rows decoding the same {steps + 1} tokens as under PyTorch defaults: {same}/{args.rows}")
    scoring, engine = tokens["scoring's deterministic kernels"], tokens["graphs engine (deterministic algorithms off)"]
    print(f"graphs engine vs scoring's deterministic kernels: same tokens in "
          f"{int((scoring == engine).all(dim=1).sum())}/{args.rows} rows")
    for label, table in tables.items():
        print(f"\n== {label}: top kernels ==")
        print("\n".join(table.splitlines()[:28]))
        if args.tables:
            Path(args.tables).mkdir(parents=True, exist_ok=True)
            name = "scoring" if label.startswith("scoring") else "engine"
            (Path(args.tables) / f"profile_{name}.txt").write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
