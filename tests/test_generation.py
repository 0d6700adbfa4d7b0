"""Model-side scoring on the tiny model: perplexity by hand, batch invariance, EOS stops."""

import math

import numpy as np
import pytest
import torch

from harness import models
from harness.errors import ModelError
from harness.prompts import build_prompt, encode_example
from harness.generation import generate
from harness.likelihood import reference_nll
from harness.heldout_scoring import assert_adapter_applied
from harness.spec import GenerationSpec, ModelSpec, PromptSpec

CPU = models.Device("cpu")
TITLES = ["Garlic Press", "Kids' Rain Boots , Dinosaur Print", "Aquarium Starter Kit", "Mug"]
DESCRIPTIONS = ["A sturdy press for garlic .", "These fun rubber rain boots keep feet dry on rainy school days .",
                "Everything a beginner needs .", "A mug ."]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    tokenizer = models.load_tokenizer(str(tiny_model_dir), ModelSpec(), uses_chat_template=True)
    model = models.load_model(str(tiny_model_dir), ModelSpec(), tokenizer, CPU)
    return model, tokenizer


def encoded(tokenizer):
    return [encode_example(tokenizer, build_prompt(tokenizer, PromptSpec(), t), d, None)
            for t, d in zip(TITLES, DESCRIPTIONS)]


def test_perplexity_equals_a_hand_computation(loaded):
    model, tokenizer = loaded
    examples = encoded(tokenizer)
    nll, counts = reference_nll(model, examples, batch_size=3, device=CPU, pad_id=tokenizer.pad_token_id)
    for i, ex in enumerate(examples):
        with torch.no_grad():
            logits = model(torch.tensor([ex.input_ids])).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1)
        expected = -sum(logp[t - 1, ex.input_ids[t]].item() for t in range(len(ex.labels)) if ex.labels[t] != -100)
        assert counts[i] == ex.n_target_tokens
        assert nll[i] == pytest.approx(expected, rel=1e-5)
    corpus = math.exp(nll.sum() / counts.sum())
    assert math.isfinite(corpus) and corpus > 1


def test_batch_size_does_not_change_perplexity_or_generations(loaded):
    model, tokenizer = loaded
    examples = encoded(tokenizer)
    one = reference_nll(model, examples, 1, CPU, tokenizer.pad_token_id)
    four = reference_nll(model, examples, 4, CPU, tokenizer.pad_token_id)
    np.testing.assert_allclose(one[0], four[0], rtol=1e-5)
    assert (one[1] == four[1]).all()
    prompts = [build_prompt(tokenizer, PromptSpec(), t) for t in TITLES]
    gen = GenerationSpec(max_new_tokens=6)
    singles = generate(model, tokenizer, prompts, gen, CPU, batch_size=1)
    batched = generate(model, tokenizer, prompts, gen, CPU, batch_size=4)
    assert [g.text for g in singles] == [g.text for g in batched]


def test_generation_stops_at_the_end_of_turn_token(loaded):
    model, tokenizer = loaded
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    word = tokenizer.convert_tokens_to_ids("sturdy")
    calls = {"n": 0}

    def script(_module, _inputs, logits):  # first step: "sturdy"; every later step: <|im_end|>
        forced = eot if calls["n"] else word
        calls["n"] += 1
        logits[..., forced] += 1e4
        return logits

    hook = model.get_output_embeddings().register_forward_hook(script)
    try:
        prompts = [build_prompt(tokenizer, PromptSpec(), t) for t in TITLES[:2]]
        results = generate(model, tokenizer, prompts, GenerationSpec(max_new_tokens=10), CPU)
    finally:
        hook.remove()
    assert [(r.text, r.n_tokens, r.hit_max_new_tokens) for r in results] == [("sturdy", 1, False)] * 2


def test_unchanged_adapter_is_refused(tiny_model_dir, loaded):
    from peft import LoraConfig, get_peft_model

    _, tokenizer = loaded
    fresh = models.load_model(str(tiny_model_dir), ModelSpec(), tokenizer, CPU)
    peft_model = get_peft_model(fresh, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))  # B = 0: no change
    prompts = [build_prompt(tokenizer, PromptSpec(), t) for t in TITLES]
    with pytest.raises(ModelError, match="the adapter does not change the model"):
        assert_adapter_applied(peft_model, tokenizer, prompts, CPU)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.fill_(0.05)
    assert assert_adapter_applied(peft_model, tokenizer, prompts, CPU) > 1e-4


def test_no_repeat_ngram_size_reaches_generate(loaded, monkeypatch):
    from harness import degeneration

    model, tokenizer = loaded
    calls = []
    real = model.generate

    def spy(**kwargs):
        out = real(**kwargs)
        calls.append((kwargs["no_repeat_ngram_size"], out[:, kwargs["input_ids"].shape[1]:].tolist()))
        return out

    monkeypatch.setattr(model, "generate", spy)
    prompts = [build_prompt(tokenizer, PromptSpec(), t) for t in TITLES]
    trigrams = lambda ids: [tuple(ids[i:i + 3]) for i in range(len(ids) - 2)]  # noqa: E731
    # Off (the default): the random tiny model repeats one token, a loop the harness flags.
    free = generate(model, tokenizer, prompts, GenerationSpec(max_new_tokens=30), CPU)
    assert calls[-1][0] == 0 and all(len(set(trigrams(ids))) < len(trigrams(ids)) for ids in calls[-1][1])
    assert all(degeneration.loops(g.text) for g in free)
    # Size 3: no generated 3-gram of model tokens occurs twice.
    generate(model, tokenizer, prompts, GenerationSpec(max_new_tokens=30, no_repeat_ngram_size=3), CPU)
    size, rows = calls[-1]
    assert size == 3 and all(len(set(trigrams(ids))) == len(trigrams(ids)) == 28 for ids in rows)
