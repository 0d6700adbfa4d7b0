"""Model-side scoring on the tiny model: perplexity by hand, batch invariance, EOS stops, and the
fast scorer's engines giving the one-at-a-time loop's text."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from harness import devices, models
from harness.data.prompts import build_prompt, encode_example
from harness.errors import ModelError
from harness.errors import SpecError
from harness.scoring import decoding, generation
from harness.scoring.decoding import GenerationStats, deterministic_kernels
from harness.scoring.generation import Batch, bucket_width, generate, plan_batches
from harness.scoring.heldout_scoring import assert_adapter_applied
from harness.scoring.mbr_selection import mbr_choice
from harness.scoring.metrics import MetricSettings, pairwise_rouge_l
from harness.scoring.likelihood import reference_nll
from harness.spec import GenerationSpec, ModelSpec, PromptSpec, load_spec
from tests.conftest import REPO, run_tiny

CPU = devices.Device("cpu")
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
    gen = GenerationSpec(max_new_tokens=6, engine="dynamic")
    singles = generate(model, tokenizer, prompts, replace(gen, batch_size=1), CPU)
    batched = generate(model, tokenizer, prompts, replace(gen, batch_size=4), CPU)
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
    from harness.scoring import degeneration

    model, tokenizer = loaded
    calls = []
    real = model.generate

    def spy(**kwargs):
        out = real(**kwargs)
        sizes = [p.penalties.n for p in kwargs["logits_processor"] if p.penalties.ngrams]
        calls.append((sizes, out[:, kwargs["input_ids"].shape[1]:].tolist()))
        return out

    monkeypatch.setattr(model, "generate", spy)
    prompts = [build_prompt(tokenizer, PromptSpec(), t) for t in TITLES]
    trigrams = lambda ids: [tuple(ids[i:i + 3]) for i in range(len(ids) - 2)]  # noqa: E731
    # Off (the default): the random tiny model repeats one token, a loop the harness flags.
    free = generate(model, tokenizer, prompts, GenerationSpec(max_new_tokens=30), CPU)
    assert calls[-1][0] == [] and all(len(set(trigrams(ids))) < len(trigrams(ids)) for ids in calls[-1][1])
    assert all(degeneration.loops(g.text) for g in free)
    # Size 3: no generated 3-gram of model tokens occurs twice.
    generate(model, tokenizer, prompts, GenerationSpec(max_new_tokens=30, no_repeat_ngram_size=3), CPU)
    sizes, rows = calls[-1]
    assert sizes == [3] and all(len(set(trigrams(ids))) == len(trigrams(ids)) == 28 for ids in rows)


def test_repetition_penalties_count_the_output_only(talkative):
    """transformers' processors see the prompt and its left padding (the end-of-turn token). Applied to
    the output only, a batched row with padding decodes exactly as it does alone, and the output may
    repeat n-grams of its prompt."""
    from transformers import NoRepeatNGramLogitsProcessor

    model, tokenizer, prompts = talkative
    gen = GenerationSpec(max_new_tokens=20, batch_size=len(prompts), repetition_penalty=1.3, no_repeat_ngram_size=2)
    batched = generate(model, tokenizer, prompts, gen, CPU)
    assert [g.text for g in batched] == [g.text for g in one_at_a_time(model, tokenizer, prompts, gen)]
    width = 3
    prompt_and_output = torch.tensor([[5, 6, 7, 5]])  # the prompt holds the bigram (5, 6); the output is (5)
    scores = torch.zeros(1, 10)
    library = NoRepeatNGramLogitsProcessor(2)(prompt_and_output, scores.clone())
    ours = decoding.output_penalties(replace(gen, repetition_penalty=1.0), width, "cpu")[0](
        prompt_and_output, scores.clone())
    assert library[0, 6] == -float("inf") and ours[0, 6] == 0.0  # only the library bans copying the prompt


# -- the fast scorer: batch plan, engines, determinism ----------------------------------------------

LONG_TITLES = TITLES + ["Stainless Steel Water Bottle", "Wireless Mouse", "Yoga Mat",
                        "Dinosaur Print Backpack for Kids , Waterproof School Bag with Bottle Holder and Rain Cover"]


def _noisy_model(tiny_model_dir, tokenizer, scale: float):
    """The tiny model with random weights of this scale and a boosted end-of-turn row."""
    model = models.load_model(str(tiny_model_dir), ModelSpec(), tokenizer, CPU)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
        model.get_output_embeddings().weight[tokenizer.eos_token_id] *= 3
    return model


@pytest.fixture(scope="module")
def talkative(tiny_model_dir, loaded):
    """The tiny model with larger random weights: its greedy outputs differ from prompt to prompt, and a
    boosted end-of-turn row makes some stop after a few tokens while others run to max_new_tokens."""
    _, tokenizer = loaded
    model = _noisy_model(tiny_model_dir, tokenizer, 0.3)
    return model, tokenizer, [build_prompt(tokenizer, PromptSpec(), t) for t in LONG_TITLES]


def one_at_a_time(model, tokenizer, prompts, gen):
    loop = replace(gen, engine="dynamic", batch_size=1)
    return [generate(model, tokenizer, [p], loop, CPU)[0] for p in prompts]


def test_bucket_plan_groups_by_width_and_fills_every_batch():
    lengths = [17, 22, 18, 16, 19, 17, 17, 30, 70]
    assert [bucket_width(n, [20, 24, 32]) for n in (1, 20, 21, 32, 33, 65)] == [20, 20, 24, 32, 64, 96]
    plan = plan_batches(lengths, 3, [20, 24, 32])
    assert plan == [Batch([8], 96, 3), Batch([7], 32, 3), Batch([1], 24, 3),
                    Batch([4, 2, 0], 20, 3), Batch([5, 6, 3], 20, 3)]
    assert sorted(i for b in plan for i in b.indices) == list(range(len(lengths)))
    # the dynamic engine's plan: length-sorted, each batch as wide as its longest prompt, no filler rows
    assert plan_batches(lengths, 4) == [Batch([8, 7, 1, 4], 70, 4), Batch([2, 0, 5, 6], 18, 4), Batch([3], 16, 1)]


def _batched_equals_the_loop(model, tokenizer, prompts, gen):
    """Decode `prompts` with `gen`'s engine and one at a time; assert the same texts, lengths and stops."""
    loop = one_at_a_time(model, tokenizer, prompts, gen)
    stats = GenerationStats()
    fast = generate(model, tokenizer, prompts, gen, CPU, stats=stats)
    assert [(g.text, g.n_tokens, g.hit_max_new_tokens) for g in fast] == \
        [(g.text, g.n_tokens, g.hit_max_new_tokens) for g in loop]
    assert len({g.text for g in loop}) == len(prompts)  # a meaningful comparison: every output differs
    return loop, stats


