"""LoRA / QLoRA training through peft and trl's SFTTrainer.

Examples reach trl already tokenized, with labels masked to the description tokens, so the
loss is on the completion only and the tokens match scoring exactly (harness.training.tokenization).
SIGINT/SIGTERM save a checkpoint and stop cleanly; `resume_from` continues from one
(harness.training.interruptions). Which fast paths run is decided in harness.training.fast_paths.
Launched in several processes (harness.distributed), the Trainer trains data-parallel (DDP):
each process packs and trains on its share of every step; the world's process zero alone
writes the log and the adapter.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from harness import distributed
from harness.devices import Device
from harness.errors import HarnessError
from harness.io import atomic_write_text
from harness.models.base_files import embedded_model
from harness.models.end_of_turn import sync_eos
from harness.runfolder import ADAPTER_DIR
from harness.spec import TaskSpec
from harness.training import tracking
from harness.training.fast_paths import fast_path_options
from harness.training.fused_lora import fused_lora_add
from harness.training.interruptions import LossLog, StopOnSignal, signals_to, trim_log
from harness.training.model_patches import compile_layers, lora_inputs_in_compute_dtype, modeling_module_restored
from harness.training.tokenization import split_eval, tokenize_counting

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
    stopper = StopOnSignal()
    trainer.add_callback(stopper.callback(trainer.accelerator))
    # Before the trackers: what these add to a log (tokens/s) is tracked too.
    tracking.attach(trainer, [tracking.TokensPerSecond().callback(), LossLog(run_dir / "train_log.jsonl").callback()])
    if trainer.is_world_process_zero():
        trim_log(run_dir / "train_log.jsonl", int(Path(resume_from).name.split("-")[-1]) if resume_from else 0)
    started = time.perf_counter()
    with signals_to(stopper), fused_lora_add(trainer.model, fast["fused_lora"]), \
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
