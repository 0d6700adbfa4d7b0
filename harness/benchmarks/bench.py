"""`python -m harness bench TASK`: the harness fast path against the seeds' recipe and Unsloth, measured.

Every recipe trains on the same examples on one device, and every figure is a ratio against a
baseline measured in the same run. Recipes:

- seed:      trl SFTTrainer on prompt/completion strings, batch 2, grad-accum 4, no packing,
             LoRA r=16 on q/k/v/o/gate/up/down (what the notebooks this project replaces do);
- trl_tuned: the same with packing (padding-free) at each --batch: a well-tuned plain trl baseline;
- harness:   harness' own CUDA default (pre-tokenized, padding-free packing, FlashAttention varlen
             kernel, Liger layer kernels, bf16, LoRA inputs kept in bf16, LoRA's up-projection and add
             fused into one GEMM; for a model under 1 GB of weights each step replayed as one CUDA
             graph) at each --batch size;
- harness_sdpa: the same with sdpa attention (a dense block-diagonal mask over the packed row),
             to show what the varlen kernel is worth (only when asked for with --recipes);
- harness_eager: harness with `train.compile: off`, to show what compiling the layers is worth when
             the harness recipe runs with `--set train.compile=on` (only when asked for with --recipes);
- harness_nographs: harness with `train.cuda_graphs: off` (each step launched kernel by kernel), to show
             what replaying the step as a CUDA graph is worth (only when asked for with --recipes);
- unsloth:   Unsloth's FastLanguageModel and its patched trl SFTTrainer on the same pre-tokenized
             examples, LoRA config, packing, batch, sequence length and SFTConfig fields, in its own
             process with its own packages (harness/benchmarks/bench_unsloth.py: Unsloth pins older trl/datasets).
The trl recipes get trl 1.16's chunked LM head, which computes the loss without full-vocabulary logits.

Models (`--only`, `--gen-models`): smollm2 (the task's base model), gemma3 (Gemma 3 270M, real weights,
`--gemma3-base`: a second architecture with sliding-window attention and a 262k vocabulary; the alpaca
prompt, being a base model without a chat template) and tinyllama (a random 1.1B Llama architecture).

Counted the same way for every recipe: tokens are the non-pad tokens of each micro-batch as it
reaches the trainer's training step (the attention mask's sum, or the packed row's length: what
trl itself counts). Steady-state tokens/s covers the optimizer steps after the first --warmup
(warm-up and compilation), with the device synchronised at both ends; the job time runs from
loading the model to the end of training (tokenizing, packing, compiling and all).

Loss check (is a recipe's loss curve unchanged beyond noise?): every recipe trains on the same
batches in the same order (one data seed), and logs its loss every --loss-every steps. The reference
recipe (the first asked of LOSS_REFERENCES) runs again --noise-seeds times with another train.seed
and the same data order: another LoRA initialisation and other dropout masks, the randomness no
result may depend on. The noise band is the largest |loss - reference loss| of those re-seeded runs
at the steps every run logged; each recipe's largest |loss - reference loss| at the same steps is
within noise when it is <= the band. A recipe that changes nothing but the random stream (compiled
dropout draws its masks from inductor's generator, not eager's) lands beyond a band of k re-seeded
runs with chance 1/(k+1), so one run beyond the band is a prompt to look, more --noise-seeds a
sharper test.

FLOPs (stated, since MFU depends on them): PaLM's model FLOPs per trained token
6*N + 12*L*d*T (N parameters without the input embedding, L layers, d hidden size, T the
mean example length, since packed examples do not attend across each other). LoRA computes no
weight gradients for frozen weights, so the work it really needs is 4*N + 8*L*d*T; both MFUs
are reported, against the dense bf16 peak of the device.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from harness import devices
from harness.errors import HarnessError

log = logging.getLogger(__name__)
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "T4": 65e12}
TINYLLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                    num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
# The models the bench measures: the task's base model (the embedded SmolLM2 by default), Gemma 3 270M
# (real weights, --gemma3-base: a second architecture, sliding-window attention) and a random
# TinyLlama-1.1B-architecture model. Real-weight models also get the trl_tuned baseline and the loss check
# against it; the random one runs the harness recipes only.
MODEL_PARTS = ("smollm2", "gemma3", "tinyllama")
DEFAULT_PARTS = {"smollm2", "tinyllama", "qlora8b", "generate"}  # gemma3 and serve run when named
OTHER_PARTS = ("qlora8b", "generate", "serve")
GEMMA3_LABEL = "gemma3-270m"
RECIPES = ("seed", "trl_tuned", "harness_sdpa", "harness_nographs", "harness_eager", "harness", "unsloth")
BATCHED_RECIPES = RECIPES[1:]  # run at each --batch
# The loss check's reference, the first of these asked: plain (uncaptured, uncompiled) harness numerics first.
LOSS_REFERENCES = ("harness_nographs", "harness_eager", "harness", "trl_tuned", "harness_sdpa")
SEED_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class TrainMeasure:
    model: str
    recipe: str
    batch: int  # sequences (packed rows, or examples) per optimizer step
    attention: str
    tokens_per_s: float  # steady state: the timed steps after the warm-up
    step_time_s: float
    job_s: float  # loading the model to the end of training
    peak_mem_gb: float
    mfu_palm: float | None
    mfu_lora: float | None
    optimizer_steps: int
    warmup_steps: int
    tokens: int  # every step's, counted from the batches
    timed_tokens: int
    train_seed: int  # seeds LoRA initialisation and dropout (the data order is the spec's train.seed)
    losses: dict[str, float] = field(default_factory=dict)  # logged training loss at fixed steps
    notes: str = ""


def _peak_flops(device) -> float | None:
    import torch

    if device.kind != "cuda":
        return None
    name = torch.cuda.get_device_name(device.index)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def _flops_per_token(model, mean_len: float) -> tuple[float, float]:
    cfg = model.config
    n = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name and "lora_" not in name)
    if cfg.tie_word_embeddings:
        n += cfg.vocab_size * cfg.hidden_size  # the LM head still multiplies every token
    attn = cfg.num_hidden_layers * cfg.hidden_size * mean_len
    return 6 * n + 12 * attn, 4 * n + 8 * attn


def batch_tokens(inputs: dict):
    """Non-pad tokens of one micro-batch, as trl counts them (a device tensor stays one: no sync)."""
    mask = inputs.get("attention_mask")
    if mask is not None:
        return mask.sum()
    ids = inputs.get("position_ids", inputs["input_ids"])
    return ids.numel()


class StepClock:
    """Times the optimizer steps after `warmup` and counts the tokens each step trained.

    The device is synchronised only where the timed span starts and ends, so the clock adds no
    stall inside it; tokens are read from every micro-batch `training_step` receives (shared by
    every recipe, Unsloth's subprocess included)."""

    def __init__(self, device_kind: str, warmup: int):
        self.device_kind, self.warmup = device_kind, warmup
        self.started = self.elapsed = None
        self.steps = self.timed_steps = 0
        self.tokens = self.timed_tokens = 0
        self._step_tokens = 0
        self.losses: dict[str, float] = {}

    def _sync(self):
        import torch

        if self.device_kind == "cuda":
            torch.cuda.synchronize()

    def attach(self, trainer) -> None:
        from transformers import TrainerCallback
        from transformers.trainer_callback import PrinterCallback

        step = trainer.training_step
        outer = self

        def counted_training_step(model, inputs, *args, **kwargs):
            outer._step_tokens = outer._step_tokens + batch_tokens(inputs)
            return step(model, inputs, *args, **kwargs)

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                outer.steps = state.global_step
                outer.tokens = outer.tokens + outer._step_tokens
                if state.global_step > outer.warmup:
                    outer.timed_tokens = outer.timed_tokens + outer._step_tokens
                outer._step_tokens = 0
                if state.global_step == outer.warmup:
                    outer._sync()
                    outer.started = time.perf_counter()
                elif state.global_step == state.max_steps and outer.started is not None:
                    outer._sync()
                    outer.elapsed = time.perf_counter() - outer.started
                    outer.timed_steps = state.global_step - outer.warmup

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    outer.losses[str(state.global_step)] = float(logs["loss"])

        trainer.training_step = counted_training_step
        trainer.remove_callback(PrinterCallback)  # the bench prints its own table
        trainer.add_callback(Callback())

    def measure(self, label: str, recipe: str) -> dict:
        """The clock's figures (plain numbers); fails closed when too few steps were timed."""
        if self.elapsed is None or self.timed_steps < 3:
            raise HarnessError(f"bench: {label}/{recipe} ran {self.steps} optimizer steps, {self.warmup} of them "
                               f"warm-up: too few to time; use more --examples or a smaller --warmup")
        tokens, timed = int(self.tokens), int(self.timed_tokens)
        return {"tokens_per_s": timed / self.elapsed, "step_time_s": self.elapsed / self.timed_steps,
                "optimizer_steps": self.steps, "warmup_steps": self.warmup, "tokens": tokens,
                "timed_tokens": timed, "losses": dict(self.losses)}


def _examples(spec, n: int):
    """`n` training examples: the task's prepared train split, cycled deterministically."""
    from harness.data.records import prepare

    pool = prepare(spec).train
    if not pool:
        raise HarnessError(f"{spec.name}: no training examples to benchmark")
    return [pool[i % len(pool)] for i in range(n)]


def _string_dataset(spec, tokenizer, examples):
    """What the notebooks feed trl: prompt and completion strings, tokenized by trl itself."""
    from datasets import Dataset

    from harness.data.prompts import build_prompt

    return Dataset.from_list([{"prompt": build_prompt(tokenizer, spec.prompt, e.title), "completion": e.content}
                              for e in examples])


def _recipe_overrides(recipe: str, batch: int, device, seed_steps: int = -1, loss_every: int = 10_000) -> dict:
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


def _peak_mem_gb(device) -> float:
    import torch

    return torch.cuda.max_memory_allocated(device.index) / 2**30 if device.kind == "cuda" else 0.0


def _with_mfu(figures: dict, flops: tuple[float, float], device) -> dict:
    peak = _peak_flops(device)
    tps = figures["tokens_per_s"]
    return {**figures, "mfu_palm": tps * flops[0] / peak if peak else None,
            "mfu_lora": tps * flops[1] / peak if peak else None}


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
    from harness.training.train import build_trainer, fast_path_options, modeling_module_restored, tokenized_dataset

    # The spec's liger_kernels stays (auto by default), so `--set train.liger_kernels=off` reaches
    # harness_eager too: harness against harness_eager then differs in compiling alone.
    harness_spec = replace(spec, train=replace(
        spec.train, packing="on", compile=spec.train.compile if recipe in ("harness", "harness_nographs") else "off",
        attention="sdpa" if recipe == "harness_sdpa" else spec.train.attention,
        cuda_graphs="off" if recipe == "harness_nographs" else spec.train.cuda_graphs))
    fast = fast_path_options(harness_spec, device)
    overrides = _recipe_overrides(recipe, batch, device, seed_steps, loss_every)
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
    figures = _with_mfu(clock.measure(label, recipe), _flops_per_token(trainer.model.get_base_model(), mean_len),
                        device)
    per_step = trainer.args.per_device_train_batch_size * trainer.args.gradient_accumulation_steps
    notes = (f"compile {fast['compile']}, CUDA graphs {'on' if graphs else 'off'}, "
             f"Liger {'on' if trainer.args.use_liger_kernel else 'off'}, "
             f"fused LoRA {'on' if fused else 'off'}, "
             f"LoRA dropout {spec.lora.dropout}, {getattr(trainer.args.optim, 'value', trainer.args.optim)}")
    if train_seed is not None:
        notes += f"; loss-check noise run: seed {train_seed}, data order of seed {spec.train.seed}"
    result = TrainMeasure(model=label, recipe=recipe, batch=per_step, attention=attention, job_s=job_s,
                          peak_mem_gb=_peak_mem_gb(device), notes=notes, train_seed=trainer.args.seed, **figures)
    log.info("bench %s", result)
    del trainer, model
    if device.kind == "cuda":
        torch.cuda.empty_cache()
    return result


def _model_folder(label: str, factory, tokenizer, work: Path) -> Path:
    """A saved copy of a bench-built model (with its tokenizer), for recipes that load from a folder."""
    folder = work / "models" / label.split(" ")[0]
    if not (folder / "config.json").is_file():
        model = factory("sdpa")
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        del model
    return folder


@dataclass
class BenchModel:
    """One model the bench trains and decodes, with the spec (model.base, prompt) and tokenizer it is used with."""

    label: str
    spec: object
    tokenizer: object
    build: object  # attention implementation -> a loaded model
    real_weights: bool  # the trl_tuned baseline runs on it (a random architecture: harness recipes only)
    probe: dict | None = None  # the base model's probe perplexity and prompt template (real weights)


def _real_model(spec, device, embedded_label: str) -> BenchModel:
    """The spec's base model (fetched or converted once), labelled `embedded_label` when it is an embedded one."""
    from harness import models

    spec = replace(spec, prompt=replace(spec.prompt))  # settled below for this model alone
    prompt = models.resolve_prompt_template(spec)
    model_ref = models.resolve_base(spec.model.base)
    probe = models.check_base_probe(spec.model, model_ref)  # no speed figures for a broken model
    tokenizer = models.load_tokenizer(model_ref, spec.model, uses_chat_template=spec.prompt.template is None)

    def build(attention: str = "sdpa"):
        return models.load_model(model_ref, spec.model, tokenizer, device, attn_implementation=attention)

    label = embedded_label if spec.model.base.startswith("embedded:") else Path(spec.model.base).name
    return BenchModel(label, spec, tokenizer, build, real_weights=True, probe={**probe, "prompt_template": prompt})


def gemma3_spec(spec, base: str):
    """The task's spec on Gemma 3 (a base model without a chat template: its prompt is settled in
    `_real_model`, the alpaca preset unless the spec names a template)."""
    return replace(spec, model=replace(spec.model, base=base))


def parse_parts(only: str | None, gen_models: str) -> tuple[set[str], set[str]]:
    """The parts (`--only`) and generation models (`--gen-models`) asked for, each name checked."""
    parts = set(only.split(",")) if only else set(DEFAULT_PARTS)
    if parts - set(MODEL_PARTS) - set(OTHER_PARTS):
        raise HarnessError(f"bench --only: unknown {sorted(parts - set(MODEL_PARTS) - set(OTHER_PARTS))} "
                           f"(known: {', '.join(MODEL_PARTS + OTHER_PARTS)})")
    models = set(gen_models.split(","))
    if models - set(MODEL_PARTS):
        raise HarnessError(f"bench --gen-models: unknown {sorted(models - set(MODEL_PARTS))} "
                           f"(known: {', '.join(MODEL_PARTS)})")
    return parts, models


def _random_model_factory(arch: dict, tokenizer, device):
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
            _random_model_factory(LLAMA3_8B, tokenizer, device)().save_pretrained(folder, safe_serialization=True)
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
                            **_recipe_overrides("harness", 1, device), max_length=seq_len)
    started = time.perf_counter()
    trainer.train()
    return {"model": "llama3-8b-arch (random)", "seq_len": seq_len, "batch": 1, "steps": trainer.state.global_step,
            "gradient_checkpointing": True, "peak_mem_gb": torch.cuda.max_memory_allocated(device.index) / 2**30,
            "weights_loaded_gb": loaded / 2**30, "seconds": time.perf_counter() - started}