def test_static_engine_gives_the_one_at_a_time_loop_text_exactly(talkative):
    model, tokenizer, prompts = talkative
    gen = GenerationSpec(max_new_tokens=20, engine="static", static_batch_size=3, prompt_buckets=[20, 24, 32])
    loop, stats = _batched_equals_the_loop(model, tokenizer, prompts, gen)
    assert {g.hit_max_new_tokens for g in loop} == {True, False} and min(g.n_tokens for g in loop) < 5
    assert stats.engine == "static" and stats.batches == 4 and stats.shapes == [[3, 32], [3, 24], [3, 20]]
    assert stats.warmup_s == 0.0  # nothing is compiled on the static engine


def test_compiled_engine_wiring_on_cpu_with_dynamo_eager_backend(talkative, tiny_model_dir, monkeypatch):
    """The compiled path (compile config, warm-up per shape, the check that transformers compiled) run on
    CPU through dynamo's eager backend: same text as the loop, one graph per shape, and a second model
    object of the same architecture reuses the compiled code (the merged tuned model's case)."""
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    def cpu_config():
        config = CompileConfig(backend="eager", dynamic=False)
        config._compile_all_devices = True  # transformers compiles on CUDA only unless told otherwise
        return config

    monkeypatch.setattr(generation, "_compile_blocker", lambda model, device: None)
    monkeypatch.setattr(generation, "_compile_config", cpu_config)
    model, tokenizer, prompts = talkative
    gen = GenerationSpec(max_new_tokens=12, engine="compiled", static_batch_size=4, prompt_buckets=[24, 32])
    loop = one_at_a_time(model, tokenizer, prompts, gen)
    torch._dynamo.reset()
    counters.clear()
    stats = GenerationStats()
    fast = generate(model, tokenizer, prompts, gen, CPU, stats=stats)
    assert [g.text for g in fast] == [g.text for g in loop]
    assert stats.engine == "compiled" and stats.shapes == [[4, 32], [4, 24]] and stats.warmup_s > 0
    assert counters["stats"]["unique_graphs"] == 2
    twin = models.load_model(str(tiny_model_dir), ModelSpec(), tokenizer, CPU)
    twin.load_state_dict(model.state_dict())
    assert [g.text for g in generate(twin, tokenizer, prompts, gen, CPU)] == [g.text for g in loop]
    assert counters["stats"]["unique_graphs"] == 2  # nothing recompiled for the second model


