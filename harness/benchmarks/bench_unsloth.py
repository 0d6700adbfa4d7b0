"""The bench's `unsloth` recipe, in a process of its own.

Unsloth pins trl <= 1.15 and datasets < 5 while harness runs on trl 1.16 and datasets 5, so the
two cannot share one interpreter: Unsloth's packages live in their own folder (`--unsloth-site`,
put first on this process' path) and the bench runs this module as a subprocess. The parent hands
over the exact token ids harness trained on, the LoRA config and the SFTConfig fields of the
harness recipe; the child trains with Unsloth's FastLanguageModel and its patched SFTTrainer,
times itself with the bench's own StepClock, and answers with one JSON file.

    python -m harness.benchmarks.bench_unsloth JOB.json RESULT.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

UNAVAILABLE_EXIT = 3  # Unsloth cannot run here: RESULT.json says why, in one line
VERSIONS = ("unsloth", "unsloth_zoo", "torch", "transformers", "trl", "datasets", "peft", "accelerate",
            "bitsandbytes", "torchao", "triton")


def _versions() -> dict[str, str | None]:
    from harness.runfolder import package_versions  # imported after Unsloth, which must come first

    return package_versions(VERSIONS)


def _write(path: Path, payload: dict) -> None:
    from harness.io import atomic_write_json

    atomic_write_json(path, payload)


def run_job(job: dict, import_s: float) -> dict:
    """Train one epoch with Unsloth as `job` says; return the clock's figures."""
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    from unsloth import FastLanguageModel

    from harness.benchmarks.train_clock import StepClock, flops_per_token

    device_kind = "cuda" if torch.cuda.is_available() else "cpu"
    lora, sft = job["lora"], job["sft"]
    if device_kind == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    # Everything Unsloth offers for speed stays at its default, except gradient checkpointing,
    # which harness' recipe does not use either (Unsloth's default offloads activations: slower).
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=job["model_dir"], max_seq_length=sft["max_length"], dtype=torch.bfloat16 if device_kind == "cuda"
        else torch.float32, load_in_4bit=False, load_in_16bit=True, use_gradient_checkpointing=False,
        fix_tokenizer=False, use_exact_model_name=True)
    model = FastLanguageModel.get_peft_model(
        model, r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
        target_modules=lora["target_modules"], bias="none", use_gradient_checkpointing=False,
        random_state=sft["seed"])
    rows = [json.loads(line) for line in Path(job["examples"]).read_text(encoding="utf-8").splitlines()]
    trainer = SFTTrainer(model=model, args=SFTConfig(**sft), train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer)
    clock = StepClock(device_kind, job["warmup"])
    clock.attach(trainer)
    trainer.train()
    job_s = time.perf_counter() - started
    base = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    return {
        "figures": clock.measure(job["label"], "unsloth"),
        "flops": flops_per_token(base, job["mean_len"]),
        "job_s": job_s, "import_s": import_s,
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if device_kind == "cuda" else 0.0,
        "attention": getattr(base.config, "_attn_implementation", None) or "unknown",
        "packing": bool(trainer.args.packing), "padding_free": bool(getattr(trainer.args, "padding_free", False)),
        "versions": _versions(),
    }


def main(argv: list[str]) -> int:
    job_path, out_path = Path(argv[0]), Path(argv[1])
    job = json.loads(job_path.read_text(encoding="utf-8"))
    started = time.perf_counter()
    try:
        import unsloth  # noqa: F401  (first: Unsloth patches transformers and trl as it is imported)
    except Exception as exc:  # not installed, no GPU it supports, wrong torch: all mean "cannot run here"
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        _write(out_path, {"unavailable": reason, "versions": _versions()})
        return UNAVAILABLE_EXIT
    _write(out_path, run_job(job, time.perf_counter() - started))
    return 0


class UnslothUnavailable(Exception):
    """Unsloth cannot run on this machine (the bench says why in one line and goes on)."""


def measure_unsloth(spec, tokenizer, examples, device, label: str, batch: int, model_dir: Path, work: Path,
                    site: str | None, warmup: int, loss_every: int):
    """The `unsloth` recipe's TrainMeasure, from a subprocess on the same tokens and settings as harness'."""
    from dataclasses import replace

    from harness.benchmarks.bench_train import recipe_overrides
    from harness.benchmarks.train_clock import TrainMeasure, with_mfu
    from harness.errors import HarnessError
    from harness.training.tokenization import tokenized_dataset
    from harness.training.train import sft_options

    folder = work / f"unsloth-{label.split(' ')[0]}-{batch}"
    folder.mkdir(parents=True, exist_ok=True)
    tokenized = tokenized_dataset(spec, tokenizer, examples)
    (folder / "examples.jsonl").write_text("".join(json.dumps({"input_ids": i, "labels": lab}) + "\n" for i, lab in
                                                   zip(tokenized["input_ids"], tokenized["labels"])), encoding="utf-8")
    harness_spec = replace(spec, train=replace(spec.train, packing="on"))
    sft = {**sft_options(harness_spec, tokenizer, device, folder / "trainer"),
           **recipe_overrides("harness", batch, device, loss_every=loss_every),
           "use_liger_kernel": False, "torch_compile": False}  # Unsloth brings its own kernels and compiler
    job = {"model_dir": str(model_dir), "label": label, "warmup": warmup, "sft": sft,
           "mean_len": sum(len(ids) for ids in tokenized["input_ids"]) / len(examples),
           "lora": {"r": spec.lora.r, "alpha": spec.lora.alpha, "dropout": spec.lora.dropout,
                    "target_modules": list(spec.lora.target_modules)},
           "examples": str(folder / "examples.jsonl")}
    (folder / "job.json").write_text(json.dumps(job), encoding="utf-8")
    out = folder / "result.json"
    out.unlink(missing_ok=True)
    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([p for p in (site, repo) if p]), "HF_HUB_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    command = [sys.executable, "-m", "harness.benchmarks.bench_unsloth", str(folder / "job.json"), str(out)]
    proc = subprocess.run(command, env=env, cwd=folder)
    process_s = time.perf_counter() - started
    result = json.loads(out.read_text(encoding="utf-8")) if out.is_file() else None
    if proc.returncode == UNAVAILABLE_EXIT and result:
        raise UnslothUnavailable(result["unavailable"])
    if proc.returncode != 0 or not result:
        raise HarnessError(f"bench: the unsloth subprocess failed (exit {proc.returncode}); its output is above")
    v = result["versions"]
    notes = (f"unsloth {v['unsloth']}, unsloth_zoo {v['unsloth_zoo']}, trl {v['trl']}, datasets {v['datasets']}; "
             f"import {result['import_s']:.1f} s, whole subprocess {process_s:.1f} s; "
             f"packing {result['packing']}, padding-free {result['padding_free']}")
    measure = TrainMeasure(model=label, recipe="unsloth", batch=batch, attention=result["attention"],
                           job_s=result["job_s"], peak_mem_gb=result["peak_mem_gb"], notes=notes,
                           train_seed=sft["seed"],
                           **with_mfu(result["figures"], tuple(result["flops"]), device))
    return measure, v


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
