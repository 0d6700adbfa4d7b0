"""Batched generation: one prompt path for scoring, `generate` and `serve`.

Four engines (`generation.engine`; `auto` is `graphs` on CUDA where it can decode (greedy, sdpa, not
quantized by bitsandbytes, full-attention or per-type-masked sliding-window cache), else `static` there, and
`dynamic` off CUDA; the manifest's `scoring_engine` says why where auto did not choose graphs). MBR
(`generation.mbr_samples`) samples several candidates per prompt and keeps one (mbr_selection.py); being
sampled, it never runs on `graphs`:

- dynamic: transformers' growing KV cache; length-sorted batches of `batch_size`, each padded to
  its longest prompt. Interactive generation (streaming) and CPU runs use it.
- static: a preallocated KV cache per batch shape. Prompts are left-padded up to a bucket width
  (`prompt_buckets`) and every batch is filled to `static_batch_size` rows by repeating its last
  prompt, so a handful of shapes occur, fixed by the spec and the data (never by free memory):
  the same command decodes the same batches, hence gives the same outputs on the same device.
- compiled: static, with each decoding step compiled by torch.compile into a CUDA graph
  (transformers' `compile_config`, mode "reduce-overhead"): a step of a small model becomes one
  graph replay instead of hundreds of kernel launches. The first batch of each shape pays the
  compilation (timed in a short warm-up); another model of the same architecture, such as the
  merged tuned model, reuses the compiled code and only captures its graphs again.

- graphs: the static engine's batches decoded greedily by our own loop, each step captured once per
  shape as a CUDA graph and replayed (harness/scoring/graph_decoding.py): no compilation, the static
  engine's kernels. Off CUDA the same loop runs uncaptured.

Why `auto` is `graphs` and not `compiled` (bench/RESULTS.md, one H100, SmolLM2, 512 prompts): graphs
decoded 42,058 tokens/s with its 0.07 s capture amortised over 1,000 examples, 5.4x the static engine,
with the static engine's texts on all 512 prompts and on the 142 real held-out prompts in two processes;
compiled decoding reached 20,000-25,000 tokens/s warm but compiling cost 35-40 s, more than it saves on a
1,000-example held-out set, and two compiled calls on the same prompts gave 4% different texts, which
breaks "same command, same predictions".

Results come back in the caller's order.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from harness.data.prompts import encode_prompt
from harness.errors import ModelError, first_line
from harness.models import transformers_model
from harness.scoring import graph_decoding
from harness.scoring.decoding import GenerationStats, deterministic_kernels, output_penalties, sampled
from harness.spec import GenerationSpec

log = logging.getLogger(__name__)
WARMUP_TOKENS = 4  # prefill + 3 compiled steps: compile, then CUDA-graph warm-up, capture and one replay
MAX_COMPILED_SHAPES = 8  # torch._dynamo's default recompile limit; past it dynamo silently runs eagerly


@dataclass
class Generation:
    text: str
    n_tokens: int
    hit_max_new_tokens: bool


@dataclass(frozen=True)
class Batch:
    """Prompts decoded together: `indices` into the caller's list, left-padded to `width`, in `rows` rows
    (more rows than indices when the batch is filled up to a fixed size)."""

    indices: list[int]
    width: int
    rows: int


def _longest_first(lengths: Sequence[int]) -> list[int]:
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: equal lengths keep their order


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> Iterable[list[int]]:
    """Index batches, longest first, so similar lengths share a batch (and OOM shows up early)."""
    order = _longest_first(lengths)
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def bucket_width(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds `length`; past the largest, the next multiple of the largest."""
    for width in buckets:
        if length <= width:
            return width
    return -(-length // buckets[-1]) * buckets[-1]


def plan_batches(lengths: Sequence[int], batch_size: int, buckets: Sequence[int] | None = None) -> list[Batch]:
    """Batches, longest prompts first. Without buckets (dynamic engine): length-sorted, each padded to its
    longest prompt. With buckets (static engines): prompts grouped by bucket width and every batch filled to
    `batch_size` rows, so all batches of a bucket share one shape."""
    if buckets is None:
        return [Batch(chunk, max(lengths[i] for i in chunk), len(chunk))
                for chunk in length_sorted_batches(lengths, batch_size)]
    by_width: dict[int, list[int]] = {}
    for i in _longest_first(lengths):
        by_width.setdefault(bucket_width(lengths[i], buckets), []).append(i)
    return [Batch(members[start:start + batch_size], width, batch_size)
            for width, members in by_width.items() for start in range(0, len(members), batch_size)]


def left_pad(rows: list[list[int]], pad_id: int, width: int | None = None):
    import torch

    width = width or max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return ids, mask


def _compile_blocker(model, device) -> str | None:
    """Why decoding cannot be compiled here, or None (`model` None: judged by the device alone)."""
    if device.kind != "cuda":
        return f"compiled decoding needs a CUDA device (this run is on {device.kind})"
    quantizer = getattr(transformers_model(model), "hf_quantizer", None)
    if quantizer is not None and not getattr(quantizer, "is_compileable", False):
        return f"transformers cannot compile a model quantized by {type(quantizer).__name__}"
    return None


def _compile_config():
    """transformers' compile settings for decoding: inductor with CUDA graphs ("reduce-overhead", the
    CompileConfig default) and one graph per shape (dynamic=False): shapes are few and fixed by the plan."""
    from transformers import CompileConfig

    return CompileConfig(dynamic=False)


def resolve_engine(gen: GenerationSpec, device, model=None) -> str:
    """The engine `gen.engine` means for this model on this device; a forced one that cannot run fails.

    Called without a model before any work, so a run that asks for what the device cannot do stops early."""
    if gen.engine == "auto":
        if device.kind != "cuda":
            return "dynamic"
        return "static" if graph_decoding.blocker(gen, device, model) else "graphs"
    blocker = _compile_blocker(model, device)
    if gen.engine == "compiled" and blocker:
        raise ModelError(f"generation.engine=compiled: {blocker}; set generation.engine=static (no compile) "
                         "or dynamic")
    if gen.engine == "graphs":
        graph_decoding.check_supported(gen, device, model)
    return gen.engine


def auto_engine_reason(gen: GenerationSpec, device, model=None) -> str:
    """Why `auto` decodes with another engine than graphs here ("" where it is graphs, or the engine is named)."""
    if gen.engine != "auto":
        return ""
    if device.kind != "cuda":
        return "no CUDA device (graphs, static and compiled decode on CUDA; dynamic elsewhere)"
    return graph_decoding.blocker(gen, device, model) or ""


def batch_rows(gen: GenerationSpec, engine: str) -> int:
    """Rows per batch of `engine` (reference perplexity runs in batches of the same size)."""
    return gen.batch_size if engine == "dynamic" else gen.static_batch_size


def candidates_per_prompt(gen: GenerationSpec) -> int:
    """Decodings per prompt: `mbr_samples` candidates with MBR, else one."""
    return max(gen.mbr_samples, 1)


def plan_prompt_batches(lengths: Sequence[int], gen: GenerationSpec, engine: str) -> list[Batch]:
    """`generate`'s batch plan for prompts of these token lengths on `engine`, fixed by the spec and the data.

    With MBR a batch holds `rows // mbr_samples` prompts, each repeated once per candidate in adjacent rows:
    rows of one batch draw different samples, whereas two batches both start from `gen.seed`, so candidates
    of one prompt split over two batches could repeat each other. A batch's `rows` count prompts, filler
    included; it decodes `rows * candidates_per_prompt(gen)` sequences."""
    static = engine != "dynamic"
    return plan_batches(lengths, batch_rows(gen, engine) // candidates_per_prompt(gen),
                        gen.prompt_buckets if static else None)


class _Decoder:
    """Runs transformers' `generate` on one padded batch with the engine's cache and compile settings.

    Static engines keep one preallocated cache per shape and reset it between batches, so compiled
    CUDA graphs keep pointing at the same memory."""

    def __init__(self, model, tokenizer, gen: GenerationSpec, device, engine: str, stats: GenerationStats):
        self.model, self.gen, self.device, self.engine, self.stats = model, gen, device, engine, stats
        self.cache, self.shape = None, None
        sampling = {"do_sample": True, "temperature": gen.temperature, "top_p": gen.top_p} if sampled(gen) \
            else {"do_sample": False}
        self.kwargs = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                           **sampling, **({"min_new_tokens": gen.min_new_tokens} if gen.min_new_tokens else {}))
        if engine == "compiled":
            self.kwargs["compile_config"] = _compile_config()
            # Dynamo guards on requires_grad: a freshly loaded base model has it on, a merged PEFT model
            # off. Turned off here (scoring never trains), the tuned model reuses the base model's code.
            model.requires_grad_(False)
        elif engine == "static":
            self.kwargs["disable_compile"] = True  # transformers would compile a static cache on CUDA itself

    def __call__(self, ids, mask, streamer=None) -> list[list[int]]:
        ids, mask = ids.to(self.device.torch_device), mask.to(self.device.torch_device)
        kwargs = dict(self.kwargs, streamer=streamer,
                      logits_processor=output_penalties(self.gen, ids.shape[1], ids.device))
        if self.engine != "dynamic":
            kwargs["past_key_values"] = self._static_cache(tuple(ids.shape), ids, mask)
        out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=self.gen.max_new_tokens,
                                  **kwargs)
        self.stats.batches += 1
        return out[:, ids.shape[1]:].cpu().tolist()

    def _static_cache(self, shape: tuple[int, int], ids, mask):
        from transformers import StaticCache

        if shape == self.shape:
            self.cache.reset()
            return self.cache
        self.cache = None  # free the previous shape's cache before allocating the next
        config = transformers_model(self.model).config
        self.cache = StaticCache(config=config, max_cache_len=shape[1] + self.gen.max_new_tokens)
        self.shape = shape
        self.stats.shapes.append(list(shape))
        if self.engine == "compiled":
            self._warm_up(ids, mask)
            self.cache.reset()
        return self.cache

    def _warm_up(self, ids, mask) -> None:
        """Compile and capture this shape on a few tokens, timed apart from the real decoding."""
        import torch

        started = time.perf_counter()
        steps = min(WARMUP_TOKENS, self.gen.max_new_tokens)
        try:
            self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, past_key_values=self.cache,
                                logits_processor=output_penalties(self.gen, ids.shape[1], ids.device),
                                **{**self.kwargs, "min_new_tokens": steps})
            if self.device.kind == "cuda":
                torch.cuda.synchronize(self.device.index)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:
            raise ModelError(f"compiling decoding failed ({type(exc).__name__}: {first_line(exc)}); rerun with "
                             "--set generation.engine=static (no compile) or generation.engine=dynamic") from exc
        if steps > 1 and getattr(transformers_model(self.model), "_compiled_call", None) is None:
            raise ModelError("transformers did not compile decoding (its compile criteria were not met; see its "
                             "warning above); set generation.engine=static or dynamic")
        seconds = time.perf_counter() - started
        self.stats.warmup_s += seconds
        log.info("generation: compiled decoding for %d rows x %d prompt tokens in %.1f s", *ids.shape, seconds)