def test_engine_choice_fails_loudly_where_it_cannot_run(loaded):
    model, tokenizer = loaded
    prompts = [build_prompt(tokenizer, PromptSpec(), t) for t in TITLES]
    stats = GenerationStats()
    generate(model, tokenizer, prompts[:1], GenerationSpec(max_new_tokens=2), CPU, stats=stats)
    assert stats.engine == "dynamic"  # auto on CPU
    with pytest.raises(ModelError, match="generation.engine=compiled: compiled decoding needs a CUDA device"):
        generate(model, tokenizer, prompts, GenerationSpec(engine="compiled"), CPU)
    with pytest.raises(ModelError, match="streaming needs generation.engine=dynamic"):
        generate(model, tokenizer, prompts[:1], GenerationSpec(engine="static"), CPU, streamer=object())


# -- the graphs engine: our own decoding loop over fixed buffers (CUDA graphs on a GPU; uncaptured here) ----------

@pytest.fixture(scope="module")
def repetitive(tiny_model_dir, loaded):
    """Like `talkative` with smaller weights: greedy outputs repeat words (so the output penalties change them),
    some rows end after a few tokens, others run to max_new_tokens, and every prompt's output differs."""
    _, tokenizer = loaded
    model = _noisy_model(tiny_model_dir, tokenizer, 0.15)
    return model, tokenizer, [build_prompt(tokenizer, PromptSpec(), t) for t in LONG_TITLES]


@pytest.mark.parametrize("penalty, ngram", [(1.0, 0), (1.0, 2), (1.3, 0), (1.3, 3)])
def test_graphs_engine_gives_the_one_at_a_time_loop_text_exactly(repetitive, penalty, ngram):
    model, tokenizer, prompts = repetitive
    gen = GenerationSpec(max_new_tokens=20, engine="graphs", static_batch_size=3, prompt_buckets=[20, 24, 32],
                         repetition_penalty=penalty, no_repeat_ngram_size=ngram)
    loop, stats = _batched_equals_the_loop(model, tokenizer, prompts, gen)
    assert {g.hit_max_new_tokens for g in loop} == {True, False}  # rows end mid-batch while others go on
    # three prompt widths, 8 prompts in batches of 3: filler rows in the last batch of each width
    assert stats.engine == "graphs" and stats.batches == 4 and stats.shapes == [[3, 32], [3, 24], [3, 20]]
    assert stats.warmup_s == 0.0  # nothing is captured off CUDA
    if (penalty, ngram) != (1.0, 0):  # the penalties are exercised: they change what the model writes
        plain = one_at_a_time(model, tokenizer, prompts, replace(gen, repetition_penalty=1.0, no_repeat_ngram_size=0))
        assert [g.text for g in plain] != [g.text for g in loop]


