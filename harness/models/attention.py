"""`varlen`: FlashAttention's variable-length kernel for padding-free packed batches.

trl's padding-free collator flattens a packed batch into one row of ~batch x max_length tokens and
passes the example boundaries as `cu_seq_lens_q/k`. Under `sdpa`, transformers turns that row into
a dense (L x L) block-diagonal mask, so attention costs O(L^2) over the whole row and cannot use the
flash kernel. `torch.nn.attention.varlen.varlen_attn` (PyTorch >= 2.10, CUDA) runs FlashAttention
per example from the same boundaries. transformers ships no binding to it (its own varlen path needs
the `flash-attn` package or a kernel from the Hub, neither installable offline), hence this module.

Sliding-window layers (Gemma 3: five of every six layers see only the last 512 tokens) get the
kernel's window, full layers the causal one (`kernel_window`). A row without boundaries is one
sequence: full layers leave it to `sdpa` (causal, no mask), windowed layers run the kernel over it,
since `sdpa` without a mask would attend past the window. Inputs with a padding mask or a KV cache
(generation, padded evaluation batches) go to `sdpa` unchanged, with the mask transformers builds for
it (the window included).
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
        # boundaries the attention call reads itself, so no (L x L) mask is built. A windowed layer
        # reading a cache (queries fewer than keys) gets transformers' own window mask instead.
        no_mask = kwargs.get("attention_mask") is None and (kwargs.get("local_size") is None
                                                            or kwargs.get("q_length") == kwargs.get("kv_length"))
        return None if no_mask else sdpa_mask(*args, **kwargs)

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


def layer_window(module, kwargs: dict) -> int | None:
    """The layer's sliding window in transformers' sense, or None for full attention. Models with
    windows pass it to every attention call (`sliding_window=`, None on full layers: Gemma 3, Mistral,
    Qwen 2 in transformers 5.17 and 5.23); the module's own attribute is the fallback."""
    window = kwargs["sliding_window"] if "sliding_window" in kwargs else getattr(module, "sliding_window", None)
    return int(window) if window else None


def kernel_window(window: int | None) -> tuple[int, int]:
    """FlashAttention's `window_size=(left, right)` for a transformers window: the kernel lets query i see
    keys i-left .. i+right of its own sequence (-1: unbounded); transformers' sliding mask lets it see
    keys j with i - W < j <= i (masking_utils.sliding_window_overlay and causal_mask_function), i.e. W
    keys ending at itself: (W - 1, 0). Its own flash integration passes the same left bound."""
    return (-1, 0) if window is None else (window - 1, 0)


def row_boundaries(rows: int, length: int, device):
    """(cu_seq_lens, max_len) treating each of `rows` rows of `length` tokens as one sequence."""
    import torch

    return torch.arange(0, (rows + 1) * length, length, dtype=torch.int32, device=device), length


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers' attention signature: query/key/value are (batch, heads, seq, head_dim)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    window = layer_window(module, kwargs)
    cu, max_len = None, 0
    if attention_mask is None and query.shape[2] == key.shape[2]:  # no padding, no cached keys
        if query.shape[0] == 1:
            cu, max_len = boundaries(kwargs)
        if cu is None and window is not None:  # sdpa without a mask would attend past the window
            cu, max_len = row_boundaries(query.shape[0], query.shape[2], query.device)
    if cu is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    if dropout:
        raise ValueError("varlen attention: attention dropout is not supported (the kernel has none)")
    rows, heads, length, dim = query.shape
    q, k, v = (t.transpose(1, 2).reshape(-1, t.shape[1], dim) for t in (query, key, value))
    out = varlen_call(q, k, v, cu.to(query.device), max_len, scaling, window)
    return out.reshape(rows, length, heads, dim), None  # (batch, seq, heads, head_dim), as transformers returns


@functools.lru_cache(maxsize=4)
def _parameters(function) -> frozenset[str]:
    return frozenset(inspect.signature(function).parameters)


def kernel_parameters() -> frozenset[str]:
    """The keyword arguments this PyTorch's varlen_attn takes (empty where it has none)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return frozenset()
    return _parameters(varlen_attn)


def unsupported(config) -> str | None:
    """Why the kernel cannot compute this model's attention as the model itself does, or None.
    (Its scale, grouped-query heads and windows are handled; these are not.)"""
    import torch

    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    model = getattr(config, "model_type", "this model")
    if getattr(config, "attn_logit_softcapping", None):
        return f"{model} soft-caps its attention logits (attn_logit_softcapping), which the kernel does not"
    if getattr(config, "use_bidirectional_attention", False):
        return f"{model} attends bidirectionally (use_bidirectional_attention)"
    layer_types = set(getattr(config, "layer_types", None) or ())
    other = sorted(layer_types - {"full_attention", "sliding_attention"})
    if other:
        return f"{model} has {', '.join(other)} layers (the kernel computes full or sliding-window causal attention)"
    windowed = "sliding_attention" in layer_types or (not layer_types and getattr(config, "sliding_window", None))
    if windowed and "window_size" not in kernel_parameters():
        return (f"{model} has sliding-window layers and PyTorch {torch.__version__}'s varlen kernel has no "
                "window_size (PyTorch >= 2.11 has)")
    return None


def varlen_call(q, k, v, cu, max_len: int, scale: float | None, window: int | None = None):
    """Causal varlen attention over (tokens, heads, head_dim) tensors, within `window` (transformers'
    sense, None: unbounded), across PyTorch's API versions: 2.10 takes `is_causal` (no window), 2.11+
    `window_size`; grouped-query heads need `enable_gqa` (2.12+) or are repeated here."""
    from torch.nn.attention.varlen import varlen_attn

    params = _parameters(varlen_attn)
    if "window_size" in params:
        options = {"window_size": kernel_window(window)}
    elif window is None:
        options = {"is_causal": True}
    else:
        raise ValueError(f"varlen attention: a sliding window ({window}) needs PyTorch >= 2.11 (window_size)")
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
