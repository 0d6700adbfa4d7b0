"""Gemma 3's sliding-window layers through harness's fast paths, on the tiny Gemma 3 (window 8, layers
[sliding, sliding, full]): the varlen attention gives each layer its window, packed sdpa keeps it, and
`auto` turns off what would compute something else than the model (with the reason in the manifest)."""

import functools
from pathlib import Path

import pytest
import torch

from harness import devices, models
from harness.errors import HarnessError
from harness.models import attention
from harness.spec import ModelSpec, TaskSpec
from harness.training import fast_paths
from harness.training.fast_paths import fast_path_options
from tests.conftest import TINY_GEMMA_WINDOW

LENGTHS = (13, 20, 11)  # every example longer than the window of 8


def flash_varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None,
                           window_size=(-1, -1), enable_gqa=False):
    """torch.nn.attention.varlen.varlen_attn (2.11+ signature) written from FlashAttention's documented
    semantics, in plain float64 PyTorch (the kernel is CUDA-only): within each sequence of cu_q/cu_k, query
    i sees key j when i - left <= j <= i + right, a bound of -1 meaning unbounded; softmax(q k^T * scale) v,
    scale defaulting to head_dim ** -0.5; with enable_gqa, query head h reads key/value head
    h // (query heads / key heads)."""
    left, right = window_size
    heads, kv_heads = q.shape[1], k.shape[1]
    assert heads == kv_heads or enable_gqa
    kv_index = torch.arange(heads) // (heads // kv_heads)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.empty_like(q)
    for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        qs, ks, vs = q[s:e].double(), k[s:e, kv_index].double(), v[s:e, kv_index].double()
        i = torch.arange(e - s).unsqueeze(1)
        j = torch.arange(e - s).unsqueeze(0)
        allowed = ((left < 0) | (j >= i - left)) & ((right < 0) | (j <= i + right))
        scores = torch.einsum("qhd,khd->hqk", qs, ks) * scale
        weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        out[s:e] = torch.einsum("hqk,khd->qhd", weights, vs).to(q.dtype)
    return out


def _recording(kernel, seen: list):
    @functools.wraps(flash_varlen_reference)  # keeps the signature harness inspects
    def recording(*args, **kwargs):
        seen.append(kwargs.get("window_size"))
        return kernel(*args, **kwargs)

    return recording


def _full_causal_only(q, k, v, cu_q, cu_k, max_q, max_k, *, window_size=(-1, -1), **kwargs):
    """The old behaviour: every layer causal over its whole example, whatever window was asked for."""
    return flash_varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, window_size=(-1, 0), **kwargs)


def _gemma(folder, implementation: str):
    tokenizer = models.load_tokenizer(str(folder), ModelSpec(), uses_chat_template=False)
    model = models.load_model(str(folder), ModelSpec(), tokenizer, devices.Device("cpu"),
                              attn_implementation=implementation)
    return model


def _examples(vocab: int):
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(5, vocab, (n,), generator=generator) for n in LENGTHS]


def _with_lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                            task_type="CAUSAL_LM", init_lora_weights=False))
    return lora


def _packed_logits_and_grads(model, examples):
    ids = torch.cat(examples).unsqueeze(0)
    positions = torch.cat([torch.arange(len(x)) for x in examples]).unsqueeze(0)
    out = model(input_ids=ids, position_ids=positions, labels=ids.clone(), use_cache=False)
    return out.logits[0], out


def _alone_logits(model, examples):
    return torch.cat([model(input_ids=x.unsqueeze(0), use_cache=False).logits[0] for x in examples])


def _lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _loss_per_example(logits, examples):
    """Sum of each example's own next-token loss (packing must not add cross-example terms)."""
    total, start = 0.0, 0
    for x in examples:
        part = logits[start:start + len(x)]
        total = total + torch.nn.functional.cross_entropy(part[:-1], x[1:], reduction="sum")
        start += len(x)
    return total