@pytest.mark.parametrize("engine", ["graphs", "static"])
def test_min_new_tokens_holds_off_the_end_of_turn_on_every_engine(repetitive, engine):
    """generation.min_new_tokens: no output ends before it (transformers' MinNewTokensLengthLogitsProcessor
    in the one-at-a-time loop; the graphs engine's own device-side mask); the same texts on every engine."""
    model, tokenizer, prompts = repetitive
    gen = GenerationSpec(max_new_tokens=20, engine=engine, static_batch_size=3, prompt_buckets=[20, 24, 32],
                         repetition_penalty=1.3, no_repeat_ngram_size=2)
    free = generate(model, tokenizer, prompts, gen, CPU)
    floor = 8
    assert min(g.n_tokens for g in free) < floor  # without it some rows end early: the setting has work to do
    held, _ = _batched_equals_the_loop(model, tokenizer, prompts, replace(gen, min_new_tokens=floor))
    assert min(g.n_tokens for g in held) >= floor
    assert any(not g.hit_max_new_tokens for g in held)  # the end-of-turn token still ends outputs after it


def test_graphs_engine_decodes_the_same_text_every_time(repetitive):
    model, tokenizer, prompts = repetitive
    gen = GenerationSpec(max_new_tokens=20, engine="graphs", static_batch_size=4, prompt_buckets=[32],
                         repetition_penalty=1.2, no_repeat_ngram_size=2)
    first, again = (generate(model, tokenizer, prompts, gen, CPU) for _ in range(2))
    assert [(g.text, g.n_tokens) for g in first] == [(g.text, g.n_tokens) for g in again]
    assert len({g.text for g in first}) == len(prompts)


def test_grouped_decode_attention_equals_transformers_sdpa_with_repeated_heads():
    """The graphs engine's step attention (query heads packed per key/value head) against transformers' sdpa
    attention (which repeats keys and values per group on transformers 5.17) on one query token a row,
    with left padding masked out; prompts (several query tokens) go to transformers' own function."""
    from types import SimpleNamespace

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from harness.scoring.graph_decoding import grouped_decode_attention

    gen = torch.Generator().manual_seed(0)
    rows, heads, kv_heads, cache, dim = 5, 6, 2, 11, 8
    module = SimpleNamespace(num_key_value_groups=heads // kv_heads, is_causal=True, training=False)
    key, value = (torch.randn(rows, kv_heads, cache, dim, generator=gen) for _ in range(2))
    mask = torch.ones(rows, 1, 1, cache, dtype=torch.bool)
    mask[1, ..., :4] = mask[3, ..., :7] = False  # left padding
    for tokens in (1, 3):
        query = torch.randn(rows, heads, tokens, dim, generator=gen)
        step_mask = mask.expand(rows, 1, tokens, cache)
        ours, _ = grouped_decode_attention(module, query, key, value, step_mask, scaling=dim ** -0.5)
        theirs, _ = sdpa_attention_forward(module, query, key, value, step_mask, scaling=dim ** -0.5)
        assert ours.shape == theirs.shape == (rows, tokens, heads, dim)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_auto_engine_is_graphs_on_cuda_where_it_can_decode(tiny_model_dir, loaded):
    """auto: graphs on CUDA (greedy, sdpa); static there when graphs cannot decode; dynamic off CUDA. Only the
    device's kind is read, so a CUDA device is named without one."""
    model, tokenizer = loaded
    cuda = devices.Device("cuda")
    assert generation.resolve_engine(GenerationSpec(), cuda, model) == "graphs"
    assert generation.resolve_engine(GenerationSpec(), cuda) == "graphs"  # before the model is loaded
    assert generation.resolve_engine(GenerationSpec(do_sample=True), cuda, model) == "static"
    eager = models.load_model(str(tiny_model_dir), ModelSpec(), tokenizer, CPU, attn_implementation="eager")
    assert generation.resolve_engine(GenerationSpec(), cuda, eager) == "static"
    assert generation.resolve_engine(GenerationSpec(), CPU, model) == "dynamic"


def test_graphs_engine_leaves_the_models_attention_setting_alone(repetitive):
    model, tokenizer, prompts = repetitive
    generate(model, tokenizer, prompts, GenerationSpec(max_new_tokens=4, engine="graphs", static_batch_size=4,
                                                      prompt_buckets=[32]), CPU)
    assert models.transformers_model(model).config._attn_implementation == "sdpa"


@pytest.mark.parametrize("penalty, ngram", [(1.5, 0), (1.0, 1), (1.0, 2), (1.0, 3), (0.7, 2)])
def test_vectorised_output_penalties_equal_transformers_processors(penalty, ngram):
    """The fixed-shape penalties (the graphs engine's buffers, and as the processor the other engines pass to
    `generate`) against transformers' processors on the output slice, at every step of a random output over a
    small vocabulary (many repeated tokens and n-gram matches). Buffer columns past the step hold junk
    tokens, which must not count."""
    from transformers import LogitsProcessorList, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

    rows, vocab, max_new, width = 5, 7, 12, 4
    gen = GenerationSpec(max_new_tokens=max_new, repetition_penalty=penalty, no_repeat_ngram_size=ngram)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (rows, width), generator=g)
    out = torch.randint(0, vocab, (rows, max_new), generator=g)
    ours = decoding.OutputPenalties(gen, torch.device("cpu"))
    processor = decoding.output_penalties(gen, width, "cpu")
    library = LogitsProcessorList(([RepetitionPenaltyLogitsProcessor(penalty)] if penalty != 1.0 else [])
                                  + ([NoRepeatNGramLogitsProcessor(ngram)] if ngram else []))
    changed = banned = 0
    for step in range(max_new + 1):
        scores = torch.randn(rows, vocab, generator=g) * 3
        expected = library(out[:, :step], scores.clone())
        padded = torch.cat([scores, torch.zeros(rows, 1)], dim=1)  # the sink column
        ours(padded, out, torch.tensor([step]))
        assert torch.equal(padded[:, :vocab], expected), f"step {step}"
        assert torch.equal(processor(torch.cat([prompt, out[:, :step]], dim=1), scores.clone()), expected)
        changed += int((expected != scores).any(dim=1).sum())
        banned += int(torch.isinf(expected).sum())
    assert changed > rows  # the comparison is meaningful: the penalties acted on many rows and steps
    assert (banned > 0) == (ngram > 0)


