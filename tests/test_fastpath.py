"""The GPU fast path's building blocks, checked on CPU where they can be."""

import functools

import pytest
import torch

from harness import devices, models
from harness.errors import HarnessError
from harness.spec import ModelSpec, TaskSpec
from harness.training.fast_paths import fast_path_options


@pytest.mark.parametrize("attention", ["sdpa", "flex_attention"])
def test_packed_sequences_do_not_attend_across_examples(tiny_model_dir, attention):
    """Padding-free packing: position_ids restart per example and the mask becomes block-causal.

    transformers builds that mask from position_ids only without a KV cache; trl's SFTTrainer passes
    use_cache=False in training, as this test does."""
    tokenizer = models.load_tokenizer(str(tiny_model_dir), ModelSpec(), uses_chat_template=True)
    model = models.load_model(str(tiny_model_dir), ModelSpec(), tokenizer, devices.Device("cpu"),
                              attn_implementation=attention)
    a = torch.tensor([[5, 9, 14, 3, 22]])
    b = torch.tensor([[7, 8, 30, 31, 12, 40, 41]])
    with torch.no_grad():
        alone_b = model(input_ids=b).logits
        packed = model(input_ids=torch.cat([a, b], dim=1),
                       position_ids=torch.cat([torch.arange(5), torch.arange(7)]).unsqueeze(0), use_cache=False).logits
        leaky = model(input_ids=torch.cat([a, b], dim=1), use_cache=False).logits  # no restart: b attends to a
    torch.testing.assert_close(packed[:, 5:], alone_b, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(leaky[:, 5:], alone_b, atol=1e-3)


def test_trl_padding_free_collator_restarts_positions():
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    batch = collate([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4, 5], "labels": [-100, 5]}])
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5]]


def test_fast_paths_are_cuda_only_by_default(tiny_model_dir):
    spec = TaskSpec(name="t")
    spec.model.base = str(tiny_model_dir)
    assert fast_path_options(spec, devices.Device("cpu")) == {"quantize": False, "packing": False,
                                                              "liger_kernels": False, "attention": "sdpa",
                                                              "compile": "off", "fused_lora": False, "cuda_graphs": False}
    spec.train.packing = "on"
    spec.train.fused_lora = "on"
    assert fast_path_options(spec, devices.Device("cpu"))["packing"] is True
    assert fast_path_options(spec, devices.Device("cpu"))["fused_lora"] is True


def _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, window_size=(-1, -1), enable_gqa=False, scale=None,
                      return_aux=None):
    """torch's varlen_attn (2.11+ signature) computed per example with sdpa: the kernel itself is CUDA-only."""
    assert window_size == (-1, 0), "harness must ask for causal attention"
    outs = []
    for start, end in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        qs, ks, vs = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, is_causal=True, scale=scale, enable_gqa=enable_gqa)[0].transpose(0, 1))
    return torch.cat(outs)


def _legacy_reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None):
    """PyTorch 2.10's signature: `is_causal`, no scale, no grouped-query heads."""
    assert is_causal and q.shape[1] == k.shape[1]
    return _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, window_size=(-1, 0))