@pytest.mark.parametrize("reference", ["eager", "sdpa"])
def test_windowed_varlen_matches_the_models_own_attention_per_example(tiny_gemma3_dir, monkeypatch, reference):
    """Packed rows of examples longer than the window: varlen (each layer its window) gives the logits and
    LoRA gradients of the model's own attention run on each example alone."""
    import torch.nn.attention.varlen as varlen_module

    seen = []
    monkeypatch.setattr(varlen_module, "varlen_attn", _recording(flash_varlen_reference, seen))
    varlen = _with_lora(_gemma(tiny_gemma3_dir, "varlen"))
    own = _with_lora(_gemma(tiny_gemma3_dir, reference))
    examples = _examples(varlen.config.vocab_size)

    packed, _ = _packed_logits_and_grads(varlen, examples)
    _loss_per_example(packed, examples).backward()
    alone = _alone_logits(own, examples)
    _loss_per_example(alone, examples).backward()

    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-5)
    grads_varlen, grads_own = _lora_grads(varlen), _lora_grads(own)
    assert grads_varlen.keys() == grads_own.keys() and len(grads_own) == 4 * 2 * 3  # 4 projections, A and B, 3 layers
    for name, grad in grads_own.items():  # float32 sums in another order: relative error of the whole tensor
        assert ((grads_varlen[name] - grad).norm() / grad.norm()).item() < 1e-4, name
    # Each of the three layers called the kernel once: the sliding ones with the window, the full one causal.
    assert seen == [(TINY_GEMMA_WINDOW - 1, 0), (TINY_GEMMA_WINDOW - 1, 0), (-1, 0)]


def test_the_full_causal_kernel_differs_so_the_check_has_teeth(tiny_gemma3_dir, monkeypatch):
    import torch.nn.attention.varlen as varlen_module

    monkeypatch.setattr(varlen_module, "varlen_attn", functools.wraps(flash_varlen_reference)(_full_causal_only))
    varlen, own = _gemma(tiny_gemma3_dir, "varlen"), _gemma(tiny_gemma3_dir, "eager")
    examples = _examples(varlen.config.vocab_size)
    with torch.no_grad():
        packed, _ = _packed_logits_and_grads(varlen, examples)
        alone = _alone_logits(own, examples)
    n = TINY_GEMMA_WINDOW
    torch.testing.assert_close(packed[:n], alone[:n], rtol=1e-4, atol=1e-5)  # within the window: same
    assert (packed - alone).abs().max() > 1e-2  # past it: the old kernel looks too far back


def test_a_row_without_boundaries_keeps_the_window(tiny_gemma3_dir, monkeypatch):
    """One example alone in a row (no restart in position_ids): full layers go to sdpa as before, sliding
    layers to the kernel with their window, since sdpa without a mask would attend past it."""
    import torch.nn.attention.varlen as varlen_module

    seen = []
    monkeypatch.setattr(varlen_module, "varlen_attn", _recording(flash_varlen_reference, seen))
    varlen, own = _gemma(tiny_gemma3_dir, "varlen"), _gemma(tiny_gemma3_dir, "eager")
    rows = torch.stack(_examples(varlen.config.vocab_size)[1:2] * 2)  # two rows, 20 tokens each
    with torch.no_grad():
        torch.testing.assert_close(varlen(input_ids=rows, use_cache=False).logits,
                                   own(input_ids=rows, use_cache=False).logits, rtol=1e-4, atol=1e-5)
    assert seen == [(TINY_GEMMA_WINDOW - 1, 0)] * 2


def test_cached_decoding_under_varlen_keeps_the_window(tiny_gemma3_dir, monkeypatch):
    """With a KV cache (queries fewer than keys) the layers go to sdpa with transformers' window mask."""
    import torch.nn.attention.varlen as varlen_module

    monkeypatch.setattr(varlen_module, "varlen_attn", flash_varlen_reference)
    varlen, own = _gemma(tiny_gemma3_dir, "varlen"), _gemma(tiny_gemma3_dir, "eager")
    prompt = _examples(varlen.config.vocab_size)[1].unsqueeze(0)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(varlen.generate(input_ids=prompt, **kwargs), own.generate(input_ids=prompt, **kwargs))


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_packed_sdpa_keeps_the_window(tiny_gemma3_dir, implementation):
    """The CPU (and varlen-less) packing path: transformers' position_ids-based packed mask is the sliding
    mask within each example."""
    model = _gemma(tiny_gemma3_dir, implementation)
    examples = _examples(model.config.vocab_size)
    with torch.no_grad():
        packed, _ = _packed_logits_and_grads(model, examples)
        alone = _alone_logits(model, examples)
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-5)


