"""Batched generation: one prompt path for scoring, `generate` and `serve`.

Prompts run in length-sorted batches (less padding, no per-example loop) and results come
back in the caller's order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np

from harness.prompts import encode_prompt
from harness.spec import GenerationSpec


@dataclass
class Generation:
    text: str
    n_tokens: int
    hit_max_new_tokens: bool


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> Iterable[list[int]]:
    """Index batches, longest first, so similar lengths share a batch (and OOM shows up early)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def left_pad(rows: list[list[int]], pad_id: int):
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return ids, mask


def auto_batch_size(model, device, longest_prompt: int, max_new_tokens: int, n_prompts: int,
                    requested: int) -> int:
    """On CUDA, as many sequences as half the free memory holds in KV cache (capped at 256).

    The spec's batch size is kept on CPU, where larger batches do not pay.
    """
    if device.kind != "cuda":
        return requested
    import torch

    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    bytes_per_seq = 2 * cfg.num_hidden_layers * kv_heads * head_dim * (longest_prompt + max_new_tokens) * 2
    # Logits of the last position (fp32) and activations: budget them as another KV cache's worth.
    bytes_per_seq = 2 * bytes_per_seq + cfg.vocab_size * 4
    free, _total = torch.cuda.mem_get_info(device.index)
    return max(1, min(256, n_prompts, int(free * 0.5 // bytes_per_seq)))


def generate(model, tokenizer, prompts: Sequence[str], gen: GenerationSpec, device,
             on_done: Callable[[int, Generation], None] | None = None,
             batch_size: int | None = None, streamer=None) -> list[Generation]:
    """Generate a description per prompt; `on_done(index, result)` lets callers persist as they go.

    `streamer` (a transformers streamer, one prompt only) prints tokens as they are produced."""
    import torch

    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    results: list[Generation | None] = [None] * len(prompts)
    eos_id = tokenizer.eos_token_id
    sampling = {"do_sample": True, "temperature": gen.temperature, "top_p": gen.top_p} if gen.do_sample \
        else {"do_sample": False}
    model.eval()
    if batch_size is None:
        batch_size = auto_batch_size(model, device, max(map(len, encoded), default=1), gen.max_new_tokens,
                                     len(encoded), gen.batch_size)
    for batch in length_sorted_batches([len(e) for e in encoded], batch_size):
        ids, mask = left_pad([encoded[i] for i in batch], tokenizer.pad_token_id)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids.to(device.torch_device), attention_mask=mask.to(device.torch_device),
                max_new_tokens=gen.max_new_tokens, eos_token_id=eos_id, pad_token_id=tokenizer.pad_token_id,
                no_repeat_ngram_size=gen.no_repeat_ngram_size,
                repetition_penalty=gen.repetition_penalty, streamer=streamer, **sampling)
        new_tokens = out[:, ids.shape[1]:].cpu().tolist()
        for i, tokens in zip(batch, new_tokens):
            ended = eos_id in tokens
            kept = tokens[: tokens.index(eos_id)] if ended else tokens
            result = Generation(
                text=tokenizer.decode(kept, skip_special_tokens=True).strip(),
                n_tokens=len(kept),
                hit_max_new_tokens=not ended and len(tokens) >= gen.max_new_tokens,
            )
            results[i] = result
            if on_done is not None:
                on_done(i, result)
    return results  # type: ignore[return-value]
