"""LoRA / QLoRA training through peft and trl's SFTTrainer.

Examples reach trl already tokenized, with labels masked to the description tokens, so the
loss is on the completion only and the tokens match scoring exactly (harness.data.prompts).
SIGINT/SIGTERM save a checkpoint and stop cleanly; `resume_from` continues from one.
Launched in several processes (harness.distributed), the Trainer trains data-parallel (DDP):
each process packs and trains on its share of every step; the world's process zero alone
writes the log and the adapter.
"""

from __future__ import annotations

import functools
import json
import logging
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from harness import distributed
from harness.data.prompts import encode_fitted, fit_prompts
from harness.devices import Device
from harness.errors import HarnessError
from harness.io import atomic_write_text
from harness.models import transformers_model
from harness.models.base_files import embedded_model
from harness.models.end_of_turn import sync_eos
from harness.runfolder import ADAPTER_DIR
from harness.spec import TaskSpec
from harness.training import tracking
from harness.training.fused_lora import fused_lora_add

log = logging.getLogger(__name__)


class TrainingInterrupted(HarnessError):
    """Training stopped by a signal after saving a checkpoint."""

    exit_code = 130


@dataclass
class TrainResult:
    adapter_dir: Path
    steps: int
    train_tokens: int
    seconds: float
    best: dict | None = None  # with train.keep_best: the checkpoint the adapter was restored from
    long_prompts: dict | None = None  # titles cut (`truncated`) or left out (`skipped`) to fit train.max_length