@pytest.mark.parametrize("kernel", [_reference_varlen, _legacy_reference_varlen])
def test_varlen_attention_matches_examples_run_alone(tiny_model_dir, monkeypatch, kernel):
    """The varlen path reads trl's boundaries (or position_ids), keeps examples apart, handles the
    tiny model's grouped-query heads, and leaves padded batches (generation) to sdpa."""
    import torch.nn.attention.varlen as varlen_module
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    tokenizer = models.load_tokenizer(str(tiny_model_dir), ModelSpec(), uses_chat_template=True)
    model = models.load_model(str(tiny_model_dir), ModelSpec(), tokenizer, devices.Device("cpu"),
                              attn_implementation="varlen")
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    a, b = [5, 9, 14, 3, 22], [7, 8, 30, 31, 12, 40, 41]
    batch = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(
        [{"input_ids": a, "labels": a}, {"input_ids": b, "labels": b}])
    calls = []

    @functools.wraps(kernel)  # keeps the signature harness inspects
    def counted(*args, **kwargs):
        calls.append(1)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(varlen_module, "varlen_attn", counted)
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
        from_positions = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        n_calls = len(calls)
        alone = [model(input_ids=torch.tensor([x])).logits for x in (a, b)]
        padded = model(input_ids=torch.tensor([a + [0, 0], b]),
                       attention_mask=torch.tensor([[1] * 5 + [0, 0], [1] * 7])).logits
    assert n_calls == 2 * model.config.num_hidden_layers and len(calls) == n_calls  # plain and padded rows: sdpa
    torch.testing.assert_close(packed, torch.cat(alone, dim=1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(from_positions, packed)
    torch.testing.assert_close(padded[0, :5], alone[0][0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("key, value, message", [
    ("attention", "varlen", "train.attention: 'varlen' needs a CUDA device"),
    ("quantization", "nf4", "train.quantization: 'nf4' needs a CUDA device and bitsandbytes"),
    ("liger_kernels", "on", "train.liger_kernels: 'on' needs a CUDA device and liger-kernel"),
    ("compile", "on", "train.compile: 'on' needs a CUDA device")])
def test_forced_gpu_switches_are_refused_on_cpu(key, value, message):
    spec = TaskSpec(name="t")
    setattr(spec.train, key, value)
    with pytest.raises(HarnessError, match=message):
        fast_path_options(spec, devices.Device("cpu"))


def test_trl_hands_packed_boundaries_to_varlen_through_peft(tiny_model_dir, monkeypatch, tmp_path):
    """A real packed training step: trl's collator -> Trainer -> PEFT -> attention gets cu_seq_lens."""
    import torch.nn.attention.varlen as varlen_module

    from harness.spec import load_spec
    from harness.training.tokenization import tokenized_dataset
    from harness.training.train import build_trainer
    from tests.conftest import tiny_overrides

    seen = []

    @functools.wraps(_reference_varlen)
    def recording(q, k, v, cu_q, *args, **kwargs):
        seen.append(cu_q.diff().tolist())
        return _reference_varlen(q, k, v, cu_q, *args, **kwargs)

    monkeypatch.setattr(varlen_module, "varlen_attn", recording)
    spec = load_spec("amazon_desc", tiny_overrides(tiny_model_dir, "train.packing=on", "train.batch_size=4"))
    tokenizer = models.load_tokenizer(str(tiny_model_dir), ModelSpec(), uses_chat_template=True)
    model = models.load_model(str(tiny_model_dir), ModelSpec(), tokenizer, devices.Device("cpu"),
                              attn_implementation="varlen")
    from harness.data.records import prepare

    examples = prepare(spec).train[:4]
    data = tokenized_dataset(spec, tokenizer, examples)
    trainer = build_trainer(spec, model, tokenizer, data, None, tmp_path, devices.Device("cpu"), max_steps=1,
                            save_strategy="no", logging_steps=100)
    trainer.train()
    lengths = sorted(len(ids) for ids in data["input_ids"])
    assert seen and len(seen) % model.config.num_hidden_layers == 0  # every layer of every pass
    assert all(sorted(segments) == lengths for segments in seen)  # one segment per example


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (FlashAttention's varlen kernel)")
def test_cuda_varlen_equals_sdpa_on_a_packed_batch():
    """On the GPU: the real kernel gives sdpa's loss and LoRA-relevant gradients on trl's packed rows."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from harness.models.attention import register

    register()
    config = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    torch.manual_seed(0)
    rows = [{"input_ids": torch.randint(3, 1000, (n,)).tolist()} for n in (37, 128, 5, 300, 64)]
    batch = {k: v.cuda() if torch.is_tensor(v) else v
             for k, v in DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows).items()}
    results = {}
    for attention in ("sdpa", "varlen"):
        torch.manual_seed(1)
        model = LlamaForCausalLM(config).to("cuda", torch.bfloat16)
        model.set_attn_implementation(attention)
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        results[attention] = (loss.detach().float(), model.model.layers[0].self_attn.q_proj.weight.grad.float())
    torch.testing.assert_close(results["varlen"][0], results["sdpa"][0], rtol=2e-2, atol=2e-2)
    grad_varlen, grad_sdpa = results["varlen"][1], results["sdpa"][1]
    assert ((grad_varlen - grad_sdpa).norm() / grad_sdpa.norm()).item() < 3e-2  # bf16 noise, not a leak


def test_lora_inputs_stay_in_the_compute_dtype(tiny_model_dir):
    """The fast path stops PEFT's fp32 copy of every LoRA input; under bf16 autocast (the Trainer's
    on CUDA) the output matches PEFT's default, and without autocast the dtype clash fails loudly."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from harness.training.model_patches import lora_inputs_in_compute_dtype

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                  init_lora_weights=False))
    assert {p.dtype for n, p in peft_model.named_parameters() if "lora_" in n} == {torch.float32}
    ids = torch.tensor([[5, 9, 14, 3, 22, 7]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        default = peft_model(input_ids=ids).logits
        assert lora_inputs_in_compute_dtype(peft_model) == 2 * 3
        fast = peft_model(input_ids=ids).logits
    torch.testing.assert_close(fast, default, rtol=2e-2, atol=2e-2)
    with pytest.raises(RuntimeError, match="dtype"), torch.no_grad():
        peft_model(input_ids=ids)


def test_compile_leaves_liger_out_and_refuses_forced_liger(tiny_model_dir, monkeypatch):
    """Compiled layers get their fusions from the compiler: `auto` Liger stays off with `compile: on`,
    and a forced Liger (opaque to the compiler) is refused up front."""
    from harness.training import fast_paths

    monkeypatch.setattr(fast_paths, "_has_liger", lambda: True)
    spec = TaskSpec(name="t")
    spec.model.base = str(tiny_model_dir)
    cuda = devices.Device("cuda")  # only read, never used: the decision is pure
    assert fast_path_options(spec, cuda)["liger_kernels"] is True
    spec.train.compile = "on"
    assert fast_path_options(spec, cuda)["liger_kernels"] is False
    spec.train.liger_kernels = "on"
    with pytest.raises(HarnessError, match="cannot compile Liger's kernels"):
        fast_path_options(spec, cuda)


def test_compiled_layers_train_like_eager_layers(tiny_model_dir, tmp_path):
    """compile_layers wraps every decoder layer in place, traces PEFT's LoRA layers as one graph each
    (fullgraph: a break would fail here), and a training step gives the eager loss and gradients. The
    CPU check uses the `eager` backend: it tests the wiring and tracing, not inductor's code."""
    from peft import LoraConfig, get_peft_model

    from harness.training.model_patches import compile_layers, decoder_layers

    def lora_model():
        torch.manual_seed(0)
        base = models.load_model(str(tiny_model_dir), ModelSpec(), tokenizer, devices.Device("cpu"))
        return get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                               lora_dropout=0.0, init_lora_weights=False))

    tokenizer = models.load_tokenizer(str(tiny_model_dir), ModelSpec(), uses_chat_template=True)
    ids = torch.tensor([[5, 9, 14, 3, 22, 7, 8, 30]])
    eager, compiled = lora_model(), lora_model()
    assert compile_layers(compiled, backend="eager") == len(decoder_layers(compiled))
    assert all(layer._compiled_call_impl is not None for layer in decoder_layers(compiled))
    losses = []
    for model in (eager, compiled):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append((loss.detach(), next(p.grad for n, p in model.named_parameters() if "lora_A" in n)))
    torch.testing.assert_close(losses[1][0], losses[0][0])
    torch.testing.assert_close(losses[1][1], losses[0][1])


def test_compile_refuses_a_model_without_decoder_layers():
    from harness.training.model_patches import decoder_layers

    with pytest.raises(HarnessError, match="no `model.layers` to compile"):
        decoder_layers(torch.nn.Linear(2, 2))


def test_training_patches_to_the_modeling_module_are_undone(tiny_model_dir):
    """Liger swaps transformers' Llama classes and RoPE module-wide inside the Trainer; a model loaded
    after training (the tuned model for scoring) must run the same kernels as the base model did."""
    import sys

    from harness.training.model_patches import modeling_module_restored

    tokenizer = models.load_tokenizer(str(tiny_model_dir), ModelSpec(), uses_chat_template=True)
    model = models.load_model(str(tiny_model_dir), ModelSpec(), tokenizer, devices.Device("cpu"))
    module = sys.modules[type(model).__module__]
    original = module.LlamaRMSNorm
    with modeling_module_restored(model):
        module.LlamaRMSNorm = object  # what apply_liger_kernel_to_llama does with its own class
        assert module.LlamaRMSNorm is object
    assert module.LlamaRMSNorm is original


def test_weight_size_counts_one_format(tmp_path):
    """The size the `auto` switches read: pickled weights count when there is no safetensors file, and a
    folder shipping both formats is not counted twice."""
    from harness.training.fast_paths import weight_bytes

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x" * 10)
    assert weight_bytes(str(tmp_path)) == 10
    (tmp_path / "model.safetensors").write_bytes(b"x" * 4)
    assert weight_bytes(str(tmp_path)) == 4
