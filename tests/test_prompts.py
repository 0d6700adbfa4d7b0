"""Prompt building and the end-of-turn token: one path for training, scoring and serving."""

from harness import devices, models
from harness.data.prompts import build_prompt, completion_text, encode_example
from harness.spec import ModelSpec, PromptSpec


def load(tiny_model_dir):
    return models.load_tokenizer(str(tiny_model_dir), ModelSpec(), uses_chat_template=True)


def test_eos_is_the_end_of_turn_token_even_when_the_tokenizer_says_otherwise(tiny_model_dir):
    tokenizer = load(tiny_model_dir)  # saved with eos <|im_start|>, as transformers 5.17 reads the GGUF
    assert tokenizer.eos_token == "<|im_end|>"
    assert completion_text(tokenizer, "A mug.").endswith("<|im_end|>")


def test_model_and_generation_config_get_the_same_eos(tiny_model_dir):
    tokenizer = load(tiny_model_dir)
    model = models.load_model(str(tiny_model_dir), ModelSpec(), tokenizer, devices.Device("cpu"))
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert model.config.eos_token_id == eot
    assert model.generation_config.eos_token_id == eot


def test_prompt_uses_chat_template_and_ends_where_the_answer_starts(tiny_model_dir):
    tokenizer = load(tiny_model_dir)
    prompt = build_prompt(tokenizer, PromptSpec(instruction="Describe"), "Garlic Press")
    assert prompt.startswith("<|im_start|>user\nDescribe\n\nGarlic Press<|im_end|>")
    assert prompt.endswith("<|im_start|>assistant\n")
    custom = build_prompt(tokenizer, PromptSpec(template="Title: {title}\nDescription:"), "Mug")
    assert custom == "Title: Mug\nDescription:"


def test_labels_mask_the_prompt_and_end_with_eos(tiny_model_dir):
    tokenizer = load(tiny_model_dir)
    prompt = build_prompt(tokenizer, PromptSpec(), "Garlic Press")
    enc = encode_example(tokenizer, prompt, "A sturdy press .", max_length=None)
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert enc.labels[:n_prompt] == [-100] * n_prompt
    assert enc.labels[n_prompt:] == enc.input_ids[n_prompt:]
    assert enc.input_ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    short = encode_example(tokenizer, prompt, "word " * 200, max_length=n_prompt + 5)
    assert len(short.input_ids) == n_prompt + 5 and short.n_target_tokens == 5
