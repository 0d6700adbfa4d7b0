"""The `graphs` engine: greedy decoding as our own loop over fixed buffers, each step a CUDA graph.

Why not transformers' `generate` (the static engine): every step it runs Python bookkeeping, grows the
sequence and attention mask by concatenation and reads a flag back from the GPU (stopping criteria), so
a small model's step is bound by kernel launches and host round trips, not by the GPU. The compiled
engine removes that but pays a torch.compile per shape (35 s on one H100, more than it saves on a
1,000-example held-out set) and its texts differed from one call to the next. Here one decoding step
is a pure-tensor function over buffers whose shapes and addresses never change while a batch shape is
in use: on CUDA it is captured once per (rows, prompt width) with torch.cuda.CUDAGraph and replayed,
so a step is one graph launch running the static engine's own eager kernels (no compilation).

Same decoding as the static engine: the same batch plan and filler rows, the left-padded prefill into a
transformers StaticCache of prompt width + max_new_tokens, positions cumsum(mask) - 1, greedy argmax on
float32 logits after the output penalties, finished rows emit the pad token. The host only looks at
the GPU every STOP_CHECK_EVERY steps, to stop once every row has ended.

Sliding-window layers (Gemma 3: five of every six) are decoded through masks, not through transformers'
sliding cache layer: that layer keeps a Python counter of the tokens it holds and picks its code path by
it (fill, then roll), so a replayed graph would keep repeating the path it was captured on. Here every
layer keeps every column (a plain StaticLayer; prompt width + max_new_tokens columns, no more than the
static engine holds while that stays under the window), and the sliding layers read a second mask
buffer, the full one minus the columns more than window - 1 behind the input token: the keys
transformers' sliding mask allows (a column's distance is its position's distance, padding being on the
left). The model gets both as the per-layer-type mask mapping its forward takes (`layer_types` models).

On a device that is not CUDA the very same step runs eagerly, uncaptured: that is what the CPU tests
exercise. A model quantized by bitsandbytes is refused on CUDA (its kernels are not known to be
capture-safe), and a capture that fails raises a ModelError naming the setting to change: never a
silent fallback to another engine.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass

from harness.errors import ModelError, first_line
from harness.models import transformers_model
from harness.scoring.decoding import GenerationStats, OutputPenalties, deterministic_algorithms, sampled
from harness.spec import GenerationSpec

log = logging.getLogger(__name__)
WARMUP_STEPS = 3  # eager decoding steps on a side stream before capture (PyTorch's CUDA-graph recipe)
STOP_CHECK_EVERY = 8  # decoding steps between two "has every row ended?" reads (the loop's only host sync)
SWITCH = "set generation.engine=static (same outputs, no CUDA graphs) or dynamic"


def blocker(gen: GenerationSpec, device, model=None) -> str | None:
    """Why the graphs engine cannot decode these settings with this model, or None (`model` None: the
    settings alone)."""
    if sampled(gen):
        why = "generation.mbr_samples samples its candidates" if gen.mbr_samples else "generation.do_sample is true"
        return f"generation.engine=graphs decodes greedily only ({why})"
    if model is None:
        return None
    inner = transformers_model(model)
    attention = getattr(inner.config, "_attn_implementation", None)
    if attention != "sdpa":
        return f"generation.engine=graphs needs sdpa attention (the model uses {attention})"
    quantizer = getattr(inner, "hf_quantizer", None)
    if quantizer is not None and device.kind == "cuda":
        return f"generation.engine=graphs does not capture a model quantized by {type(quantizer).__name__}"
    other = _other_cache_layer(inner)
    if other is not None:  # e.g. chunked layers, or sliding ones of a model without per-layer-type masks
        return (f"generation.engine=graphs decodes full-attention caches, and sliding-window ones of models that "
                f"take a mask per layer type, only (this model's cache has {other})")
    return None


def check_supported(gen: GenerationSpec, device, model=None) -> None:
    """Fail early, in one line, where the graphs engine cannot decode (`model` None: the spec alone)."""
    reason = blocker(gen, device, model)
    if reason:
        raise ModelError(f"{reason}; {SWITCH}")


def _other_cache_layer(model) -> str | None:
    """The first static-cache layer type of `model` the engine cannot decode: anything but a plain full-attention
    StaticLayer, or a sliding one where the model takes per-layer-type masks (`masked_window`). A cache
    allocates its tensors lazily: building one to look costs nothing."""
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer

    known = (StaticLayer, StaticSlidingWindowLayer) if masked_window(model.config) else (StaticLayer,)
    cache = StaticCache(config=model.config, max_cache_len=1)
    return next((type(layer).__name__ for layer in cache.layers if type(layer) not in known), None)


def masked_window(config) -> int | None:
    """The sliding window the engine applies through masks, or None: a model whose layers are typed full or
    sliding (`config.layer_types`, whose forward takes a mask per layer type), with some sliding."""
    types = set(getattr(config, "layer_types", None) or ())
    if "sliding_attention" not in types or types - {"full_attention", "sliding_attention"}:
        return None
    return int(config.sliding_window)


def full_length_cache(config, max_cache_len: int):
    """A StaticCache of `max_cache_len` columns in every layer (sliding layers too: their window is masked)."""
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    cache = StaticCache(config=config, max_cache_len=max_cache_len)
    cache.layers = [layer if type(layer) is StaticLayer else StaticLayer(max_cache_len=max_cache_len)
                    for layer in cache.layers]
    return cache


DECODE_ATTENTION = "harness_grouped_decode"  # the attention the captured step runs (registered with transformers)


def grouped_decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                             **kwargs):
    """SDPA for one query token a row, each key/value head's query heads packed as its query rows.

    Why not transformers' `sdpa` attention: given a mask, transformers 5.17 (the GPU machine's) copies every
    cached key and value `num_key_value_groups` times (`repeat_kv`) before SDPA, which was 38% of a 512-row
    SmolLM2 decoding step on an H100, and attention over the copies another 25% (bench/profile_decode.py,
    bench/RESULTS.md). Newer transformers pack the same way themselves (`pack_gqa`, 5.23); this keeps both
    versions on the packed path. Same SDPA call otherwise (scoring's kernel restriction applies); a prompt
    (more than one query token) goes to transformers' own sdpa attention."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    if query.shape[2] != 1 or groups == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    rows, heads, _, dim = query.shape
    out = torch.nn.functional.scaled_dot_product_attention(  # the [rows, 1, 1, cache] mask broadcasts over both
        query.reshape(rows, heads // groups, groups, dim), key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(rows, heads, 1, dim).transpose(1, 2).contiguous(), None


@contextmanager
def _attention(config, implementation: str):
    """The model's layers call `implementation` inside the block (they look it up in their config each call)."""
    before = config._attn_implementation
    config._attn_implementation = implementation
    try:
        yield
    finally:
        config._attn_implementation = before


@dataclass
class _Buffers:
    """The decoding state of one batch shape: fixed addresses, read and written in place by the captured step."""

    mask: object  # [rows, 1, 1, cache length] bool: the 4D sdpa mask transformers uses as given
    sliding: object  # the same for sliding-window layers (None: the model has none)
    token: object  # [rows, 1] the last generated token, the next step's input
    position: object  # [rows, 1] its position id
    n_out: object  # [1] tokens generated so far (the output column the next token goes to)
    out: object  # [rows, max_new_tokens] generated tokens; pad after a row has ended
    finished: object  # [rows] bool
    scores: object  # [rows, vocab + 1] float32 logits being penalised; the last column is the penalties' sink
    cache_columns: object  # [cache length] column indices, compared against n_out


class GraphDecoder:
    """Decodes padded batches (`generation.generate` passes the static engine's batches) with the graphs engine."""

    def __init__(self, model, tokenizer, gen: GenerationSpec, device, stats: GenerationStats):
        from transformers import AttentionInterface

        AttentionInterface.register(DECODE_ATTENTION, grouped_decode_attention)
        self.model, self.gen, self.device, self.stats = transformers_model(model), gen, device, stats
        self.eos_id, self.pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
        self.penalties = OutputPenalties(gen, device.torch_device)
        self.shape = self.cache = self.buffers = self.graph = None
        self.width = 0
        self.window = masked_window(self.model.config)

    def __call__(self, ids, mask, streamer=None) -> list[list[int]]:
        """Every row's `max_new_tokens` output tokens (pad after its end). `streamer` is always None: `generate`
        refuses streaming on any engine but dynamic.

        Runs with PyTorch's deterministic algorithms off (scoring's SDPA restriction and cuBLAS workspace
        stay): their only effect on this step was to swap the static cache's `index_copy_` (60 a step) and
        the penalties' `scatter_` for implementations that sort every index first, which bought nothing
        here, since every index written is unique (one cache column a step) or writes one same value
        (penalties: a token's duplicates, the sink). Same bits, fewer kernels; bench/profile_decode.py
        times both and checks that they decode the same tokens."""
        ids, mask = ids.to(self.device.torch_device), mask.to(self.device.torch_device)
        with deterministic_algorithms(False):
            if tuple(ids.shape) != self.shape:
                self._new_shape(tuple(ids.shape))
            else:
                self.cache.reset()  # in place: the captured graph keeps pointing at the same cache tensors
            self._prefill(ids, mask)
            for step in range(1, self.gen.max_new_tokens):
                if step % STOP_CHECK_EVERY == 0 and bool(self.buffers.finished.all()):
                    break
                self._advance(step)
        self.stats.batches += 1
        return self.buffers.out.cpu().tolist()

    def _new_shape(self, shape: tuple[int, int]) -> None:
        self.graph = self.buffers = self.cache = None  # free the previous shape's graph pool and cache first
        self.cache = full_length_cache(self.model.config, shape[1] + self.gen.max_new_tokens)
        self.shape, self.width = shape, shape[1]
        self.stats.shapes.append(list(shape))

    def _prefill(self, ids, mask) -> None:
        """One eager forward of the whole prompt batch into the cache, then the first token (as HF generate)."""
        import torch
        from transformers.masking_utils import create_masks_for_generate

        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        prompt_mask = create_masks_for_generate(  # the 4D mask generate builds for a static cache
            config=self.model.config, attention_mask=mask, past_key_values=self.cache, position_ids=positions,
            inputs_embeds=torch.empty((*ids.shape, 0), dtype=self.model.dtype, device=ids.device))
        logits = self.model(input_ids=ids, attention_mask=prompt_mask, position_ids=positions,
                            past_key_values=self.cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        if self.buffers is None:
            self.buffers = self._allocate(ids.shape[0], logits.shape[-1])
        b = self.buffers
        b.mask.zero_()
        b.mask[:, 0, 0, :self.width] = mask.bool()
        b.position.copy_(positions[:, -1:])
        b.n_out.zero_()
        b.out.fill_(self.pad_id)
        b.finished.zero_()
        self._choose(logits)

    def _allocate(self, rows: int, vocab: int) -> _Buffers:
        import torch

        dev, length = self.device.torch_device, self.width + self.gen.max_new_tokens
        long = dict(dtype=torch.long, device=dev)
        masks = [torch.zeros((rows, 1, 1, length), dtype=torch.bool, device=dev)
                 for _ in range(2 if self.window else 1)]
        return _Buffers(mask=masks[0], sliding=masks[1] if self.window else None,
                        token=torch.zeros((rows, 1), **long), position=torch.zeros((rows, 1), **long),
                        n_out=torch.zeros(1, **long), out=torch.zeros((rows, self.gen.max_new_tokens), **long),
                        finished=torch.zeros(rows, dtype=torch.bool, device=dev),
                        scores=torch.zeros((rows, vocab + 1), dtype=torch.float32, device=dev),
                        cache_columns=torch.arange(length, device=dev))

    def _choose(self, logits) -> None:
        """Penalties, argmax and end-of-turn bookkeeping for the token at column `n_out`; all in place."""
        import torch

        b = self.buffers
        vocab = b.scores.shape[1] - 1
        b.scores[:, :vocab].copy_(logits)  # float32, as generate upcasts the logits before its processors
        if self.penalties.active:
            self.penalties(b.scores, b.out, b.n_out)
        if self.gen.min_new_tokens:  # transformers' MinNewTokensLengthLogitsProcessor, with a device counter
            eos = b.scores[:, self.eos_id]
            eos.copy_(eos.masked_fill(b.n_out < self.gen.min_new_tokens, float("-inf")))
        token = b.scores[:, :vocab].argmax(dim=-1).masked_fill(b.finished, self.pad_id)
        b.out.copy_(torch.where(self.penalties.columns == b.n_out, token.unsqueeze(1), b.out))
        b.finished.logical_or_(token == self.eos_id)
        b.token.copy_(token.unsqueeze(1))
        b.n_out.add_(1)

    def _step(self) -> None:
        """One decoding step: the last token in, the next one chosen. Pure tensor work on the buffers."""
        import torch

        b = self.buffers
        # the input token sits in cache column width + n_out - 1: attend to it from now on
        b.mask.logical_or_(b.cache_columns == b.n_out + (self.width - 1))
        b.position.add_(1)
        mask = b.mask
        if self.window:  # columns up to window - 1 behind the input token's: the keys transformers' window allows
            torch.logical_and(b.mask, b.cache_columns > b.n_out + (self.width - 1 - self.window), out=b.sliding)
            mask = {"full_attention": b.mask, "sliding_attention": b.sliding}
        with _attention(self.model.config, DECODE_ATTENTION):
            logits = self.model(input_ids=b.token, attention_mask=mask, position_ids=b.position,
                                past_key_values=self.cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        self._choose(logits)

    def _advance(self, step: int) -> None:
        """Decoding step `step` (1-based): eager off CUDA; on CUDA eager warm-up steps on a side stream, then
        one capture, then replays."""
        if self.device.kind != "cuda":
            self._step()
        elif self.graph is not None:
            self.graph.replay()
        elif step <= WARMUP_STEPS:
            self._warm_up_step()
        else:
            self._capture()
            self.graph.replay()  # capturing records the step without running it

    def _warm_up_step(self) -> None:
        import torch

        side = torch.cuda.Stream(self.device.torch_device)
        side.wait_stream(torch.cuda.current_stream(self.device.torch_device))
        with torch.cuda.stream(side):
            self._step()
        torch.cuda.current_stream(self.device.torch_device).wait_stream(side)

    def _capture(self) -> None:
        import torch

        torch.cuda.synchronize(self.device.index)
        started = time.perf_counter()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._step()
            torch.cuda.synchronize(self.device.index)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:
            raise ModelError(f"capturing the decoding step as a CUDA graph failed ({type(exc).__name__}: "
                             f"{first_line(exc)}); {SWITCH}") from exc
        self.graph = graph
        seconds = time.perf_counter() - started
        self.stats.warmup_s += seconds
        log.info("generation: captured the decoding step for %d rows x %d prompt tokens in %.2f s",
                 *self.shape, seconds)
