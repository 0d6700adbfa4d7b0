"""The training bench: one recipe's epoch over the bench's examples, timed by the clock (train_clock.py),
and the models it trains (saved copies, random architectures) and QLoRA's peak memory.

The recipes are described in harness/benchmarks/bench.py's docstring.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

from harness.benchmarks.train_clock import StepClock, TrainMeasure, flops_per_token, peak_mem_gb, with_mfu
from harness.errors import HarnessError

log = logging.getLogger(__name__)


TINYLLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                    num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)


LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)


RECIPES = ("seed", "trl_tuned", "harness_sdpa", "harness_nographs", "harness_eager", "harness", "unsloth")


BATCHED_RECIPES = RECIPES[1:]  # run at each --batch


SEED_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def bench_examples(spec, n: int):
    """`n` training examples: the task's prepared train split, cycled deterministically."""
    from harness.data.records import prepare

    pool = prepare(spec).train
    if not pool:
        raise HarnessError(f"{spec.name}: no training examples to benchmark")
    return [pool[i % len(pool)] for i in range(n)]


def _string_dataset(spec, tokenizer, examples):
    """What the notebooks feed trl: prompt and completion strings, tokenized by trl itself. trl's tokenizer
    call adds the BOS a tokenizer adds (Gemma's `<bos>`), as the notebooks' `tokenizer(text)` did, so the
    prompt text leaves it out: written there too, every example would start with two (and pack otherwise)."""
    from datasets import Dataset

    from harness.data.prompts import build_prompt, tokenizer_bos

    bos = tokenizer_bos(tokenizer)
    return Dataset.from_list([{"prompt": build_prompt(tokenizer, spec.prompt, e.title).removeprefix(bos),
                               "completion": e.content} for e in examples])


def recipe_overrides(recipe: str, batch: int, device, seed_steps: int = -1, loss_every: int = 10_000) -> dict:
    common = dict(num_train_epochs=1, max_steps=-1, logging_steps=loss_every, save_strategy="no", eval_strategy="no",
                  disable_tqdm=True, warmup_steps=0)
    if recipe == "seed":
        return {**common, "max_steps": seed_steps,
                "per_device_train_batch_size": 2, "gradient_accumulation_steps": 4, "packing": False,
                "padding_free": False, "use_liger_kernel": False}
    if recipe == "trl_tuned":
        return {**common, "per_device_train_batch_size": batch, "gradient_accumulation_steps": 1, "packing": True,
                "padding_free": True, "use_liger_kernel": False}
    if recipe.startswith("harness"):
        return {**common, "per_device_train_batch_size": batch, "gradient_accumulation_steps": 1}
    raise HarnessError(f"bench: unknown recipe '{recipe}'")


