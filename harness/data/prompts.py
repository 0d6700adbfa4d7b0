"""One prompt path for training, scoring, generation and serving.

What is served is what was scored is what was trained: every caller builds prompts and
token sequences through these functions and nowhere else.

Where the answer ends (EOS) depends on the prompt format, and is set once on the tokenizer
(`models.configure_tokenizer`): with the chat template (`prompt.template: null`) it is the
template's end-of-turn token (`<|im_end|>` for ChatML); with a preset (`alpaca`, `llama2_inst`)
or a custom format string it is the tokenizer's own `eos_token` (`</s>` for Llama-2), the token
Unsloth and TRL notebooks append as `EOS_TOKEN`. Training appends it (`completion_text`),
generation stops at it.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    all_prompt_ids = tokenizer(list(prompt_texts), add_special_tokens=False)["input_ids"]
    all_target_ids = tokenizer([completion_text(tokenizer, d) for d in descriptions],
                               add_special_tokens=False)["input_ids"]
    out = []
    for prompt_ids, target_ids in zip(all_prompt_ids, all_target_ids, strict=True):
        if max_length is not None:
            room = max_length - len(prompt_ids)
            if room < 1:
                raise ValueError(f"prompt is {len(prompt_ids)} tokens: no room for a description in max_length={max_length}")
            target_ids = target_ids[:room]
        out.append(EncodedExample(prompt_ids + target_ids, [-100] * len(prompt_ids) + target_ids))
    return out