# -- the fast-path switches for the architecture ---------------------------------------------------
def _cuda_spec(folder, monkeypatch, **train_settings) -> TaskSpec:
    monkeypatch.setattr(attention, "varlen_available", lambda: True)
    spec = TaskSpec(name="t")
    spec.model.base = str(folder)
    for key, value in train_settings.items():
        setattr(spec.train, key, value)
    return spec


def _legacy_kernel(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None):
    """PyTorch 2.10's signature: causal or not, no window."""
    raise AssertionError("not called")


def test_a_kernel_without_window_is_refused_for_sliding_models(tiny_gemma3_dir, tiny_model_dir, monkeypatch):
    import torch.nn.attention.varlen as varlen_module

    monkeypatch.setattr(varlen_module, "varlen_attn", _legacy_kernel)
    spec = _cuda_spec(tiny_gemma3_dir, monkeypatch)
    reasons = {}
    fast = fast_path_options(spec, devices.Device("cuda"), reasons)
    assert fast["attention"] == "sdpa" and fast["cuda_graphs"] is False
    assert "sliding-window layers" in reasons["attention"] and "window_size" in reasons["attention"]
    assert "varlen attention kernel" in reasons["cuda_graphs"]
    spec.train.attention = "varlen"
    with pytest.raises(HarnessError, match="train.attention: 'varlen' cannot run this model: gemma3_text has sliding"):
        fast_path_options(spec, devices.Device("cuda"))
    spec.train.attention, spec.train.cuda_graphs = "auto", "on"
    with pytest.raises(HarnessError, match=r"cuda_graphs: 'on' needs packing with the varlen .*\(attention: gemma3"):
        fast_path_options(spec, devices.Device("cuda"))
    # The Llama keeps the kernel: it has no windows.
    assert fast_path_options(_cuda_spec(tiny_model_dir, monkeypatch), devices.Device("cuda"))["attention"] == "varlen"


def test_a_kernel_with_window_keeps_the_fast_paths_for_gemma3(tiny_gemma3_dir, monkeypatch):
    import torch.nn.attention.varlen as varlen_module

    monkeypatch.setattr(varlen_module, "varlen_attn", flash_varlen_reference)
    monkeypatch.setattr(fast_paths, "weight_bytes", lambda ref: 536e6)  # Gemma 3 270M in bf16
    monkeypatch.setattr(fast_paths, "_has_bitsandbytes", lambda: True)
    reasons = {}
    fast = fast_path_options(_cuda_spec(tiny_gemma3_dir, monkeypatch), devices.Device("cuda"), reasons)
    assert fast["attention"] == "varlen" and fast["packing"] and fast["fused_lora"] and fast["cuda_graphs"]
    assert "attention" not in reasons and "cuda_graphs" not in reasons
    assert "4 GB" in reasons["quantize"]


@pytest.mark.parametrize("key, value, message", [
    ("attn_logit_softcapping", 50.0, "soft-caps its attention logits"),
    ("use_bidirectional_attention", True, "attends bidirectionally"),
    ("layer_types", ["chunked_attention"] * 3, "has chunked_attention layers")])
