"""`varlen`: FlashAttention's variable-length kernel for padding-free packed batches.

trl's padding-free collator flattens a packed batch into one row of ~batch x max_length tokens and
passes the example boundaries as `cu_seq_lens_q/k`. Under `sdpa`, transformers turns that row into
a dense (L x L) block-diagonal mask, so attention costs O(L^2) over the whole row and cannot use the
flash kernel. `torch.nn.attention.varlen.varlen_attn` (PyTorch >= 2.10, CUDA) runs FlashAttention
per example from the same boundaries. transformers ships no binding to it (its own varlen path needs
the `flash-attn` package or a kernel from the Hub, neither installable offline), hence this module.

Inputs without boundaries (generation with a KV cache, padded evaluation batches) go to `sdpa`
unchanged, with the mask transformers builds for it.
"""

from __future__ import annotations

import functools
import inspect

NAME = "varlen"


def varlen_available() -> bool:
    """The kernel exists in this torch and a CUDA device can run it."""
    import torch

    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def register() -> None:
    """Make `attn_implementation="varlen"` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def mask(*args, **kwargs):
        # No padding mask: the row is either one plain causal sequence or packed examples whose
        # boundaries the attention call reads itself, so no (L x L) mask is built.
        return None if kwargs.get("attention_mask") is None else sdpa_mask(*args, **kwargs)

    AttentionInterface.register(NAME, varlen_attention_forward)
    AttentionMaskInterface.register(NAME, mask)


def boundaries(kwargs: dict):
    """(cu_seq_lens, max_len) of a packed single row: from trl's collator, else from position_ids."""
    import torch

    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        return cu.to(torch.int32), int(kwargs.get("max_length_q") or int(cu.diff().max()))
    position_ids = kwargs.get("position_ids")
    if position_ids is None or position_ids.shape[0] != 1 or not bool((position_ids[0, 1:] == 0).any()):
        return None, 0
    starts = (position_ids[0] == 0).nonzero().flatten()
    cu = torch.cat([starts, starts.new_tensor([position_ids.shape[1]])]).to(torch.int32)
    return cu, int(cu.diff().max())


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers' attention signature: query/key/value are (batch, heads, seq, head_dim)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu, max_len = boundaries(kwargs) if attention_mask is None and query.shape[0] == 1 else (None, 0)
    if cu is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    if dropout:
        raise ValueError("varlen attention: attention dropout is not supported (the kernel has none)")
    out = varlen_call(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                      cu.to(query.device), max_len, scaling)
    return out.unsqueeze(0), None  # (1, seq, heads, head_dim), as transformers' attention functions return


@functools.lru_cache(maxsize=4)
def _parameters(function) -> frozenset[str]:
    return frozenset(inspect.signature(function).parameters)


def varlen_call(q, k, v, cu, max_len: int, scale: float | None):
    """Causal varlen attention over (tokens, heads, head_dim) tensors, across PyTorch's API versions:
    2.10 takes `is_causal`, 2.11+ `window_size=(-1, 0)`; grouped-query heads need `enable_gqa` (2.12+)
    or are repeated here."""
    from torch.nn.attention.varlen import varlen_attn

    params = _parameters(varlen_attn)
    options = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            options["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    if scale is not None:
        if "scale" in params:
            options["scale"] = scale
        elif abs(scale - q.shape[-1] ** -0.5) > 1e-6:
            raise ValueError(f"varlen attention: scale {scale} needs PyTorch >= 2.11")
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, **options)