def test_graphs_engine_refuses_what_it_cannot_decode(tiny_model_dir, loaded):
    model, tokenizer = loaded
    prompts = [build_prompt(tokenizer, PromptSpec(), t) for t in TITLES]
    with pytest.raises(ModelError, match=r"generation.engine=graphs decodes greedily only \(generation.do_sample "
                                         r"is true\); set generation.engine=static"):
        generate(model, tokenizer, prompts, GenerationSpec(engine="graphs", do_sample=True), CPU)
    eager = models.load_model(str(tiny_model_dir), ModelSpec(), tokenizer, CPU, attn_implementation="eager")
    with pytest.raises(ModelError, match=r"generation.engine=graphs needs sdpa attention \(the model uses eager\)"):
        generate(eager, tokenizer, prompts, GenerationSpec(engine="graphs"), CPU)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="captures CUDA graphs")
def test_graphs_engine_on_cuda_captures_once_per_shape_and_matches_the_static_engine(tiny_model_dir, loaded):
    """GPU only (the lead's check): captured replays give the static engine's text, one capture per shape."""
    _, tokenizer = loaded
    cuda = devices.Device("cuda")
    model = models.load_model(str(tiny_model_dir), ModelSpec(), tokenizer, cuda)
    prompts = [build_prompt(tokenizer, PromptSpec(), t) for t in LONG_TITLES]
    gen = GenerationSpec(max_new_tokens=24, engine="graphs", static_batch_size=3, prompt_buckets=[20, 24, 32],
                         repetition_penalty=1.2, no_repeat_ngram_size=3)
    stats = GenerationStats()
    graphs = generate(model, tokenizer, prompts, gen, cuda, stats=stats)
    static = generate(model, tokenizer, prompts, replace(gen, engine="static"), cuda)
    assert [g.text for g in graphs] == [g.text for g in static]
    assert stats.shapes == [[3, 32], [3, 24], [3, 20]] and stats.warmup_s > 0


