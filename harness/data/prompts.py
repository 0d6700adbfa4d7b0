"""One prompt path for training, scoring, generation and serving.

What is served is what was scored is what was trained: every caller builds prompts and
token sequences through these functions and nowhere else.

Where the answer ends (EOS) depends on the prompt format, and is set once on the tokenizer
(`models.end_of_turn.configure_tokenizer`): with the chat template (`prompt.template: null`) it is the
template's end-of-turn token (`<|im_end|>` for ChatML); with a preset (`alpaca`, `llama2_inst`)
or a custom format string it is the tokenizer's own `eos_token` (`</s>` for Llama-2), the token
Unsloth and TRL notebooks append as `EOS_TOKEN`. Training appends it (`completion_text`),
generation stops at it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from harness.errors import DataError, SpecError
from harness.spec import PromptSpec

ALPACA_PREAMBLE = ("Below is an instruction that describes a task, paired with an input that provides further "
                   "context. Write a response that appropriately completes the request.")
# The notebooks' formats, word for word (spec.PROMPT_PRESETS lists these names); {system} is the
# preamble (alpaca) or the <<SYS>> block (llama2). The answer follows the prompt directly.
PRESETS = {
    "alpaca": "{system}\n\n### Instruction:\n{instruction}\n\n### Input:\n{title}\n\n### Response:\n",
    "llama2_inst": "[INST] {system}{instruction}\n\n{title} [/INST]",
}


def _preset_prompt(tokenizer, prompt: PromptSpec, title: str) -> str:
    """A notebook format, led by BOS where the tokenizer adds one itself (as the notebooks' trainers
    tokenized: `tokenizer(text)`); harness encodes with add_special_tokens=False, so it is written here."""
    if prompt.template == "alpaca":
        system = prompt.system if prompt.system is not None else ALPACA_PREAMBLE
    else:
        system = f"<<SYS>>\n{prompt.system}\n<</SYS>>\n\n" if prompt.system is not None else ""
    text = PRESETS[prompt.template].format(system=system, instruction=prompt.instruction, title=title)
    return tokenizer_bos(tokenizer) + text


def tokenizer_bos(tokenizer) -> str:
    """The BOS text the tokenizer puts before any text it encodes, or "" when it adds none."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("x", add_special_tokens=True)["input_ids"]
    return tokenizer.bos_token if bos is not None and ids and ids[0] == bos else ""


def build_prompt(tokenizer, prompt: PromptSpec, title: str) -> str:
    """The text a model sees before it writes the description (ends where the answer starts)."""
    if prompt.template in PRESETS:
        return _preset_prompt(tokenizer, prompt, title)
    if prompt.template is not None:
        return prompt.template.format(title=title, instruction=prompt.instruction)
    messages = []
    if prompt.system is not None:
        messages.append({"role": "system", "content": prompt.system})
    messages.append({"role": "user", "content": f"{prompt.instruction}\n\n{title}"})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def completion_text(tokenizer, description: str) -> str:
    """The training target: the description closed by EOS (the end-of-turn token with the chat
    template, the tokenizer's eos_token with a preset or custom format: see the module docstring)."""
    return description + tokenizer.eos_token


@dataclass
class EncodedExample:
    input_ids: list[int]
    labels: list[int]  # -100 on prompt tokens: loss and perplexity count description tokens only

    @property
    def n_target_tokens(self) -> int:
        return sum(1 for t in self.labels if t != -100)


def encode_prompt(tokenizer, prompt_text: str) -> list[int]:
    # The chat template already holds any BOS it needs; adding special tokens again would double it.
    return tokenizer(prompt_text, add_special_tokens=False)["input_ids"]


def encode_example(tokenizer, prompt_text: str, description: str, max_length: int | None) -> EncodedExample:
    """Prompt and completion tokenized separately so the boundary never merges across them.

    Over-long examples keep the whole prompt and cut the description's tail (EOS included:
    a cut description did not end there). `max_length=None` keeps everything (perplexity).
    """
    return encode_examples(tokenizer, [prompt_text], [description], max_length)[0]


def encode_examples(tokenizer, prompt_texts: list[str], descriptions: list[str],
                    max_length: int | None) -> list[EncodedExample]:
    """encode_example for many at once: two batched tokenizer calls instead of two per example."""
    if not prompt_texts:
        return []
    return _with_targets(tokenizer, tokenizer(list(prompt_texts), add_special_tokens=False)["input_ids"],
                         descriptions, max_length)


def encode_fitted(tokenizer, fitted: Sequence["FittedPrompt"], descriptions: list[str],
                  max_length: int) -> list[EncodedExample]:
    """encode_examples for prompts from fit_prompts, whose tokens it has counted already."""
    if not fitted:
        return []
    return _with_targets(tokenizer, [f.ids for f in fitted], descriptions, max_length)