def fast_path_options(spec: TaskSpec, device: Device, reasons: dict | None = None) -> dict:
    """Resolve the `auto` switches: the fast paths are for CUDA; CPU keeps the plain path. `reasons`, when
    given, receives one line for each fast path that is off saying why (the manifest's `fast_path_reasons`):
    where a fast path would compute something else than the model itself does (harness.models.attention
    .unsupported, a model type Liger has no kernels for), `auto` leaves it off and a forced `on` fails here."""
    from harness.models.attention import unsupported, varlen_available

    cuda = device.kind == "cuda"
    t = spec.train
    why = reasons if reasons is not None else {}
    config = functools.cache(lambda: base_config(spec))  # read once, and only where a decision needs it
    packing = t.packing == "on" or (t.packing == "auto" and cuda)
    if t.attention == "varlen" and not (cuda and varlen_available()):
        raise HarnessError("train.attention: 'varlen' needs a CUDA device and PyTorch >= 2.10; use 'auto'")
    if t.attention == "varlen" and unsupported(config()):
        raise HarnessError(f"train.attention: 'varlen' cannot run this model: {unsupported(config())}; use 'auto'")
    if t.quantization == "nf4" and not (cuda and _has_bitsandbytes()):
        raise HarnessError("train.quantization: 'nf4' needs a CUDA device and bitsandbytes "
                           "(pip install -e '.[cuda]'); use 'auto'")
    if t.liger_kernels == "on" and not (cuda and _has_liger()):
        raise HarnessError("train.liger_kernels: 'on' needs a CUDA device and liger-kernel "
                           "(pip install -e '.[cuda]'); use 'auto'")
    if t.liger_kernels == "on" and liger_missing(config()):
        raise HarnessError(f"train.liger_kernels: 'on': {liger_missing(config())}; use 'auto'")
    if t.compile == "on" and not cuda:
        raise HarnessError("train.compile: 'on' needs a CUDA device; use 'off'")
    if t.compile == "on" and t.liger_kernels == "on":
        raise HarnessError("train.compile: 'on' cannot compile Liger's kernels (train.liger_kernels: 'on'); "
                           "set liger_kernels to 'auto'")
    no_cuda = ("no CUDA device", lambda: cuda)
    fast = {
        # QLoRA saves memory at a speed cost: `auto` uses it on CUDA only for models too big to train
        # comfortably in bf16 (> 4 GB of weights, i.e. >= ~2B parameters).
        "quantize": t.quantization == "nf4" or (t.quantization == "auto" and _met("quantize", why, [
            no_cuda, ("bitsandbytes is not installed", _has_bitsandbytes),
            ("the bf16 weights are 4 GB or less (QLoRA only saves memory, at a speed cost)",
             lambda: weight_bytes(spec.model.base) > 4e9)])),
        "packing": packing,
        # trl 1.16 already computes the loss through a chunked LM head (no full-vocabulary logits);
        # Liger adds fused RMSNorm/SwiGLU/RoPE kernels (its own fused loss is off under trl). Compiled
        # layers get the same fusions from the compiler, so `auto` leaves Liger out of them.
        "liger_kernels": t.liger_kernels == "on" or (t.liger_kernels == "auto" and _met("liger_kernels", why, [
            no_cuda, ("liger-kernel is not installed", _has_liger),
            ("train.compile is on (the compiler fuses the same operations)", lambda: t.compile == "off"),
            (lambda: liger_missing(config()), lambda: not liger_missing(config()))])),
        # A packed batch is one long row: sdpa computes a dense (L x L) masked attention over it,
        # FlashAttention's varlen kernel attends within each example (harness.models.attention).
        "attention": t.attention if t.attention != "auto" else
        "varlen" if _met("attention", why, [
            no_cuda, ("packing is off (the kernel attends within packed examples)", lambda: packing),
            ("this PyTorch has no varlen attention kernel (PyTorch >= 2.10)", varlen_available),
            (lambda: unsupported(config()), lambda: not unsupported(config()))]) else "sdpa",
        # A small model's step is bound by kernel launches (torch.profiler on an H100: ~7,600 kernels
        # and 58 ms of GPU work in a 475 ms SmolLM2 step at batch 16): "on" compiles each decoder layer
        # into fewer, fused kernels (1.2-1.3x on SmolLM2, 1.1x on a 1.1B; its loss curve within the
        # seed-noise band of eager's in bench/RESULTS.md's fourth session; once cuda_graphs removes the
        # launches, 1.04x on SmolLM2, fifth session). Opt-in,
        # since compiling costs 20-70 s a job, which a short run does not win back; and LoRA dropout
        # draws other masks under it (inductor's generator: like another seed).
        "compile": t.compile,
        # LoRA's up-projection, scaling and add in one GEMM while training (harness.training.fused_lora):
        # the same function, fewer kernels; `auto` keeps CPU runs on PEFT's own arithmetic.
        "fused_lora": t.fused_lora == "on" or (t.fused_lora == "auto" and _met("fused_lora", why, [no_cuda])),
    }
    if not packing:
        why["packing"] = "train.packing is off" if t.packing == "off" else "no CUDA device"
    if t.attention not in ("auto", "varlen"):
        why["attention"] = f"train.attention is {t.attention}"
    if t.compile == "off":
        why["compile"] = "train.compile is off (opt-in: compiling costs 20-70 s a job)"
    for name, key in (("quantize", "quantization"), ("liger_kernels", "liger_kernels"), ("fused_lora", "fused_lora")):
        if getattr(t, key) in ("off", "none"):
            why[name] = f"train.{key} is {getattr(t, key)}"
    # The training step's forward and backward replayed as one CUDA graph (harness.training.cuda_graph_step):
    # for a launch-bound step. `auto` keeps larger models, whose step is GPU-bound, off: there the graph only
    # costs (H100, bench/RESULTS.md fifth session: SmolLM2-135M 6.2x at batch 16; the 1.1B architecture at
    # batch 64 0.95x, its fixed shapes making trl's LM head score every position, not just labelled ones).
    blockers = graph_blockers(spec, fast, cuda)
    if t.cuda_graphs == "on" and blockers:
        because = f" (attention: {why['attention']})" if "varlen" in blockers[0] and "attention" in why else ""
        raise HarnessError(f"train.cuda_graphs: 'on' needs {blockers[0]}{because}; use 'auto'")
    fast["cuda_graphs"] = t.cuda_graphs == "on" or (t.cuda_graphs == "auto" and _met("cuda_graphs", why, [
        *((f"needs {need}", lambda: False) for need in blockers[:1]),
        ("the bf16 weights are 1 GB or more (a GPU-bound step: the graph only costs)",
         lambda: weight_bytes(spec.model.base) < GRAPHS_MAX_WEIGHT_BYTES)]))
    if t.cuda_graphs == "off":
        why["cuda_graphs"] = "train.cuda_graphs is off"
    return fast


