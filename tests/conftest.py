"""Shared fixtures: a tiny random Llama with a ChatML tokenizer, built in the test session.

Unit tests never download anything: the tokenizer is a word-level vocabulary made from the
shipped demo data plus ChatML special tokens, and the model is a 2-layer random Llama.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
DEMO_DATA = REPO / "tasks" / "data" / "amazon_demo.jsonl"
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]


def _words(path: Path) -> list[str]:
    from tokenizers.pre_tokenizers import Whitespace

    from harness.data.records import clean_text

    seen: dict[str, None] = {}
    pre = Whitespace()
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        for text in (row["title"], row["content"]):
            for word, _ in pre.pre_tokenize_str(clean_text(text)):
                seen.setdefault(word)
    for word, _ in pre.pre_tokenize_str("Write a product description for the following product title . "
                                        "user assistant system"):
        seen.setdefault(word)
    return list(seen)


def build_tiny_model(folder: Path, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + ["\n"] + _words(DEMO_DATA))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"),
                                                     pre_tokenizers.Whitespace()])
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<|endoftext|>",
                                        eos_token="<|im_start|>",  # deliberately wrong, like transformers 5.17
                                        additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tokenizer.chat_template = CHATML_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=1, pad_token_id=0, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Base-score caches go to a per-session temp folder, never the user's cache.

    The embedded model's converted copy is still found in the real cache (read-only use)."""
    monkeypatch.setenv("HARNESS_SCORE_CACHE", str(tmp_path_factory.getbasetemp() / "score-cache"))
    monkeypatch.setenv("HARNESS_DEVICE", "cpu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


TINY_OVERRIDES = [
    "train.max_steps=4", "train.batch_size=4", "train.lr=0.02", "train.save_steps=2", "train.logging_steps=1",
    "train.max_length=96", "data.max_heldout=8", "data.max_train=40", "generation.max_new_tokens=8",
    "generation.batch_size=3", "metrics.bootstrap_replicates=200",
]


def tiny_overrides(model_dir: Path, *extra: str) -> list[str]:
    return [f"model.base={model_dir}", *TINY_OVERRIDES, *extra]


def run_tiny(tmp_path: Path, model_dir: Path, *extra: str) -> Path:
    """A full `run` of the shipped task on the tiny model (a few seconds)."""
    from harness.recipes.run import run_task

    return run_task(str(REPO / "tasks" / "amazon_desc.yaml"), tiny_overrides(model_dir, *extra), tmp_path / "runs")


@pytest.fixture(scope="session")
def tiny_run(tiny_model_dir, tmp_path_factory) -> Path:
    """One finished tiny run shared by tests that only read it (copy it before changing it)."""
    import os as _os

    root = tmp_path_factory.mktemp("tiny-run")
    previous = _os.environ.get("HARNESS_SCORE_CACHE")
    _os.environ["HARNESS_SCORE_CACHE"] = str(root / "score-cache")
    _os.environ["HARNESS_DEVICE"] = "cpu"
    cwd = Path.cwd()
    _os.chdir(root)  # reports/ lands here, not in the repo
    try:
        return run_tiny(root, tiny_model_dir)
    finally:
        _os.chdir(cwd)
        if previous is None:
            _os.environ.pop("HARNESS_SCORE_CACHE", None)
        else:
            _os.environ["HARNESS_SCORE_CACHE"] = previous