def test_sampling_is_seeded_by_the_spec(talkative):
    model, tokenizer, prompts = talkative
    gen = GenerationSpec(max_new_tokens=12, do_sample=True, temperature=1.5, engine="static", static_batch_size=4,
                         prompt_buckets=[32])
    torch.manual_seed(123)
    first = [g.text for g in generate(model, tokenizer, prompts, gen, CPU)]
    caller_state = torch.random.get_rng_state()
    again = [g.text for g in generate(model, tokenizer, prompts, gen, CPU)]
    other = [g.text for g in generate(model, tokenizer, prompts, replace(gen, seed=1), CPU)]
    assert first == again and first != other
    assert torch.equal(torch.random.get_rng_state(), caller_state)  # the caller's random stream is untouched


# -- MBR decoding: N sampled candidates per prompt, the medoid kept ---------------------------------

def _spy_on_choices(monkeypatch) -> list[tuple[list, int]]:
    """Record every (candidates, chosen index) that `generate` picks a result from."""
    choices = []
    real = generation._choose

    def spy(candidates, gen):
        choices.append((candidates, real(candidates, gen)))
        return choices[-1][1]

    monkeypatch.setattr(generation, "_choose", spy)
    return choices


@pytest.mark.parametrize("engine, rows", [("dynamic", 4), ("static", 8)])
def test_mbr_returns_the_medoid_of_its_sampled_candidates_the_same_every_time(talkative, monkeypatch, engine, rows):
    """mbr_samples=4, sampling although do_sample is off: each result is the candidate with the highest mean
    ROUGE-L against the other three (the Generation itself: text, length, stop), the four candidates of a prompt
    decode in one batch (dynamic: one prompt a batch, so four rows of one seeded stream) and differ, and two
    calls give the same texts."""
    model, tokenizer, prompts = talkative
    gen = GenerationSpec(max_new_tokens=12, temperature=1.5, mbr_samples=4, engine=engine, batch_size=rows,
                         static_batch_size=rows, prompt_buckets=[32])
    choices = _spy_on_choices(monkeypatch)
    stats = GenerationStats()
    first = generate(model, tokenizer, prompts, gen, CPU, stats=stats)
    assert len(choices) == len(prompts) and all(len(candidates) == 4 for candidates, _ in choices)
    assert stats.batches == len(prompts) // (rows // 4) and stats.candidates == 4
    assert engine == "dynamic" or {rows_and_width[0] for rows_and_width in stats.shapes} == {rows}
    picked = {id(candidates[chosen]): (candidates, chosen) for candidates, chosen in choices}
    for result in first:
        candidates, chosen = picked[id(result)]  # the chosen Generation object itself
        means = pairwise_rouge_l([c.text for c in candidates], MetricSettings()).sum(axis=1) / 3
        assert chosen == int(np.flatnonzero(means == means.max())[0])
    assert all(len({c.text for c in candidates}) > 1 for candidates, _ in choices)  # sampled: they differ
    again = generate(model, tokenizer, prompts, gen, CPU)
    assert [g.text for g in first] == [g.text for g in again]
    greedy = generate(model, tokenizer, prompts, replace(gen, mbr_samples=0), CPU)
    assert [g.text for g in first] != [g.text for g in greedy]


def test_mbr_with_the_chrf_utility_keeps_chrfs_choice(talkative, monkeypatch):
    model, tokenizer, prompts = talkative
    choices = _spy_on_choices(monkeypatch)
    gen = GenerationSpec(max_new_tokens=12, temperature=1.5, mbr_samples=3, mbr_utility="chrf", batch_size=6)
    generate(model, tokenizer, prompts, gen, CPU)
    for candidates, chosen in choices:
        assert chosen == mbr_choice([c.text for c in candidates], "chrf")