def generate(model, tokenizer, prompts: Sequence[str], gen: GenerationSpec, device,
             on_done: Callable[[int, Generation], None] | None = None, streamer=None,
             stats: GenerationStats | None = None) -> list[Generation]:
    """Generate a description per prompt; `on_done(index, result)` lets callers persist as they go.

    `streamer` (a transformers streamer, one prompt, dynamic engine) prints tokens as they are produced;
    `stats`, when given, receives the engine, shapes and warm-up time of this call. Sampling is seeded
    with `gen.seed` before every batch, inside a forked RNG that leaves the caller's random state alone.
    With `gen.mbr_samples` N, each prompt is sampled N times in one batch and the result is the candidate
    that harness.scoring.mbr_selection chooses (its text, token count and stop)."""
    import torch

    stats = stats if stats is not None else GenerationStats()
    stats.engine = resolve_engine(gen, device, model)
    stats.engine_reason = auto_engine_reason(gen, device, model)
    if streamer is not None and stats.engine != "dynamic":
        raise ModelError(f"streaming needs generation.engine=dynamic (this call resolved to {stats.engine})")
    if streamer is not None and gen.mbr_samples:
        raise ModelError("streaming shows one decoding as it is produced, and generation.mbr_samples chooses among "
                         f"{gen.mbr_samples} once all are done: stream without MBR, or turn streaming off")
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    plan = plan_prompt_batches([len(e) for e in encoded], gen, stats.engine)
    widths = {b.width for b in plan}
    if stats.engine == "compiled" and len(widths) > MAX_COMPILED_SHAPES:
        raise ModelError(f"generation: prompts of {len(widths)} bucket widths would need as many compiled graphs "
                         f"(torch.compile keeps {MAX_COMPILED_SHAPES}); use fewer, larger generation.prompt_buckets")
    n = stats.candidates = candidates_per_prompt(gen)
    results: list[Generation | None] = [None] * len(prompts)
    model.eval()
    if stats.engine == "graphs":
        decode = graph_decoding.GraphDecoder(model, tokenizer, gen, device, stats)
    else:
        decode = _Decoder(model, tokenizer, gen, device, stats.engine, stats)
    # no_grad, not inference_mode: the context transformers' own `generate` (and its compiled decoding) runs in.
    with torch.random.fork_rng(devices=[device.index] if device.kind == "cuda" else []), torch.no_grad(), \
            deterministic_kernels():
        for batch in plan:
            prompt_rows = [encoded[i] for i in batch.indices]
            prompt_rows += [prompt_rows[-1]] * (batch.rows - len(prompt_rows))  # filler: the batch keeps its shape
            ids, mask = left_pad([row for row in prompt_rows for _ in range(n)], tokenizer.pad_token_id, batch.width)
            torch.manual_seed(gen.seed)
            new_tokens = decode(ids, mask, streamer)
            for k, i in enumerate(batch.indices):
                candidates = [_finished(tokens, tokenizer, gen) for tokens in new_tokens[k * n:(k + 1) * n]]
                result = candidates[_choose(candidates, gen)]
                results[i] = result
                if on_done is not None:
                    on_done(i, result)
    return results  # type: ignore[return-value]


def _finished(tokens: list[int], tokenizer, gen: GenerationSpec) -> Generation:
    """One decoded row as a Generation: cut at the end-of-turn token, decoded, stripped."""
    ended = tokenizer.eos_token_id in tokens
    kept = tokens[: tokens.index(tokenizer.eos_token_id)] if ended else tokens
    return Generation(text=tokenizer.decode(kept, skip_special_tokens=True).strip(), n_tokens=len(kept),
                      hit_max_new_tokens=not ended and len(tokens) >= gen.max_new_tokens)


def _choose(candidates: list[Generation], gen: GenerationSpec) -> int:
    """The index of the result among a prompt's candidates: the only one, or MBR's choice."""
    if len(candidates) == 1:
        return 0
    from harness.scoring.mbr_selection import mbr_choice

    return mbr_choice([c.text for c in candidates], gen.mbr_utility)