def _with_targets(tokenizer, all_prompt_ids: list[list[int]], descriptions: list[str],
                  max_length: int | None) -> list[EncodedExample]:
    all_target_ids = tokenizer([completion_text(tokenizer, d) for d in descriptions],
                               add_special_tokens=False)["input_ids"]
    out = []
    for prompt_ids, target_ids in zip(all_prompt_ids, all_target_ids, strict=True):
        if max_length is not None:
            room = max_length - len(prompt_ids)
            if room < 1:
                # fit_prompts keeps every prompt within max_prompt_tokens(max_length): a bug if reached.
                raise ValueError(f"prompt is {len(prompt_ids)} tokens: no room for a description in max_length={max_length}")
            target_ids = target_ids[:room]
        out.append(EncodedExample(prompt_ids + target_ids, [-100] * len(prompt_ids) + target_ids))
    return out


# -- prompts within train.max_length ------------------------------------------------------------
# A prompt leaves at least this share of train.max_length (at least one token) for the description:
# a title that long teaches the model its description's first tokens only, if any. An eighth keeps the
# shipped demo (prompts of at most 64 tokens at max_length 192) and the real task's titles whole, and
# still leaves room for a title in a prompt at the smallest lengths (48 with SmolLM2's 41-token frame).
DESCRIPTION_SHARE = 8


def max_prompt_tokens(max_length: int) -> int:
    """The most prompt tokens an example of `max_length` tokens keeps, the rest kept for the description."""
    return max_length - max(1, max_length // DESCRIPTION_SHARE)


@dataclass(frozen=True)
class FittedPrompt:
    """A title's prompt within max_prompt_tokens: as built, or with its title cut (`truncated`)."""

    text: str
    ids: list[int]
    truncated: bool  # title tokens were cut to fit; the frame (BOS, instruction, markers, template) is whole
    full_tokens: int  # tokens of the prompt with the whole title

    def reason(self, max_length: int) -> str:
        """Why the whole title does not fit (for those that refuse a cut title: `serve`)."""
        return (f"the title's prompt is {self.full_tokens} tokens; this run trained on prompts of at most "
                f"{max_prompt_tokens(max_length)} (train.max_length {max_length}, less "
                f"{max_length - max_prompt_tokens(max_length)} kept for the description): shorten the title")


class PromptTooLong(DataError):
    """A title whose whole prompt does not fit train.max_length, where a cut title is refused."""


def fit_prompts(tokenizer, prompt: PromptSpec, titles: Sequence[str], max_length: int) -> list[FittedPrompt]:
    """Each title's prompt within max_prompt_tokens(max_length) (training, scoring, generation and serving
    all go through here). A prompt that fits is build_prompt's, unchanged; a longer one keeps the longest
    title prefix, in title tokens, whose whole prompt fits: only the title is cut, the frame is rebuilt
    around it by build_prompt, so chat-template tokens, BOS and markers are always whole."""
    if not titles:
        return []
    limit = max_prompt_tokens(max_length)
    texts = [build_prompt(tokenizer, prompt, title) for title in titles]
    all_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [FittedPrompt(text, ids, False, len(ids)) if len(ids) <= limit
            else _cut_title(tokenizer, prompt, title, len(ids), limit, max_length)
            for title, text, ids in zip(titles, texts, all_ids, strict=True)]


def _cut_title(tokenizer, prompt: PromptSpec, title: str, full_tokens: int, limit: int,
               max_length: int) -> FittedPrompt:
    """Binary search over how many of the title's tokens to keep. Tokens merge across the title's edges, so
    the prompt's length is measured, not added up; the cut falls on a token's end in the title's own text
    (character offsets: no half characters, no decode artefacts)."""
    frame = _prompt_ids(tokenizer, prompt, "")
    if len(frame) >= limit:
        need = len(frame) + 2
        while max_prompt_tokens(need) <= len(frame):
            need += 1
        raise SpecError(f"train.max_length {max_length}: the prompt without a title is already {len(frame)} "
                        f"tokens and {max_length - limit} are kept for the description; raise train.max_length "
                        f"to at least {need}")
    ends = _token_ends(tokenizer, title)
    kept, kept_ids = 0, frame  # the empty title fits (checked above)
    low, high = 0, len(ends)  # kept tokens: `low` fits, `high` (the whole title) does not
    while high - low > 1:
        mid = (low + high) // 2
        ids = _prompt_ids(tokenizer, prompt, title[:ends[mid - 1]].rstrip())
        if len(ids) <= limit:
            low, kept, kept_ids = mid, mid, ids
        else:
            high = mid
    cut = title[:ends[kept - 1]].rstrip() if kept else ""
    return FittedPrompt(build_prompt(tokenizer, prompt, cut), kept_ids, True, full_tokens)


def _prompt_ids(tokenizer, prompt: PromptSpec, title: str) -> list[int]:
    return encode_prompt(tokenizer, build_prompt(tokenizer, prompt, title))


def _token_ends(tokenizer, title: str) -> list[int]:
    """Where each of the title's tokens ends in the title (character offsets), in order, without repeats
    (byte-level tokens of one character share its end). Offsets come from a fast (Rust) tokenizer, which
    transformers loads wherever the model ships one or can convert its vocabulary."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"a title must be cut to fit train.max_length, and {type(tokenizer).__name__} is not a fast "
                        "tokenizer (no character offsets); raise train.max_length so that every prompt fits")
    offsets = tokenizer(title, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return sorted({end for _, end in offsets if end > 0})