# -- generation (held-out scoring) ---------------------------------------------------------------

GENERATION_DOC = """Generation scorers, each over the same prompts, greedy, in one process:
loop = the seeds' loop (dynamic engine, one prompt at a time, first --loop-examples prompts);
dynamic = transformers' dynamic cache in length-sorted batches of generation.static_batch_size;
static = the static engine uncompiled (same batches and cache as fast: the eager reference);
fast = the static cache with decoding compiled into CUDA graphs (generation.engine compiled; auto
uses graphs on CUDA: see harness/scoring/generation.py), called twice: the first call compiles (cold), the second reuses the compiled code (warm).
graphs = the static engine's batches decoded by harness' own greedy loop, each step captured once per
shape as a CUDA graph (generation.engine graphs, harness/scoring/graph_decoding.py; uncaptured off CUDA), one
call: its tokens/s includes the capture; without capture = tokens / (seconds - capture seconds).
Compile cost c = cold seconds - warm seconds (graphs: c = capture seconds, decoding s = seconds - c).
Amortised over a held-out set of N = 1,000 examples: tokens/s = (N * tokens/n) / (N * decoding s/n + c),
n = prompts measured, decoding s = warm seconds for fast.
Memory-bandwidth bound (a decode step reads every weight once): tokens/s <= rows * HBM bandwidth /
weight bytes; with the static KV cache read too: rows * bandwidth / (weight bytes + rows * cache
length * KV bytes per token), at the narrowest static shape; fast and graphs shares use their rates
without compile or capture."""
HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12, "L4": 0.3e12}
AMORTISE_EXAMPLES = 1000


