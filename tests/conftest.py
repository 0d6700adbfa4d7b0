"""Shared fixtures: a tiny random Llama with a ChatML tokenizer and a tiny random Gemma 3 base
model (no chat template, its own vocabulary, sliding-window layers), built in the test session.

Unit tests never download anything: the tokenizers are word-level vocabularies made from the
shipped demo data plus special tokens, and the models are 2-3 layer random networks.
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

    from harness.data.cleaning import clean_text

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


GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
TINY_GEMMA_WINDOW = 8  # sliding window of the tiny Gemma 3: shorter than its packed rows, so windows matter


def build_tiny_gemma3(folder: Path, seed: int = 0) -> Path:
    """A 3-layer random Gemma 3 base model shaped like google/gemma-3-270m: no chat template, BOS added
    by the tokenizer, EOS `<eos>`, two sliding-window layers (window 8) and one full-attention layer,
    and a vocabulary ordered differently from the tiny Llama's (same words, other ids, lower-cased extras)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

    words = _words(DEMO_DATA)
    extras = sorted({w.lower() for w in words} - set(words))
    vocab = {tok: i for i, tok in enumerate(GEMMA_SPECIALS + ["\n", "#"] + list(reversed(words)) + extras)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"),
                                                     pre_tokenizers.Whitespace()])
    backend.decoder = decoders.WordPiece(prefix="##")
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                           special_tokens=[("<bos>", vocab["<bos>"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                        eos_token="<eos>", bos_token="<bos>")
    torch.manual_seed(seed)
    config = Gemma3TextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
                              sliding_window=TINY_GEMMA_WINDOW,
                              layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                              max_position_embeddings=512, bos_token_id=vocab["<bos>"], eos_token_id=vocab["<eos>"],
                              pad_token_id=vocab["<pad>"], tie_word_embeddings=True)
    model = Gemma3ForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gemma3_dir(tmp_path_factory) -> Path:
    """The tiny Gemma 3 (use it with `prompt.template=alpaca`: it has no chat template)."""
    return build_tiny_gemma3(tmp_path_factory.mktemp("tiny-gemma3"))


@pytest.fixture(scope="session", params=["llama", "gemma3"])
def tiny_arch(request, tiny_model_dir, tiny_gemma3_dir) -> tuple[Path, list[str]]:
    """Both tiny architectures: (model folder, the overrides that architecture needs)."""
    if request.param == "llama":
        return tiny_model_dir, []
    return tiny_gemma3_dir, ["prompt.template=alpaca"]


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
    "model.random_weights=true",  # random test models: the probe measures them but does not refuse them
]


def tiny_overrides(model_dir: Path, *extra: str) -> list[str]:
    return [f"model.base={model_dir}", *TINY_OVERRIDES, *extra]


def run_tiny(tmp_path: Path, model_dir: Path, *extra: str) -> Path:
    """A full `run` of the shipped task on the tiny model (a few seconds), from inside tmp_path: a run
    copies its report into ./reports, which must not be the repository's."""
    from contextlib import chdir

    from harness.recipes.run import run_task

    tmp_path.mkdir(parents=True, exist_ok=True)
    with chdir(tmp_path):
        return run_task(str(REPO / "tasks" / "amazon_desc.yaml"), tiny_overrides(model_dir, *extra), tmp_path / "runs")


@pytest.fixture(scope="session", autouse=True)
def suite_leaves_the_repository_alone():
    """Fails the session if a test wrote run, sweep or report folders into the checkout (they belong in
    tmp_path: a test that runs from the repository's folder leaves the developer's reports/ littered)."""
    watched = [REPO / "runs", REPO / "sweeps", REPO / "comparisons", REPO / "reports" / "amazon_desc"]

    def listing() -> set[str]:
        return {str(p) for folder in watched if folder.is_dir() for p in folder.iterdir()}

    before = listing()
    yield
    written = sorted(listing() - before)
    assert not written, f"tests wrote into the repository: {written}"


@pytest.fixture(scope="session")
def tiny_run(tiny_model_dir, tmp_path_factory) -> Path:
    """One finished tiny run shared by tests that only read it (copy it before changing it)."""
    import os as _os

    root = tmp_path_factory.mktemp("tiny-run")
    previous = _os.environ.get("HARNESS_SCORE_CACHE")
    _os.environ["HARNESS_SCORE_CACHE"] = str(root / "score-cache")
    _os.environ["HARNESS_DEVICE"] = "cpu"
    try:
        return run_tiny(root, tiny_model_dir)
    finally:
        if previous is None:
            _os.environ.pop("HARNESS_SCORE_CACHE", None)
        else:
            _os.environ["HARNESS_SCORE_CACHE"] = previous