def measure_training(spec, model_factory, tokenizer, examples, recipe: str, device, label: str,
                     batch: int | None, out_dir: Path, seed_steps: int = -1, warmup: int = 3,
                     loss_every: int = 10, train_seed: int | None = None) -> TrainMeasure:
    """Train one epoch over `examples` with `recipe`; time the steps after the first `warmup`.

    The seed recipe may stop after `seed_steps` optimizer steps (its rate is steady long before
    an epoch ends, and an epoch of it takes many minutes). `train_seed` (the loss check's noise
    runs) replaces the spec's seed for LoRA initialisation and dropout, not for the data order.
    """
    import torch

    from harness.training.fused_lora import fused_lora_add
    from harness.training.fast_paths import fast_path_options
    from harness.training.model_patches import modeling_module_restored
    from harness.training.tokenization import tokenized_dataset
    from harness.training.train import build_trainer

    # The spec's liger_kernels stays (auto by default), so `--set train.liger_kernels=off` reaches
    # harness_eager too: harness against harness_eager then differs in compiling alone.
    harness_spec = replace(spec, train=replace(
        spec.train, packing="on", compile=spec.train.compile if recipe in ("harness", "harness_nographs") else "off",
        attention="sdpa" if recipe == "harness_sdpa" else spec.train.attention,
        cuda_graphs="off" if recipe == "harness_nographs" else spec.train.cuda_graphs))
    fast = fast_path_options(harness_spec, device)
    overrides = recipe_overrides(recipe, batch, device, seed_steps, loss_every)
    if train_seed is not None:
        overrides.update(seed=train_seed, data_seed=spec.train.seed)
    attention = fast["attention"] if recipe.startswith("harness") else "sdpa"
    log.info("bench: %s/%s on %d examples (attention %s)", label, recipe, len(examples), attention)
    if device.kind == "cuda":
        torch.cuda.reset_peak_memory_stats(device.index)
    started = time.perf_counter()
    model = model_factory(attention)
    tokenized = tokenized_dataset(spec, tokenizer, examples)
    mean_len = sum(len(ids) for ids in tokenized["input_ids"]) / len(examples)
    data = tokenized if recipe.startswith("harness") else _string_dataset(spec, tokenizer, examples)
    with modeling_module_restored(model):
        trainer = build_trainer(harness_spec, model, tokenizer, data, None, out_dir / f"{label}-{recipe}-{batch}",
                                device, plain_peft=not recipe.startswith("harness"), fast=fast, **overrides)
        clock = StepClock(device.kind, warmup)
        clock.attach(trainer)
        fused = recipe.startswith("harness") and fast["fused_lora"]
        graphs = recipe.startswith("harness") and fast["cuda_graphs"]
        with fused_lora_add(trainer.model, fused):
            trainer.train()
    job_s = time.perf_counter() - started
    figures = with_mfu(clock.measure(label, recipe), flops_per_token(trainer.model.get_base_model(), mean_len),
                        device)
    per_step = trainer.args.per_device_train_batch_size * trainer.args.gradient_accumulation_steps
    notes = (f"compile {fast['compile']}, CUDA graphs {'on' if graphs else 'off'}, "
             f"Liger {'on' if trainer.args.use_liger_kernel else 'off'}, "
             f"fused LoRA {'on' if fused else 'off'}, "
             f"LoRA dropout {spec.lora.dropout}, {getattr(trainer.args.optim, 'value', trainer.args.optim)}")
    if train_seed is not None:
        notes += f"; loss-check noise run: seed {train_seed}, data order of seed {spec.train.seed}"
    result = TrainMeasure(model=label, recipe=recipe, batch=per_step, attention=attention, job_s=job_s,
                          peak_mem_gb=peak_mem_gb(device), notes=notes, train_seed=trainer.args.seed, **figures)
    log.info("bench %s", result)
    del trainer, model
    if device.kind == "cuda":
        torch.cuda.empty_cache()
    return result


def model_folder(label: str, factory, tokenizer, work: Path) -> Path:
    """A saved copy of a bench-built model (with its tokenizer), for recipes that load from a folder."""
    folder = work / "models" / label.split(" ")[0]
    if not (folder / "config.json").is_file():
        model = factory("sdpa")
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        del model
    return folder


def random_model_factory(arch: dict, tokenizer, device):
    """A randomly initialised model of a known architecture (speed only: its outputs mean nothing)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from harness.models.attention import NAME, register

    def build(attention: str = "sdpa"):
        if attention == NAME:
            register()
        config = LlamaConfig(**{**arch, "vocab_size": max(arch["vocab_size"], len(tokenizer))},
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(0)
        with torch.device(device.torch_device):
            model = LlamaForCausalLM(config).to(device.dtype)
        model.set_attn_implementation(attention)
        return model

    return build


def qlora_peak_memory(spec, tokenizer, device, seq_len: int, work: Path) -> dict:
    """Peak GPU memory of QLoRA (nf4, double quant) training on a random Llama-3-8B-architecture model."""
    import torch
    from datasets import Dataset

    from harness.models import load_model
    from harness.spec import ModelSpec
    from harness.training.train import build_trainer

    folder = work / "llama3-8b-random"
    if not (folder / "config.json").is_file():
        torch.set_default_dtype(torch.bfloat16)
        try:
            random_model_factory(LLAMA3_8B, tokenizer, device)().save_pretrained(folder, safe_serialization=True)
        finally:
            torch.set_default_dtype(torch.float32)
        torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device.index)
    model = load_model(str(folder), ModelSpec(), tokenizer, device, quantize=True)
    loaded = torch.cuda.max_memory_allocated(device.index)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 30000, (8, seq_len), generator=g).tolist()
    data = Dataset.from_list([{"input_ids": row, "labels": row} for row in ids])
    qspec = replace(spec, train=replace(spec.train, gradient_checkpointing=True, packing="off", liger_kernels="auto"))
    trainer = build_trainer(qspec, model, tokenizer, data, None, work / "qlora", device,
                            **recipe_overrides("harness", 1, device), max_length=seq_len)
    started = time.perf_counter()
    trainer.train()
    return {"model": "llama3-8b-arch (random)", "seq_len": seq_len, "batch": 1, "steps": trainer.state.global_step,
            "gradient_checkpointing": True, "peak_mem_gb": torch.cuda.max_memory_allocated(device.index) / 2**30,
            "weights_loaded_gb": loaded / 2**30, "seconds": time.perf_counter() - started}
