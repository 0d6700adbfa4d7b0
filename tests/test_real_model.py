"""The few tests that load the real embedded SmolLM2-135M-Instruct (fetched by `make setup`)."""

import hashlib

import pytest

from harness import devices, models
from harness.data.prompts import build_prompt, encode_example
from harness.models import base_files
from harness.scoring.generation import generate
from harness.scoring.likelihood import reference_nll
from harness.spec import EMBEDDED_MODEL, GenerationSpec, ModelSpec, PromptSpec
from tests.conftest import SHARED_DATA, REPO, run_tiny

pytestmark = pytest.mark.real_model
CPU = devices.Device("cpu")


@pytest.fixture(scope="module")
def smollm2():
    ref = base_files.resolve_base(EMBEDDED_MODEL)
    tokenizer = models.load_tokenizer(ref, ModelSpec(), uses_chat_template=True)
    return models.load_model(ref, ModelSpec(), tokenizer, CPU), tokenizer, ref


def test_embedded_gguf_is_the_pinned_file():
    gguf = base_files.embedded_gguf(base_files.EMBEDDED_MODELS["smollm2-135m-instruct"])
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert digest == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def test_real_model_ends_turns_with_im_end_and_generates(smollm2):
    model, tokenizer, ref = smollm2
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token == "<|im_end|>"
    assert model.config.eos_token_id == im_end == model.generation_config.eos_token_id
    prompt = build_prompt(tokenizer, PromptSpec(), "Stainless Steel Garlic Press")
    assert prompt.endswith("<|im_start|>assistant\n")
    assert encode_example(tokenizer, prompt, "A press.", None).input_ids[-1] == im_end
    out = generate(model, tokenizer, [prompt], GenerationSpec(max_new_tokens=200), CPU)[0]
    assert len(out.text.split()) >= 5 and "<|im" not in out.text
    assert not out.hit_max_new_tokens  # it stopped at <|im_end|> by itself


def test_real_model_perplexity_prefers_a_matching_description(smollm2):
    model, tokenizer, _ = smollm2
    prompt = build_prompt(tokenizer, PromptSpec(), "Stainless Steel Garlic Press")
    good = encode_example(tokenizer, prompt, "This stainless steel garlic press crushes cloves in seconds.", None)
    bad = encode_example(tokenizer, prompt, "Seventeen purple elephants negotiate tax law on Mars.", None)
    nll, counts = reference_nll(model, [good, bad], 2, CPU, tokenizer.pad_token_id)
    assert nll[0] / counts[0] < nll[1] / counts[1]


@pytest.mark.skipif(not (SHARED_DATA / "amazon_titles_sample.jsonl").is_file(), reason="../shared/data absent")
def test_run_on_real_records_from_both_shared_files(tmp_path, tiny_model_dir, monkeypatch):
    """`run` pointed at the real records (a glob over both files), on the tiny model for speed."""
    import json

    monkeypatch.chdir(tmp_path)
    run = run_tiny(tmp_path, tiny_model_dir, f"data.path=[{SHARED_DATA}/amazon_titles_*.jsonl]")
    counts = json.loads((run / "manifest.json").read_text())["data_counts"]
    assert counts["read"] == 449 + 346 and counts["train"] == 40 and counts["train_capped"] > 400
    assert json.loads((run / "metrics.json").read_text())["tuned"]["chrf"]["value"] >= 0
    assert REPO not in run.parents