def test_attention_the_kernel_cannot_compute_is_refused(tiny_gemma3_dir, tmp_path, monkeypatch, key, value, message):
    import json
    import shutil

    import torch.nn.attention.varlen as varlen_module

    monkeypatch.setattr(varlen_module, "varlen_attn", flash_varlen_reference)
    folder = tmp_path / "variant"
    shutil.copytree(tiny_gemma3_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    reasons = {}
    assert fast_path_options(_cuda_spec(folder, monkeypatch), devices.Device("cuda"), reasons)["attention"] == "sdpa"
    assert message in reasons["attention"]


def test_liger_is_used_only_for_model_types_it_patches(tiny_gemma3_dir, tiny_model_dir, monkeypatch):
    """liger-kernel chooses its patch by model_type and silently skips types it lacks: harness asks first.
    (liger-kernel is not installed on CPU: its table is stood in for by the entries it has for these.)"""
    import sys
    import types

    table = types.ModuleType("liger_kernel.transformers.monkey_patch")
    table.MODEL_TYPE_TO_APPLY_LIGER_FN = {"llama": object(), "gemma3_text": object(), "gemma3": object()}
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", table)
    monkeypatch.setattr(fast_paths, "_has_liger", lambda: True)
    for folder in (tiny_gemma3_dir, tiny_model_dir):
        assert fast_path_options(_cuda_spec(folder, monkeypatch), devices.Device("cuda"))["liger_kernels"] is True
    del table.MODEL_TYPE_TO_APPLY_LIGER_FN["gemma3_text"]
    reasons = {}
    assert fast_path_options(_cuda_spec(tiny_gemma3_dir, monkeypatch), devices.Device("cuda"), reasons)[
        "liger_kernels"] is False
    assert reasons["liger_kernels"] == "liger-kernel has no kernels for model type 'gemma3_text'"
    with pytest.raises(HarnessError, match="liger_kernels: 'on': liger-kernel has no kernels for model type"):
        fast_path_options(_cuda_spec(tiny_gemma3_dir, monkeypatch, liger_kernels="on"), devices.Device("cuda"))


def test_every_fast_path_off_on_cpu_says_why(tiny_gemma3_dir):
    spec = TaskSpec(name="t")
    spec.model.base = str(tiny_gemma3_dir)
    reasons = {}
    fast = fast_path_options(spec, devices.Device("cpu"), reasons)
    off = {name for name, value in fast.items() if value in (False, "off", "sdpa")}
    assert off == set(reasons) and off == set(fast)
    assert reasons["cuda_graphs"] == "needs a CUDA device" and reasons["attention"] == "no CUDA device"


# -- decoding: every engine keeps the window --------------------------------------------------------
@pytest.fixture(scope="module")
def talkative_gemma3(tiny_gemma3_dir):
    """The tiny Gemma 3 with larger random weights (greedy outputs change from prompt to prompt and over
    the output), and alpaca prompts of ~50 tokens: prompts and outputs both longer than the window of 8."""
    from harness.data.prompts import build_prompt
    from harness.spec import PromptSpec

    tokenizer = models.load_tokenizer(str(tiny_gemma3_dir), ModelSpec(), uses_chat_template=False)
    model = models.load_model(str(tiny_gemma3_dir), ModelSpec(), tokenizer, devices.Device("cpu"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    titles = ["Garlic Press", "Kids' Rain Boots , Dinosaur Print", "Aquarium Starter Kit", "Mug", "Wireless Mouse",
              "Yoga Mat"]
    return model, tokenizer, [build_prompt(tokenizer, PromptSpec(template="alpaca"), t) for t in titles]


def _transformers_generate(model, tokenizer, prompts, max_new_tokens: int) -> list[str]:
    """transformers' own greedy `generate`, one prompt at a time (no padding), decoded as harness does."""
    from harness.data.prompts import encode_prompt

    texts = []
    for prompt in prompts:
        ids = torch.tensor([encode_prompt(tokenizer, prompt)])
        assert ids.shape[1] > TINY_GEMMA_WINDOW
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
        kept = out[:out.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in out else out
        texts.append(tokenizer.decode(kept, skip_special_tokens=True).strip())
    return texts


@pytest.mark.parametrize("engine", ["graphs", "static", "dynamic"])
def test_every_engine_decodes_transformers_own_tokens_past_the_window(talkative_gemma3, engine):
    """Batched, left-padded decoding of prompts and outputs longer than the window gives what transformers'
    `generate` gives for each prompt alone (the graphs engine runs its step uncaptured off CUDA)."""
    from harness.scoring.decoding import GenerationStats
    from harness.scoring.generation import generate
    from harness.spec import GenerationSpec

    model, tokenizer, prompts = talkative_gemma3
    gen = GenerationSpec(max_new_tokens=14, engine=engine, static_batch_size=4, batch_size=4, prompt_buckets=[64])
    stats = GenerationStats()
    ours = generate(model, tokenizer, prompts, gen, devices.Device("cpu"), stats=stats)
    expected = _transformers_generate(model, tokenizer, prompts, gen.max_new_tokens)
    assert stats.engine == engine and [g.text for g in ours] == expected
    assert len(set(expected)) == len(prompts) and all(g.n_tokens > TINY_GEMMA_WINDOW for g in ours)


def test_the_graphs_engine_without_its_window_differs_so_the_check_has_teeth(talkative_gemma3, monkeypatch):
    from harness.scoring import graph_decoding
    from harness.scoring.generation import generate
    from harness.spec import GenerationSpec

    model, tokenizer, prompts = talkative_gemma3
    monkeypatch.setattr(graph_decoding, "masked_window", lambda config: 10**6)  # every layer sees everything
    gen = GenerationSpec(max_new_tokens=14, engine="graphs", static_batch_size=4, prompt_buckets=[64])
    unwindowed = [g.text for g in generate(model, tokenizer, prompts, gen, devices.Device("cpu"))]
    expected = _transformers_generate(model, tokenizer, prompts, gen.max_new_tokens)
    assert sum(a != b for a, b in zip(unwindowed, expected)) >= len(prompts) // 2


def test_auto_decodes_gemma3_with_graphs_on_cuda_and_says_why_elsewhere(talkative_gemma3, tiny_gemma3_dir):
    from harness.scoring.generation import auto_engine_reason, resolve_engine
    from harness.spec import GenerationSpec

    model, tokenizer, _ = talkative_gemma3
    cuda, cpu = devices.Device("cuda"), devices.Device("cpu")
    assert resolve_engine(GenerationSpec(), cuda, model) == "graphs"
    assert auto_engine_reason(GenerationSpec(), cuda, model) == ""
    assert auto_engine_reason(GenerationSpec(), cpu, model).startswith("no CUDA device")
    eager = _gemma(tiny_gemma3_dir, "eager")
    assert resolve_engine(GenerationSpec(), cuda, eager) == "static"
    assert auto_engine_reason(GenerationSpec(), cuda, eager) == \
        "generation.engine=graphs needs sdpa attention (the model uses eager)"


def test_a_sliding_model_without_per_type_masks_is_still_refused_by_graphs(tiny_gemma3_dir):
    """Only models whose layers are typed (and so take a mask per type) get the masked window."""
    from transformers import MistralConfig

    from harness.scoring.graph_decoding import _other_cache_layer, masked_window

    class Bare:
        config = MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, sliding_window=8)

    if getattr(Bare.config, "layer_types", None):  # this transformers types Mistral's layers: nothing to refuse
        pytest.skip("MistralConfig has layer_types here")
    assert masked_window(Bare.config) is None and _other_cache_layer(Bare()) == "StaticSlidingWindowLayer"


def test_the_gpu_check_script_runs_and_passes_on_cpu_with_the_reference_kernel(monkeypatch):
    """bench/sliding_window_check.py, small and on CPU with the reference kernel standing in for FlashAttention's
    (the lead runs it on the GPU): every check runs, passes, and tells the old kernel apart."""
    import importlib.util

    import torch.nn.attention.varlen as varlen_module

    from tests.conftest import REPO

    loaded = importlib.util.spec_from_file_location("sliding_window_check", REPO / "bench" / "sliding_window_check.py")
    check = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(check)
    monkeypatch.setattr(check, "DEVICE", "cpu")
    monkeypatch.setattr(varlen_module, "varlen_attn", flash_varlen_reference)
    assert all(all(v for k, v in row.items() if isinstance(v, bool)) for row in check.kernel_check())
    config = check.gemma3_config(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
                                 sliding_window=TINY_GEMMA_WINDOW,
                                 layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    rows, bounds = check.model_check([12, 20, 11], config)
    for row in rows[1:3]:  # windowed varlen and packed sdpa
        assert row["logits rel. err"] <= bounds["logits"] and row["LoRA grad rel. err"] <= bounds["grads"], row
    assert rows[3]["logits rel. err past the window"] > bounds["teeth"]
    decode = check.decode_check(3, config, (10, 14), 12)
    assert decode["graphs = transformers generate (rows)"] == 3
    assert decode["graphs without window = generate (rows)"] < 3


# -- every stage end to end on the tiny Gemma 3 ----------------------------------------------------
def test_run_eval_and_generate_on_the_tiny_gemma3(tiny_gemma3_dir, tmp_path, monkeypatch, capsys):
    """A `run` with packing (sdpa's packed window mask on CPU), the fused LoRA path and the graphs decoding
    engine (uncaptured on CPU) on examples longer than the window; then `eval` of its adapter and `generate`.
    The manifest says why each fast path is off."""
    import json
    import re

    from harness.cli import main
    from tests.conftest import REPO, run_tiny, tiny_overrides

    monkeypatch.chdir(tmp_path)  # reports/ lands here
    # base scores of its own: another test's cached ones would leave this eval's base engine unrecorded
    monkeypatch.setenv("HARNESS_SCORE_CACHE", str(tmp_path / "score-cache"))
    run_dir = run_tiny(tmp_path, tiny_gemma3_dir, "prompt.template=alpaca", "train.packing=on", "train.fused_lora=on",
                       "generation.engine=graphs", "generation.static_batch_size=4")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["train"]["steps"] == 4
    assert manifest["fast_path"]["packing"] is True and manifest["fast_path"]["fused_lora"] is True
    assert manifest["fast_path_reasons"] == {
        "quantize": "no CUDA device", "liger_kernels": "no CUDA device", "attention": "no CUDA device",
        "compile": "train.compile is off (opt-in: compiling costs 20-70 s a job)", "cuda_graphs": "needs a CUDA device"}
    assert {side: manifest["scoring_engine"][side]["engine"] for side in ("base", "tuned")} == {
        "base": "graphs", "tuned": "graphs"}
    rows = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 8

    sets = [x for o in tiny_overrides(tiny_gemma3_dir, "prompt.template=alpaca") for x in ("--set", o)]
    code = main(["eval", str(REPO / "tasks" / "amazon_desc.yaml"), "--adapter", str(run_dir),
                 "--runs-dir", str(tmp_path / "evals"), *sets])
    out = capsys.readouterr().out
    assert code == 0, out
    eval_dir = Path(re.search(r"run folder: (.*)", out).group(1))
    eval_manifest = json.loads((eval_dir / "manifest.json").read_text())
    assert eval_manifest["status"] == "completed" and eval_manifest["scoring_engine"]["base"]["engine"] == "dynamic"
    assert eval_manifest["scoring_engine"]["base"]["engine_reason"].startswith("no CUDA device")

    assert main(["generate", str(run_dir), "--title", "Garlic Press"]) == 0
    assert capsys.readouterr().out.strip()


def test_the_graphed_training_step_keeps_the_window(tiny_gemma3_dir, tmp_path, monkeypatch):
    """The CUDA-graph step's fixed-shape batch (filler sequences, boundaries passed to the kernel) through the
    windowed varlen path gives the loss and LoRA gradients of the model's own eager attention on trl's batch."""
    import torch.nn.attention.varlen as varlen_module

    from harness.data.records import prepare
    from harness.models import transformers_model
    from harness.spec import load_spec
    from harness.training.cuda_graph_step import StaticBatch, sft_loss
    from harness.training.tokenization import tokenized_dataset
    from harness.training.train import build_trainer
    from tests.conftest import REPO, tiny_overrides

    seen = []
    monkeypatch.setattr(varlen_module, "varlen_attn", _recording(flash_varlen_reference, seen))
    spec = load_spec(str(REPO / "tasks" / "amazon_desc.yaml"),
                     tiny_overrides(tiny_gemma3_dir, "prompt.template=alpaca", "train.packing=on", "lora.dropout=0.0",
                                    "train.max_length=64"))
    device = devices.Device("cpu")
    tokenizer = models.load_tokenizer(str(tiny_gemma3_dir), spec.model, uses_chat_template=False)
    model = models.load_model(str(tiny_gemma3_dir), spec.model, tokenizer, device, attn_implementation="eager")
    data = tokenized_dataset(spec, tokenizer, prepare(spec).train[:24])
    trainer = build_trainer(spec, model, tokenizer, data, None, tmp_path, device, per_device_train_batch_size=4,
                            save_strategy="no")
    batch = next(iter(trainer.get_train_dataloader()))
    assert max(batch["position_ids"][0].tolist()) >= 2 * TINY_GEMMA_WINDOW  # examples well past the window
    model = trainer.model
    params = [p for p in model.parameters() if p.requires_grad]
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    expected = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)

    attention.register()
    transformers_model(model).set_attn_implementation("varlen")
    static = StaticBatch(5, 64, 64, tokenizer.pad_token_id, "cpu")  # a row more than the batch: filler in play
    assert static.fill(batch) < static.capacity
    graphed_loss, _ = sft_loss(model, static)
    graphed_loss.backward()
    torch.testing.assert_close(graphed_loss, loss.detach(), rtol=1e-5, atol=1e-6)
    assert sum(bool(want.any()) for want in expected) >= len(expected) // 2  # B: A's gradients are zero at first
    for got, want in zip((p.grad for p in params), expected):
        assert (got - want).norm().item() <= 1e-4 * want.norm().item() + 1e-9
    assert seen == [(TINY_GEMMA_WINDOW - 1, 0)] * 2 + [(-1, 0)]