def _hbm_bandwidth(device) -> float | None:
    import torch

    if device.kind != "cuda":
        return None
    name = torch.cuda.get_device_name(device.index)
    return next((v for k, v in HBM_BYTES_PER_S.items() if k in name), None)


def _bandwidth_bounds(model, device, rows: int, width: int, max_new_tokens: int) -> dict:
    """Generated tokens/s no decoder can beat at `rows` sequences per step (see GENERATION_DOC)."""
    cfg = model.config
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    itemsize = next(model.parameters()).element_size()
    kv_per_token = 2 * cfg.num_hidden_layers * (cfg.num_key_value_heads or cfg.num_attention_heads) * head_dim * itemsize
    kv_bytes = rows * (width + max_new_tokens) * kv_per_token
    bandwidth = _hbm_bandwidth(device)
    return {"weight_bytes": weight_bytes, "kv_cache_bytes": kv_bytes, "hbm_bytes_per_s": bandwidth, "rows": rows,
            "weights_only_tokens_per_s": rows * bandwidth / weight_bytes if bandwidth else None,
            "with_kv_tokens_per_s": rows * bandwidth / (weight_bytes + kv_bytes) if bandwidth else None}


def _time_generation(model, tokenizer, prompts, gen, device) -> tuple[list, dict]:
    import torch

    from harness.scoring.decoding import GenerationStats
    from harness.scoring.generation import generate

    stats = GenerationStats()
    if device.kind == "cuda":
        torch.cuda.synchronize(device.index)
    started = time.perf_counter()
    out = generate(model, tokenizer, prompts, gen, device, stats=stats)
    if device.kind == "cuda":
        torch.cuda.synchronize(device.index)
    seconds = time.perf_counter() - started
    tokens = sum(g.n_tokens for g in out)
    return out, {"engine": stats.engine, "rows": max((s[0] for s in stats.shapes), default=gen.batch_size),
                 "examples": len(prompts), "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                 "warmup_s": stats.warmup_s, "shapes": stats.shapes}


def _identical(a: list, b: list) -> float:
    n = min(len(a), len(b))
    return sum(x.text == y.text for x, y in zip(a[:n], b[:n])) / n


def _amortised(row: dict, setup_s: float, decoding_s: float) -> float:
    """Tokens/s over AMORTISE_EXAMPLES examples at this row's rate, paying `setup_s` once (GENERATION_DOC)."""
    scale = AMORTISE_EXAMPLES / row["examples"]
    return scale * row["tokens"] / (scale * decoding_s + setup_s)


def measure_generation(spec, model, tokenizer, examples, device, loop_n: int,
                       loop: tuple[list, dict] | None = None) -> tuple[dict, tuple[list, dict] | None]:
    """Every scorer of GENERATION_DOC on the same prompts; a scorer that fails is recorded, the others still run.

    `loop` (outputs, row) reuses a one-at-a-time measurement from an earlier call (it does not depend on the
    batch rows); the loop measurement used is returned for the next call."""
    from harness.data.prompts import build_prompt
    from harness.scoring.generation import generate

    prompts = [build_prompt(tokenizer, spec.prompt, e.title) for e in examples]
    gen = spec.generation
    fast = "compiled" if device.kind == "cuda" else "static"  # CPU (--quick): the same path, uncompiled
    scorers = [("loop", prompts[:loop_n], replace(gen, engine="dynamic", batch_size=1)),
               ("dynamic", prompts, replace(gen, engine="dynamic", batch_size=gen.static_batch_size)),
               ("static", prompts, replace(gen, engine="static")),
               ("fast_cold", prompts, replace(gen, engine=fast)),
               ("fast", prompts, replace(gen, engine=fast)),
               ("graphs", prompts, replace(gen, engine="graphs"))]
    generate(model, tokenizer, prompts[:4], scorers[0][2], device)  # warm-up: CUDA context, eager kernels
    rows, outputs, failures = {}, {}, []
    if loop is not None:
        outputs["loop"], rows["loop"] = loop
        scorers = scorers[1:]
    for name, subset, engine_gen in scorers:
        try:
            outputs[name], rows[name] = _time_generation(model, tokenizer, subset, engine_gen, device)
        except Exception as exc:  # recorded and printed next to the table, never hidden
            log.error("bench: generation %s failed: %s: %s", name, type(exc).__name__, exc)
            failures.append({"scorer": name, "error": f"{type(exc).__name__}: {exc}"[:500]})
    result = {"max_new_tokens": gen.max_new_tokens, "do_sample": gen.do_sample, "scorers": rows, "failures": failures,
              "ratios": {}, "identical_outputs_share": {}}
    for name in ("dynamic", "static", "fast"):  # graphs: _graphs_ratios
        if name in rows and "loop" in rows:
            result["ratios"][f"{name} / loop"] = rows[name]["tokens_per_s"] / rows["loop"]["tokens_per_s"]
    rates = {}  # tokens/s without compile or capture, for the bandwidth shares
    if "fast" in rows and "fast_cold" in rows:
        warm, cold = rows["fast"], rows["fast_cold"]
        compile_s = max(cold["seconds"] - warm["seconds"], 0.0)
        result["compile_s"] = compile_s
        result["amortised_tokens_per_s"] = _amortised(warm, compile_s, warm["seconds"])
        rates["fast"] = warm["tokens_per_s"]
        if "dynamic" in rows:
            result["ratios"]["fast / dynamic"] = warm["tokens_per_s"] / rows["dynamic"]["tokens_per_s"]
        for base in ("loop", "dynamic"):
            if base in rows:
                result["ratios"][f"fast, compile amortised over {AMORTISE_EXAMPLES:,} / {base}"] = \
                    result["amortised_tokens_per_s"] / rows[base]["tokens_per_s"]
    if "graphs" in rows:
        result["graphs"] = _graphs_figures(rows["graphs"])
        rates["graphs"] = result["graphs"]["tokens_per_s_without_capture"]
        result["ratios"].update(_graphs_ratios(result, rows))
    shaped = next((rows[n] for n in ("fast", "graphs", "static") if n in rows and rows[n]["shapes"]), None)
    if shaped is not None:
        narrowest = shaped["shapes"][-1]
        bounds = _bandwidth_bounds(model, device, narrowest[0], narrowest[1], gen.max_new_tokens)
        for name, rate in rates.items():
            for key in ("weights_only", "with_kv"):
                bound = bounds[f"{key}_tokens_per_s"]
                bounds[f"{name}_share_of_{key}_bound"] = rate / bound if bound else None
        result["bandwidth_bound"] = bounds
    for one, other in [("fast", "static"), ("fast", "dynamic"), ("fast", "loop"), ("fast", "fast_cold"),
                       ("graphs", "static"), ("graphs", "loop"), ("graphs", "fast")]:
        if one in outputs and other in outputs:
            result["identical_outputs_share"][f"{one} vs {other}"] = _identical(outputs[one], outputs[other])
    return result, (outputs["loop"], rows["loop"]) if "loop" in rows else None


def _graphs_figures(row: dict) -> dict:
    """The graphs engine's one call split into capture and decoding (GENERATION_DOC)."""
    capture_s = row["warmup_s"]
    decoding_s = row["seconds"] - capture_s
    return {"capture_s": capture_s, "tokens_per_s_with_capture": row["tokens_per_s"],
            "tokens_per_s_without_capture": row["tokens"] / decoding_s,
            "amortised_tokens_per_s": _amortised(row, capture_s, decoding_s)}


def _graphs_ratios(result: dict, rows: dict) -> dict[str, float]:
    """The graphs engine against every baseline: its measured rate (capture included) and amortised rate."""
    g = result["graphs"]
    ratios = {}
    for base in ("loop", "dynamic", "static"):
        if base in rows:
            ratios[f"graphs (capture included) / {base}"] = g["tokens_per_s_with_capture"] / rows[base]["tokens_per_s"]
            ratios[f"graphs, capture amortised over {AMORTISE_EXAMPLES:,} / {base}"] = \
                g["amortised_tokens_per_s"] / rows[base]["tokens_per_s"]
    if "amortised_tokens_per_s" in result:
        ratios["graphs / fast, both amortised"] = g["amortised_tokens_per_s"] / result["amortised_tokens_per_s"]
        ratios["graphs without capture / fast warm"] = g["tokens_per_s_without_capture"] / rows["fast"]["tokens_per_s"]
    return ratios


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise HarnessError(f"bench {flag}: expected positive integers separated by commas, got '{text}'")
    return values


def _training_ratios(label: str, rows: list[TrainMeasure]) -> dict[str, float]:
    """Each harness row against the seed row, and against every other recipe at the same batch."""
    ratios = {}
    for h in (r for r in rows if r.recipe == "harness"):
        for base in rows:
            if base.recipe != "seed" and (base.recipe == "harness" or base.batch != h.batch):
                continue
            name = "seed" if base.recipe == "seed" else f"{base.recipe} (batch {base.batch})"
            ratios[f"{label}: harness (batch {h.batch}) / {name} tokens/s"] = h.tokens_per_s / base.tokens_per_s
    return ratios


def bench_command(args) -> int:
    import platform

    from harness import models
    from harness.benchmarks.bench_unsloth import UnslothUnavailable, measure_unsloth
    from harness.runfolder import package_versions
    from harness.spec import load_spec

    spec = load_spec(args.task, args.overrides)
    device = devices.pick_device()
    if device.kind != "cuda" and not args.quick:
        raise HarnessError("bench: no CUDA device; the benchmark measures the GPU path (use --quick for a CPU smoke test)")
    parts, gen_models = parse_parts(args.only, args.gen_models)
    wanted = set(args.recipes.split(","))
    batches = _int_list(args.batch, "--batch")
    gen_rows = _int_list(args.gen_rows, "--gen-rows") if args.gen_rows else [spec.generation.static_batch_size]
    if args.noise_seeds < 0:
        raise HarnessError(f"bench --noise-seeds: expected 0 or more re-seeded reference runs, got {args.noise_seeds}")
    if wanted - set(RECIPES):
        raise HarnessError(f"bench --recipes: unknown {sorted(wanted - set(RECIPES))} (known: {', '.join(RECIPES)})")
    work = Path(args.work)
    spec = replace(spec, lora=replace(spec.lora, r=16, target_modules=SEED_TARGETS),
                   train=replace(spec.train, max_length=args.max_length))
    base = _real_model(spec, device, "smollm2-135m")
    tokenizer = base.tokenizer
    examples = _examples(spec, args.examples)
    results = {"command": "python -m harness " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("__main__.py")
               else " ".join(sys.argv), "device": device.describe(), "platform": platform.platform(),
               "packages": package_versions(), "examples": len(examples), "flops": __doc__.split("FLOPs")[1].strip(),
               "warmup_steps": args.warmup, "train_seed": spec.train.seed, "training": [], "loss_check": [],
               "ratios": {}, "base_probe": {}}
    used = parts | (gen_models if "generate" in parts else set())
    arches = {"smollm2": lambda: base,
              "gemma3": lambda: _real_model(gemma3_spec(spec, args.gemma3_base), device, GEMMA3_LABEL),
              "tinyllama": lambda: BenchModel("tinyllama-1.1b-arch (random)", spec, tokenizer,
                                              _random_model_factory(TINYLLAMA_1B, tokenizer, device),
                                              real_weights=False)}
    arches = {key: make() for key, make in arches.items() if key in used}  # only the models asked for are loaded
    results["base_probe"] = {arch.label: arch.probe for arch in arches.values() if arch.probe}
    unsloth_unavailable = None
    for key, arch in arches.items():
        if key not in parts:
            continue
        label, factory = arch.label, arch.build
        recipes = [r for r in RECIPES if r in wanted and (arch.real_weights or r != "trl_tuned")]
        reference = next((r for r in LOSS_REFERENCES if r in recipes), None)
        runs = [(r, b, None) for r in recipes for b in (batches if r in BATCHED_RECIPES else [None])]
        runs += [(reference, b, spec.train.seed + k) for b in batches for k in range(1, args.noise_seeds + 1)
                 if reference]
        rows = []
        part_spec = arch.spec
        if not arch.real_weights and runs:
            # Saved, so that what the spec's switches read from the model's folder (weight size) is this model's.
            folder = _model_folder(label, factory, arch.tokenizer, work)
            part_spec = replace(part_spec, model=replace(part_spec.model, base=str(folder), random_weights=True))
        for r, batch, train_seed in runs:
            try:
                if r == "unsloth":
                    if unsloth_unavailable:
                        continue
                    row, results["unsloth_versions"] = measure_unsloth(
                        part_spec, arch.tokenizer, examples, device, label, batch,
                        Path(models.resolve_base(part_spec.model.base)),
                        work, args.unsloth_site, args.warmup, args.loss_every)
                    rows.append(row)
                else:
                    rows.append(measure_training(part_spec, factory, arch.tokenizer, examples, r, device, label, batch,
                                                 work, seed_steps=args.seed_steps, warmup=args.warmup,
                                                 loss_every=args.loss_every, train_seed=train_seed))
            except UnslothUnavailable as exc:  # one line, then the other recipes go on
                unsloth_unavailable = f"unsloth: not run ({exc})"
                log.warning("bench: %s", unsloth_unavailable)
                results.setdefault("skipped", []).append(unsloth_unavailable)
            except Exception as exc:  # recorded and shown next to the table, never hidden
                log.error("bench: %s/%s failed: %s: %s", label, r, type(exc).__name__, exc, exc_info=exc)
                results.setdefault("failures", []).append({"model": label, "recipe": r, "batch": batch,
                                                           "train_seed": train_seed or spec.train.seed,
                                                           "error": f"{type(exc).__name__}: {exc}"[:500]})
        results["training"].extend(asdict(r) for r in rows)
        results["ratios"].update(_training_ratios(label, [r for r in rows if r.train_seed == spec.train.seed]))
        if reference:
            results["loss_check"].extend(loss_check([asdict(r) for r in rows], reference, spec.train.seed))
    if "generate" in parts:
        results["generation_method"] = GENERATION_DOC
        results["generation"] = {}
        for key, arch in arches.items():
            if key not in gen_models:
                continue
            if not arch.real_weights and device.kind != "cuda":
                log.info("bench: TinyLlama-architecture generation skipped on CPU (1.1B parameters)")
                continue
            model = arch.build()
            loop = None
            for rows in gen_rows:
                rows_spec = replace(arch.spec, generation=replace(arch.spec.generation, static_batch_size=rows))
                measured, loop = measure_generation(rows_spec, model, arch.tokenizer, examples[: args.gen_examples],
                                                    device, loop_n=min(args.loop_examples, args.gen_examples),
                                                    loop=loop)
                name = arch.label if len(gen_rows) == 1 else f"{arch.label}, {rows} rows"
                results["generation"][name] = measured
                results["ratios"].update({f"{name} generation: {k} tokens/s": v for k, v in measured["ratios"].items()})
            del model
            if device.kind == "cuda":
                import torch

                torch.cuda.empty_cache()
    if "serve" in parts:  # opt-in (--only serve): harness/benchmarks/bench_serve.py
        from harness.benchmarks.bench_serve import measure_serving

        results["serve"] = measure_serving(spec, tokenizer, [e.title for e in examples], device, work)
        results["ratios"]["serve: batched / serial requests/s"] = results["serve"]["ratio"]
    if "qlora8b" in parts and device.kind == "cuda":
        results["qlora"] = qlora_peak_memory(spec, tokenizer, device, 2048, work)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from harness.io import atomic_write_json

    atomic_write_json(args.out, results)
    print(format_results(results))
    return 0


SCORER_NAMES = {"loop": "one at a time (seeds' loop)", "dynamic": "dynamic cache, batched",
                "static": "static cache, eager", "fast_cold": "fast, first call (compiles)", "fast": "fast, warm",
                "graphs": "graphs (own loop, CUDA graphs)"}


def format_generation(label: str, g: dict) -> list[str]:
    decoding = "sampled" if g["do_sample"] else "greedy"
    lines = ["", f"generation, {label} ({decoding}, max_new_tokens {g['max_new_tokens']}):",
             "| scorer | engine | rows | examples | tokens | seconds | tokens/s | warm-up s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in g["scorers"].items():
        lines.append(f"| {SCORER_NAMES[name]} | {r['engine']} | {r['rows']} | {r['examples']} | {r['tokens']:,} | "
                     f"{r['seconds']:.2f} | {r['tokens_per_s']:,.0f} | {r['warmup_s']:.1f} |")
    if "compile_s" in g:
        lines.append(f"compile cost c = cold - warm seconds = {g['compile_s']:.1f} s; fast with compile amortised over "
                     f"N = {AMORTISE_EXAMPLES:,} examples, (N * tokens/n) / (N * warm s/n + c): "
                     f"{g['amortised_tokens_per_s']:,.0f} tokens/s")
    if "graphs" in g:
        r = g["graphs"]
        lines.append(f"graphs: capture c = {r['capture_s']:.2f} s; {r['tokens_per_s_with_capture']:,.0f} tokens/s with "
                     f"capture, {r['tokens_per_s_without_capture']:,.0f} without; capture amortised over "
                     f"N = {AMORTISE_EXAMPLES:,} examples: {r['amortised_tokens_per_s']:,.0f} tokens/s")
    if "bandwidth_bound" in g:
        b = g["bandwidth_bound"]
        if b["hbm_bytes_per_s"]:
            shares = lambda key: ", ".join(f"{n} reaches {b[f'{n}_share_of_{key}_bound']:.1%}"  # noqa: E731
                                           for n in ("fast", "graphs") if f"{n}_share_of_{key}_bound" in b)
            lines.append(f"bandwidth bound, rows x {b['hbm_bytes_per_s'] / 1e12:.2f} TB/s / bytes read per step, at "
                         f"{b['rows']} rows: weights only ({b['weight_bytes'] / 1e9:.2f} GB) "
                         f"{b['weights_only_tokens_per_s']:,.0f} tokens/s, {shares('weights_only')}; weights + static "
                         f"KV cache ({b['kv_cache_bytes'] / 1e9:.2f} GB) {b['with_kv_tokens_per_s']:,.0f} tokens/s, "
                         f"{shares('with_kv')}")
        else:
            lines.append("bandwidth bound: n/a (no known HBM bandwidth for this device)")
    lines += [f"ratio {k}: {v:.2f}x" for k, v in g["ratios"].items()]
    lines += [f"identical outputs {k}: {v:.0%}" for k, v in g["identical_outputs_share"].items()]
    lines += [f"FAILED generation {f['scorer']}: {f['error']}" for f in g["failures"]]
    return lines


def format_results(results: dict) -> str:
    lines = [f"device: {results['device']}", f"command: {results['command']}",
             "harness process: " + ", ".join(f"{k} {v}" for k, v in results["packages"].items() if v),
             *(["unsloth process: " + ", ".join(f"{k} {v}" for k, v in results["unsloth_versions"].items() if v)]
               if "unsloth_versions" in results else []),
             f"tokens/s: steady state, after {results['warmup_steps']} warm-up optimizer steps; "
             "job s: model load to end of training", "",
             "| model | recipe | batch | attention | tokens/s | step s | job s | peak GB | MFU (6N) | MFU (4N, LoRA) "
             "| steps |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    pct = lambda v: "n/a" if v is None or math.isnan(v) else f"{v:.1%}"  # noqa: E731
    for r in results["training"]:
        lines.append(f"| {r['model']} | {_run_name(r, results['train_seed'])} | {r['batch']} | {r['attention']} | "
                     f"{r['tokens_per_s']:,.0f} | {r['step_time_s']:.3f} | {r['job_s']:.1f} | {r['peak_mem_gb']:.2f} | "
                     f"{pct(r['mfu_palm'])} | {pct(r['mfu_lora'])} | {r['optimizer_steps']} |")
    lines += _loss_lines(results["training"], results["train_seed"])
    lines += _loss_check_lines(results["loss_check"])
    lines += [f"note {r['model']}/{_run_name(r, results['train_seed'])} (batch {r['batch']}): {r['notes']}"
              for r in results["training"] if r.get("notes")]
    lines += results.get("skipped", [])
    for label, g in results.get("generation", {}).items():
        lines += format_generation(label, g)
    if "qlora" in results:
        q = results["qlora"]
        lines += ["", f"QLoRA {q['model']} at {q['seq_len']} tokens: peak {q['peak_mem_gb']:.2f} GB "
                      f"(weights {q['weights_loaded_gb']:.2f} GB)"]
    if "serve" in results:
        from harness.benchmarks.bench_serve import format_serving

        lines += format_serving(results["serve"])
    lines += [f"FAILED {f['model']}/{f['recipe']}: {f['error']}" for f in results.get("failures", [])]
    lines += ["", "ratios:"] + [f"  {k}: {v:.2f}x" for k, v in results["ratios"].items()]
    return "\n".join(lines)


def _run_name(row: dict, seed: int) -> str:
    return row["recipe"] if row["train_seed"] == seed else f"{row['recipe']} (seed {row['train_seed']})"


def _loss_lines(rows: list[dict], seed: int) -> list[str]:
    """Training loss of each run at the steps all logged, per model and batch (same steps, same data)."""
    lines = []
    for model, batch in dict.fromkeys((r["model"], r["batch"]) for r in rows if r["recipe"] != "seed"):
        mine = [r for r in rows if (r["model"], r["batch"]) == (model, batch) and r["recipe"] != "seed"
                and r["losses"]]
        steps = sorted(set.intersection(*(set(r["losses"]) for r in mine)), key=int) if mine else []
        if steps:
            lines += ["", f"{model}, batch {batch}: training loss at step " + ", ".join(steps)]
            lines += [f"  {_run_name(r, seed)}: " + ", ".join(f"{r['losses'][k]:.4f}" for k in steps) for r in mine]
    return lines


def _worst(gaps: list[tuple[float, str]]) -> tuple[float, str]:
    """The largest (gap, step); a non-finite gap (a NaN or infinite loss) comes first, so it cannot pass unseen."""
    return max(gaps, key=lambda g: (not math.isfinite(g[0]), g[0] if math.isfinite(g[0]) else 0.0))


def _largest_gap(losses: dict[str, float], reference: dict[str, float], steps: list[str]) -> tuple[float, str]:
    """max |loss - reference loss| over `steps`, and the step where it is."""
    return _worst([(abs(losses[k] - reference[k]), k) for k in steps])


def loss_check(rows: list[dict], reference: str, seed: int) -> list[dict]:
    """Per model and batch: is each recipe's loss curve unchanged beyond noise? (module doc, "Loss check")

    `rows` are the bench's training rows; those of `reference` with another train_seed than `seed` are
    its re-seeded noise runs. Compared at the steps every run of the model and batch logged. A check
    that cannot be made says why in `verdict`, never "within noise"."""
    checks = []
    for model, batch in dict.fromkeys((r["model"], r["batch"]) for r in rows if r["recipe"] != "seed"):
        group = [r for r in rows if (r["model"], r["batch"]) == (model, batch) and r["recipe"] != "seed"]
        ref = next((r for r in group if r["recipe"] == reference and r["train_seed"] == seed), None)
        noise = [r for r in group if r["recipe"] == reference and r["train_seed"] != seed]
        others = [r for r in group if r["train_seed"] == seed and r is not ref]
        references = [ref, *noise] if ref else []
        logged = [r for r in references + others if r["losses"]]
        steps = sorted(set.intersection(*(set(r["losses"]) for r in logged)), key=int) if logged else []
        check = {"model": model, "batch": batch, "reference": reference, "train_seed": seed,
                 "noise_seeds": [r["train_seed"] for r in noise], "steps": steps, "noise_band": None, "recipes": {}}
        why_not = ("no reference run" if ref is None else
                   "no re-seeded reference run (--noise-seeds 0)" if not noise else
                   "a reference run logged no loss" if any(not r["losses"] for r in references) else
                   "no step logged by every run (lower --loss-every)" if not steps else None)
        if why_not is None:
            band, band_step = _worst([_largest_gap(r["losses"], ref["losses"], steps) for r in noise])
            if math.isfinite(band):
                check.update(noise_band=band, noise_band_step=band_step)
            else:
                why_not = f"a reference run's loss is not finite (step {band_step})"
        for r in others:
            gap, step = _largest_gap(r["losses"], ref["losses"], steps) if why_not is None and r["losses"] \
                else (None, None)
            verdict = (f"not judged: {why_not}" if why_not else "not judged: no loss logged" if gap is None else
                       "not judged: a loss is not finite" if not math.isfinite(gap) else
                       "within noise" if gap <= check["noise_band"] else "beyond noise")
            check["recipes"][r["recipe"]] = {"largest_gap": gap if gap is not None and math.isfinite(gap) else None,
                                             "step": step, "verdict": verdict}
        checks.append(check)
    return checks


def _loss_check_lines(checks: list[dict]) -> list[str]:
    lines = []
    for c in checks:
        ref = f"{c['reference']} (seed {c['train_seed']})"
        if c["noise_band"] is None:
            lines += ["", f"loss check, {c['model']}, batch {c['batch']}: reference {ref}"]
        else:
            k = len(c["noise_seeds"])
            lines += ["", f"loss check, {c['model']}, batch {c['batch']}: reference {ref}; noise band "
                          f"{c['noise_band']:.4f} (step {c['noise_band_step']}) = largest |loss - reference| of "
                          f"{c['reference']} re-seeded (seed {', '.join(map(str, c['noise_seeds']))}, same batches) "
                          f"at steps {', '.join(c['steps'])}; a recipe that changes only the randomness lands "
                          f"beyond it with chance 1/{k + 1}"]
        for name, e in c["recipes"].items():
            gap = "" if e["largest_gap"] is None else f"largest |loss - reference| {e['largest_gap']:.4f} " \
                                                       f"(step {e['step']}): "
            lines.append(f"  {name}: {gap}{e['verdict']}")
    return lines
