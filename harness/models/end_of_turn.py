"""Which token ends an answer: the chat template's end-of-turn token becomes the tokenizer's EOS (and pad), and the
model's configs get the same ids, so training ends turns with it and generation stops at it.
"""

from __future__ import annotations

from harness.errors import ModelError


def end_of_turn_token(tokenizer) -> str | None:
    """The token a chat template puts after an assistant message (`<|im_end|>` for ChatML).

    Read from the template itself rather than trusting `tokenizer.eos_token`, which differs
    between transformers versions for GGUF-loaded tokenizers.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "HARNESS_MARKER"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}], tokenize=False
    )
    tail = text.split(marker, 1)[1].strip()
    for token in tokenizer.all_special_tokens + list(tokenizer.get_added_vocab()):
        if tail.startswith(token):
            return token
    return None


def configure_tokenizer(tokenizer, uses_chat_template: bool) -> None:
    """Make EOS the end-of-turn token, so training ends turns with it and generation stops at it."""
    eot = end_of_turn_token(tokenizer) if uses_chat_template else None
    if eot:
        tokenizer.eos_token = eot
    if tokenizer.eos_token is None:
        raise ModelError("the tokenizer has no EOS token and its chat template names no end-of-turn token")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"


def sync_eos(model, tokenizer) -> None:
    """Copy the tokenizer's EOS into the model and generation configs (trl may have set another)."""
    eos_id = tokenizer.eos_token_id
    model.config.eos_token_id = eos_id
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.eos_token_id = eos_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