def test_mbr_refuses_greedy_only_engines_and_streaming(loaded):
    """auto leaves graphs for static on CUDA (the device's kind is all it reads); an explicit graphs engine
    and a streamer fail in one line."""
    model, tokenizer = loaded
    prompts = [build_prompt(tokenizer, PromptSpec(), t) for t in TITLES]
    mbr = GenerationSpec(mbr_samples=4, max_new_tokens=4)
    assert generation.resolve_engine(mbr, devices.Device("cuda")) == "static"
    assert generation.resolve_engine(mbr, CPU, model) == "dynamic"
    with pytest.raises(ModelError, match=r"generation.engine=graphs decodes greedily only \(generation.mbr_samples "
                                         r"samples its candidates\); set generation.engine=static"):
        generate(model, tokenizer, prompts, replace(mbr, engine="graphs"), CPU)
    with pytest.raises(ModelError, match="streaming shows one decoding as it is produced, and generation.mbr_samples"):
        generate(model, tokenizer, prompts[:1], replace(mbr, engine="dynamic"), CPU, streamer=object())


def test_perplexity_does_not_depend_on_the_lm_head_chunk(loaded, monkeypatch):
    model, tokenizer = loaded
    examples = encoded(tokenizer)
    whole = reference_nll(model, examples, 4, CPU, tokenizer.pad_token_id)
    monkeypatch.setattr("harness.scoring.likelihood.HEAD_CHUNK", 3)
    chunked = reference_nll(model, examples, 4, CPU, tokenizer.pad_token_id)
    np.testing.assert_allclose(whole[0], chunked[0], rtol=1e-6)
    assert (whole[1] == chunked[1]).all()


@pytest.mark.parametrize("value", ["[]", "[128, 64]", "[0, 64]"])
def test_prompt_buckets_must_be_increasing_positive_widths(value):
    with pytest.raises(SpecError, match="generation.prompt_buckets: must list positive widths in increasing order"):
        load_spec(str(REPO / "tasks" / "amazon_desc.yaml"), [f"generation.prompt_buckets={value}"])


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["static", "graphs"])
def test_the_same_command_writes_byte_identical_predictions(tmp_path, tiny_model_dir, monkeypatch, engine):
    """Two runs of the same command (base scores recomputed, not read from the cache) on a static-batch engine."""
    monkeypatch.chdir(tmp_path)
    outputs = []
    for name in ("first", "second"):
        monkeypatch.setenv("HARNESS_SCORE_CACHE", str(tmp_path / name / "score-cache"))
        run = run_tiny(tmp_path / name, tiny_model_dir, f"generation.engine={engine}", "generation.static_batch_size=4",
                       "generation.prompt_buckets=[16, 32]")
        outputs.append((run / "predictions.jsonl").read_bytes())
    assert outputs[0] == outputs[1] and outputs[0].count(b"\n") == 8


def test_a_run_forcing_compiled_decoding_on_cpu_stops_before_any_model_work(tmp_path, tiny_model_dir, monkeypatch):
    import json

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match="generation.engine=compiled: compiled decoding needs a CUDA device"):
        run_tiny(tmp_path, tiny_model_dir, "generation.engine=compiled")
    (manifest,) = (tmp_path / "runs").glob("*/manifest.json")
    data = json.loads(manifest.read_text())
    assert data["status"] == "failed" and "score_base" not in data["stages_done"]


def test_scoring_runs_only_bit_reproducible_attention_kernels():
    """cuDNN's SDPA gave different texts for the same prompts on an H100 (130 of 142 identical); scoring
    leaves it and flash out, and puts the caller's kernel settings back afterwards."""
    cuda = torch.backends.cuda
    before = (cuda.cudnn_sdp_enabled(), cuda.flash_sdp_enabled(), torch.are_deterministic_algorithms_enabled())
    with deterministic_kernels():
        assert not cuda.cudnn_sdp_enabled() and not cuda.flash_sdp_enabled()
        assert cuda.mem_efficient_sdp_enabled() and cuda.math_sdp_enabled()
        assert torch.are_deterministic_algorithms_enabled()
    assert (cuda.cudnn_sdp_enabled(), cuda.flash_sdp_enabled(), torch.are_deterministic_algorithms_enabled()) == before