def _met(name: str, reasons: dict, needs: list) -> bool:
    """Whether every (reason, check) in `needs` holds, checked in order and lazily; the first that fails
    puts its reason (a string, or a callable giving one) under `name` in `reasons`."""
    for reason, check in needs:
        if not check():
            reasons[name] = reason() if callable(reason) else reason
            return False
    return True


def base_config(spec: TaskSpec):
    """The base model's transformers config (its architecture decides which fast paths compute what the
    model computes)."""
    from transformers import AutoConfig

    from harness.models.base_files import resolve_base

    ref = resolve_base(spec.model.base)
    try:
        return AutoConfig.from_pretrained(ref, trust_remote_code=spec.model.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise HarnessError(f"model.base: cannot read the config of '{ref}': {str(exc).splitlines()[0]}") from None


def liger_missing(config) -> str | None:
    """Why Liger would not patch this model, or None. liger-kernel picks its kernels by `model_type`
    (monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN; Gemma 3 270M is `gemma3_text`) and only logs a line for a
    type it has none for, so an unsupported model would train unpatched while the manifest said Liger."""
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:  # not installed (_has_liger decides), or broken: the Trainer's own import then fails loudly
        return None
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return f"liger-kernel has no kernels for model type '{model_type}'"
    return None


GRAPHS_MAX_WEIGHT_BYTES = 1e9  # bf16 weights of a ~500M-parameter model: between the two measured sizes


def graph_blockers(spec: TaskSpec, fast: dict, cuda: bool) -> list[str]:
    """What keeps the training step from being captured as a CUDA graph (empty: nothing)."""
    t = spec.train
    needs = {
        "a CUDA device": cuda,
        "packing with the varlen attention kernel (fixed-shape packed batches)": fast["packing"]
        and fast["attention"] == "varlen",
        "train.grad_accum 1 (a captured backward overwrites gradients)": t.grad_accum == 1,
        "one process (DDP's gradient all-reduce is not captured)": distributed.world_size() == 1,
        "no nf4 quantization (bitsandbytes kernels are not checked under capture)": not fast["quantize"],
        "gradient_checkpointing off (its recompute re-seeds the generator)": not t.gradient_checkpointing,
    }
    return [need for need, met in needs.items() if not met]


def weight_bytes(model_ref: str) -> int:
    """Size of a model's weight files: safetensors, else pickled `.bin` ones (0 when it is not a local
    folder yet). Folders that ship both formats hold the same weights twice: one format is counted."""
    from harness.models.base_files import resolve_base

    folder = Path(resolve_base(model_ref))
    if not folder.is_dir():
        return 0
    files = list(folder.glob("*.safetensors")) or list(folder.glob("*.bin"))
    return sum(p.stat().st_size for p in files)


def _has_bitsandbytes() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def _has_liger() -> bool:
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


_TOKENIZE_PER_PROCESS = 5_000  # fewer examples per process do not repay starting one


def tokenized_dataset(spec: TaskSpec, tokenizer, examples):
    """input_ids/labels rows (harness.data.prompts.encode_fitted) with a progress bar; a title whose prompt
    leaves too little room within train.max_length is cut, or its example dropped (`train.long_prompts`)."""
    return tokenize_counting(spec, tokenizer, examples)[0]


def tokenize_counting(spec: TaskSpec, tokenizer, examples) -> tuple[object, dict]:
    """tokenized_dataset, and how many titles it cut (`truncated`) or dropped (`skipped`), counted as it goes.

    Batched tokenizer calls, spread by datasets.map over up to one process per CPU core: a
    100k-example set takes seconds on a 16-core machine rather than minutes in one process.
    """
    import os
    import uuid

    from datasets import Dataset

    titles = [ex.title for ex in examples]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cpus = max(1, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))  # the host's other ranks tokenize too
    procs = min(cpus, len(titles) // _TOKENIZE_PER_PROCESS)
    dataset = Dataset.from_dict({"title": titles, "content": [ex.content for ex in examples]}).map(
        _encode_batch, batched=True, remove_columns=["title", "content"], num_proc=procs if procs > 1 else None,
        fn_kwargs={"tokenizer": tokenizer, "prompt": spec.prompt, "max_length": spec.train.max_length,
                   "skip_long": spec.train.long_prompts == "skip"},
        # An in-memory dataset has no cache to key; naming the result skips hashing the tokenizer.
        new_fingerprint=uuid.uuid4().hex, desc="tokenizing")
    counts = {"truncated": sum(dataset["title_cut"]) if len(dataset) else 0, "skipped": len(titles) - len(dataset)}
    # With every example dropped, map returns a dataset without columns.
    return (dataset.remove_columns("title_cut") if len(dataset) else dataset), counts


def _encode_batch(batch: dict, tokenizer, prompt, max_length: int, skip_long: bool) -> dict:
    fitted = fit_prompts(tokenizer, prompt, batch["title"], max_length)
    keep = [i for i, f in enumerate(fitted) if not (skip_long and f.truncated)]
    encoded = encode_fitted(tokenizer, [fitted[i] for i in keep], [batch["content"][i] for i in keep], max_length)
    return {"input_ids": [e.input_ids for e in encoded], "labels": [e.labels for e in encoded],
            "title_cut": [fitted[i].truncated for i in keep]}


def split_eval(examples: list, fraction: float) -> tuple[list, list]:
    """A small validation slice from the training side (never the held-out split)."""
    n_eval = int(len(examples) * fraction)
    if fraction <= 0 or n_eval < 1:
        return examples, []
    return examples[n_eval:], examples[:n_eval]


class _StopOnSignal:
    """A TrainerCallback that turns SIGINT/SIGTERM into save-checkpoint-and-stop."""

    # Under torchrun, Ctrl-C reaches each process twice: from the terminal, and passed on by the launcher.
    LAUNCHER_ECHO_S = 2.0

    def __init__(self):
        self.received: int | None = None
        self.at = 0.0

    def handler(self, signum, _frame):
        if self.received is not None:  # a second signal: the user really wants out now
            if distributed.world_size() > 1 and time.monotonic() - self.at < self.LAUNCHER_ECHO_S:
                return
            raise KeyboardInterrupt
        self.received, self.at = signum, time.monotonic()
        log.warning("signal %s: saving a checkpoint, then stopping (send again to abort now)", signum)

    def callback(self, accelerator):
        """Stops every process at the same step: a signal reaches them at slightly different moments, and
        a process that stops alone leaves the others waiting in their next gradient all-reduce."""
        from transformers import TrainerCallback

        outer = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if outer.received is not None:
                    accelerator.set_trigger()
                if accelerator.check_trigger():  # any process's trigger, through one all-reduce
                    control.should_save = True
                    control.should_training_stop = True

        return Callback()


@contextmanager
def _signals_to(stopper: _StopOnSignal):
    previous = {s: signal.signal(s, stopper.handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class _LossLog:
    """Append every logged loss to `train_log.jsonl` as it happens (survives a crash)."""

    def __init__(self, path: Path):
        self.path = path

    def callback(self):
        from transformers import TrainerCallback

        path = self.path

        class Callback(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and state.is_world_process_zero:
                    with open(path, "a", encoding="utf-8") as fh:
                        fh.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")

        return Callback()


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest complete checkpoint: the Trainer writes trainer_state.json last, so a folder
    without it is one a kill -9 cut short, and is skipped."""
    found = sorted((p for p in checkpoint_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()
                    and _readable_json(p / "trainer_state.json")), key=lambda p: int(p.name.split("-")[-1]))
    return found[-1] if found else None


def _readable_json(path: Path) -> bool:
    try:
        json.loads(path.read_text(encoding="utf-8"))
        return True
    except (OSError, ValueError):
        return False


def _trim_log(path: Path, last_step: int) -> None:
    """Drop log rows past the checkpoint a resume starts from (a kill -9 logged them, resume redoes them)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line
    atomic_write_text(path, "".join(kept))


def sft_options(spec: TaskSpec, tokenizer, device: Device, output_dir: Path, evaluate: bool = False,
                fast: dict | None = None) -> dict:
    """The SFTConfig fields harness trains with (the bench hands the same ones to other trainers);
    `fast` is fast_path_options(spec, device) where the caller has it already."""
    t = spec.train
    fast = fast or fast_path_options(spec, device)
    options = dict(
        output_dir=str(output_dir),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        lr_scheduler_type="cosine",
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        # One fused kernel set for all LoRA tensors on CUDA; transformers' default there since torch 2.8,
        # named so that no version's default changes the recipe.
        optim="adamw_torch_fused" if device.kind == "cuda" else "adamw_torch",
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=2,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=t.save_steps,
        seed=t.seed,
        data_seed=t.seed,
        bf16=device.kind == "cuda",
        use_cpu=device.kind == "cpu",
        report_to=tracking.report_to_option(spec),
        max_length=t.max_length,
        packing=fast["packing"],
        padding_free=fast["packing"],
        use_liger_kernel=fast["liger_kernels"],
        eos_token=tokenizer.eos_token,
        dataloader_num_workers=0,
        # A non-finite loss is logged as it is: the filter replaced it with the running mean (hiding
        # it), and its check read each step's loss back from the GPU, so the host waited every step.
        logging_nan_inf_filter=False,
        disable_tqdm=False,
        # Under DDP: every LoRA parameter gets a gradient each step, so DDP need not search the graph
        # for unused ones (an extra traversal per step).
        ddp_find_unused_parameters=False,
    )
    if t.keep_best:
        # The Trainer restores the best checkpoint at the end; it evaluates at every save (eval_steps ==
        # save_steps above, both "steps") and never rotates the best checkpoint away (save_total_limit).
        options.update(load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False)
    options[checkpointing_field()] = t.gradient_checkpointing
    return options


def checkpointing_field() -> str:
    """The SFTConfig field that switches activation checkpointing, always named: trl's configs default
    it to on, so leaving it out trained every spec with `gradient_checkpointing: false` with it on
    (recomputing each forward in the backward). transformers 5.23 renamed the field
    (`activation_checkpointing`; the old name still works there but warns); 5.17 knows only the old."""
    from dataclasses import fields

    from transformers import TrainingArguments

    names = {f.name for f in fields(TrainingArguments)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def build_trainer(spec: TaskSpec, model, tokenizer, train_ds, eval_ds, output_dir: Path, device: Device,
                  plain_peft: bool = False, fast: dict | None = None, **overrides):
    """An SFTTrainer for `spec` on pre-tokenized datasets; `overrides` replace SFTConfig fields, and
    `plain_peft` keeps PEFT's default input casts and compiles and captures nothing (both for the
    bench's baseline recipes); `fast` as in sft_options."""
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    # No peft.prepare_model_for_kbit_training for QLoRA: trl 1.16 already keeps the adapters in bf16
    # and enables input gradients for checkpointing, and that function's fp32 upcast of every
    # non-quantized weight (embeddings, LM head) costs 2 GB on a Llama-3-8B for no gain in bf16.
    lora = LoraConfig(r=spec.lora.r, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
                      target_modules=spec.lora.target_modules, task_type="CAUSAL_LM")
    fast = fast or fast_path_options(spec, device)
    options = {**sft_options(spec, tokenizer, device, output_dir, evaluate=eval_ds is not None, fast=fast),
               **overrides}
    trainer = SFTTrainer(model=model, args=SFTConfig(**options), train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tokenizer, peft_config=lora)
    if device.kind == "cuda" and not plain_peft:
        lora_inputs_in_compute_dtype(trainer.model)
    if spec.train.compile == "on" and not plain_peft:
        compile_layers(trainer.model)
    if fast["cuda_graphs"] and not plain_peft:
        from harness.training.cuda_graph_step import capture_training_steps

        capture_training_steps(trainer)
    return trainer


def decoder_layers(model):
    """The repeated decoder blocks of a (PEFT-wrapped) causal LM: `model.layers` in transformers' layout."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    prefix = getattr(base, "base_model_prefix", "model")
    layers = getattr(getattr(base, prefix, None), "layers", None)
    if layers is None:
        raise HarnessError(f"train.compile: {type(base).__name__} has no `{prefix}.layers` to compile; "
                           "set train.compile=off")
    return layers


def compile_layers(model, backend: str = "inductor") -> int:
    """torch.compile each decoder layer in place (returns how many).

    Every layer runs the same code, so it is compiled once and reused ("regional compilation"):
    about one layer's compile time instead of a whole model's, and the LoRA layers, norms,
    activations and casts of a block become a few fused kernels instead of hundreds of launches.
    `fullgraph` makes a construct the compiler cannot take fail at the first step rather than
    silently run half-compiled. (Replaying the compiled layers as CUDA graphs over fixed-shape
    batches failed inside inductor on torch 2.11: with graph trees "input tensor deallocate during
    graph recording", without them an assertion in compile_fx's input copy.)"""
    import torch

    layers = decoder_layers(model)
    # One compiled graph per input shape and training mode serves every layer; the packed batch's
    # length varies, so the per-function recompile budget must cover a few shapes.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8 * len(layers))
    for layer in layers:
        layer.compile(backend=backend, fullgraph=True)
    return len(layers)


def lora_inputs_in_compute_dtype(model) -> int:
    """Stop PEFT casting each LoRA layer's input to the adapter's fp32 (returns the layers changed).

    PEFT keeps adapter weights in fp32 and casts every input to match: on a bf16 model that is an
    fp32 copy of the activations, and a dropout over it, in each of the 7 LoRA layers per block (23%
    and 13% of a TinyLlama-1.1B step's GPU time, bench/profile_train.py). Under the Trainer's bf16
    autocast the adapter matmuls run in bf16 anyway, and the fp32 master weights stay. This is what
    peft.helpers.disable_input_dtype_casting does, as a context manager, around one call."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    return len(layers)


@contextmanager
def modeling_module_restored(model):
    """Undo what training patched into the model's transformers modeling module.

    Liger (through the Trainer) swaps the Llama module's RMSNorm, SwiGLU and RoPE for its kernels
    module-wide, so every model loaded later in the process would use them: tuned outputs would be
    scored with other kernels than base outputs, and greedy decoding in bf16 changes with them."""
    module = sys.modules[type(transformers_model(model)).__module__]
    saved = dict(vars(module))
    try:
        yield
    finally:
        for name, value in saved.items():
            if vars(module).get(name) is not value:
                setattr(module, name, value)


def train(spec: TaskSpec, model, tokenizer, train_examples, run_dir: Path, device: Device,
          resume_from: Path | None = None, fast: dict | None = None, tracked: dict | None = None,
          on_tracking=None) -> TrainResult:
    """Train a LoRA adapter on `train_examples`; save it in standard PEFT format under run_dir/adapter.
    `fast`: fast_path_options(spec, device), where the caller resolved it already (run does, up front);
    `tracked`: the manifest's `tracking` record of an earlier session of this run (a resume); `on_tracking(record)`
    is told where the trackers log before training starts (so an interrupted run resumes into the same runs)."""
    train_part, eval_part = split_eval(train_examples, spec.train.eval_fraction)
    if spec.train.keep_best and not eval_part:
        raise HarnessError(f"train.keep_best: train.eval_fraction {spec.train.eval_fraction} of "
                           f"{len(train_examples)} examples leaves no eval example; raise it")
    train_ds, counts = tokenize_counting(spec, tokenizer, train_part)
    eval_ds, eval_counts = tokenize_counting(spec, tokenizer, eval_part) if eval_part else (None, {})
    counts = {k: n + eval_counts.get(k, 0) for k, n in counts.items()}
    if any(counts.values()) and distributed.is_main():
        log.warning("long prompts: %d of %d train titles %s to fit train.max_length %d (train.long_prompts: %s)",
                    sum(counts.values()), len(train_examples), "cut" if counts["truncated"] else "left out",
                    spec.train.max_length, spec.train.long_prompts)
    for part, ds in (("training", train_ds), ("eval", eval_ds)):
        if ds is not None and not len(ds) and (part == "training" or spec.train.keep_best):
            raise HarnessError(f"train.long_prompts: skip drops every {part} example (no prompt leaves room for "
                               f"a description within train.max_length {spec.train.max_length}); raise "
                               "train.max_length or set train.long_prompts: truncate")
    if eval_ds is not None and not len(eval_ds):
        eval_ds = None  # skip dropped the whole eval slice, which only logs a loss here
    with modeling_module_restored(model):
        result = _train(spec, model, tokenizer, train_ds, eval_ds, run_dir, device, resume_from, fast, tracked,
                        on_tracking)
    result.long_prompts = counts
    return result


def _train(spec: TaskSpec, model, tokenizer, train_ds, eval_ds, run_dir: Path, device: Device,
           resume_from: Path | None, fast: dict | None, tracked: dict | None, on_tracking) -> TrainResult:
    fast = fast or fast_path_options(spec, device)
    trainer = build_trainer(spec, model, tokenizer, train_ds, eval_ds, run_dir / "checkpoints", device, fast=fast)
    stopper = _StopOnSignal()
    trainer.add_callback(stopper.callback(trainer.accelerator))
    # Before the trackers: what these add to a log (tokens/s) is tracked too.
    tracking.attach(trainer, [tracking.TokensPerSecond().callback(), _LossLog(run_dir / "train_log.jsonl").callback()])
    if trainer.is_world_process_zero():
        _trim_log(run_dir / "train_log.jsonl", int(Path(resume_from).name.split("-")[-1]) if resume_from else 0)
    started = time.perf_counter()
    with _signals_to(stopper), fused_lora_add(trainer.model, fast["fused_lora"]), \
            tracking.training_session(spec, run_dir, trainer, tracked) as tracked:
        if tracked and on_tracking is not None:
            on_tracking(tracked)
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    if stopper.received is not None:
        raise TrainingInterrupted(f"training interrupted by signal {stopper.received}; "
                                  f"resume with: python -m harness run --resume {run_dir}")
    adapter_dir = run_dir / ADAPTER_DIR
    sync_eos(trainer.model, tokenizer)
    if trainer.is_world_process_zero():
        trainer.model.save_pretrained(str(adapter_dir), safe_serialization=True)
        write_portable_adapter_config(adapter_dir, spec.model.base)
    trainer.accelerator.wait_for_everyone()  # the others score with the adapter next
    n_tokens = sum(len(ids) for ids in train_ds["input_ids"]) * max(spec.train.epochs, 1)
    best = None
    if spec.train.keep_best:
        best = {"checkpoint": trainer.state.best_model_checkpoint, "eval_loss": trainer.state.best_metric}
        log.info("keep_best: adapter restored from %s (eval loss %s)", best["checkpoint"], best["eval_loss"])
    return TrainResult(adapter_dir=adapter_dir,
                       steps=trainer.state.global_step, train_tokens=int(n_tokens),
                       seconds=time.perf_counter() - started, best=best)


def write_portable_adapter_config(adapter_dir: Path, base: str) -> None:
    """Rewrite a saved adapter's adapter_config.json so it means the same everywhere: `target_modules` in
    sorted order (PEFT saves a set, whose order follows the process's hash seed, and with it the adapter's
    fingerprint), and for an embedded base model its public id as base_model_name_or_path (also in the front
    matter of PEFT's README) rather than this machine's cache folder; `eval` matches that id to the embedded
    model. Rewritten after saving, so PEFT's own checks at save time still read the local folder (with a
    hub id they would query the Hub)."""
    path = adapter_dir / "adapter_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    embedded = embedded_model(base)
    if embedded is not None:
        config["base_model_name_or_path"] = embedded.hub_id
    atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True))
    if embedded is None:
        return
    readme = adapter_dir / "README.md"
    if readme.is_file():
        from huggingface_hub import ModelCard

        card = ModelCard.load(readme)
        card.data.base_model = embedded.hub_id
        atomic_write_text(readme, str(card))
