"""`harness export RUN --out DIR`: the run's base model with its adapter merged, ready to deploy.

The folder is what plain transformers (and servers that read transformers folders) load with no
harness and no PEFT: safetensors weights, the tokenizer as the run configured it (its EOS is the
run's: the chat template's end-of-turn token, or the tokenizer's own EOS with a prompt preset), the
chat template, a `generation_config.json` that stops at that EOS with the run's decoding settings, a
model card (README.md) with the run's held-out results, and `harness_export.json` (where it came from).

The merge is peft's `merge_and_unload`, in fp32 on the CPU, then cast to `--dtype`. Greedy decoding of
the fp32 export on the CPU gives the run's tuned predictions of a CPU run (tests/test_export.py). One
difference stays: harness counts `repetition_penalty` and `no_repeat_ngram_size` over the output only,
transformers over the prompt too (docs/results-schema.md), so with those on, an output that repeats
words of its own prompt can decode differently.

A QLoRA run (its manifest's fast_path.quantize) trained its adapter on the nf4-quantized base, so export
refuses it unless `--dequantize`: the base is loaded in nf4 as in training (CUDA and bitsandbytes),
de-quantized to bf16 and the adapter merged there. What that costs: the base's 4-bit rounding error stays
in every weight (the export is not the original base plus the adapter, and no smaller than a bf16 model),
and it is not the model the run's held-out numbers measured: harness scores a QLoRA adapter on the
original bf16 base.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from harness import devices, models
from harness.errors import HarnessError, ModelError, RunError
from harness.io import atomic_write_json, atomic_write_text
from harness.models import base_files, end_of_turn
from harness.runfolder import load_run_spec, read_manifest, trained_adapter

log = logging.getLogger(__name__)
DTYPES = ("bf16", "fp16", "fp32")
EXPORT_RECORD = "harness_export.json"


def export_run(run_dir: Path, out_dir: Path, dtype: str = "bf16", dequantize: bool = False) -> Path:
    """Write the merged model of `run_dir` into the new folder `out_dir` (never over an existing one)."""
    import torch

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if dtype not in DTYPES:
        raise HarnessError(f"export --dtype: '{dtype}' is not one of {', '.join(DTYPES)}")
    manifest = read_manifest(run_dir)
    adapter_dir = trained_adapter(run_dir)
    quantized = bool((manifest.get("fast_path") or {}).get("quantize"))
    if quantized and not dequantize:
        raise RunError(f"{run_dir}: a QLoRA run (its adapter learned on the nf4-quantized base); pass --dequantize "
                       "to merge it into that base de-quantized to bf16 (the 4-bit rounding stays in every weight, "
                       "and the run's held-out scores were measured on the original bf16 base, not on this one)")
    if dequantize and not quantized:
        raise HarnessError(f"export --dequantize: {run_dir} is no QLoRA run (fast_path.quantize is false); leave it out")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise HarnessError(f"export --out {out_dir}: exists and is not an empty folder; name a new one")
    spec = load_run_spec(run_dir)
    model_ref = base_files.resolve_base(spec.model.base)
    tokenizer = models.load_tokenizer(model_ref, spec.model, uses_chat_template=spec.prompt.template is None)
    model = _merged(spec, model_ref, tokenizer, adapter_dir, dequantize)
    model = model.to(dtype={"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype])
    _stop_at_run_eos(model, tokenizer, spec.generation)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        record = {"run": str(run_dir.resolve()), "base_model": spec.model.base,
                  "public_base_model": models.public_model_id(spec.model.base), "dtype": dtype,
                  "dequantized_nf4_base": dequantize, "eos_token": tokenizer.eos_token,
                  "prompt_format": manifest.get("prompt_format"),
                  "note": "harness counts repetition_penalty and no_repeat_ngram_size over the output only; "
                          "transformers (generation_config.json) counts the prompt too"}
        atomic_write_json(tmp / EXPORT_RECORD, record)
        if (run_dir / "metrics.json").is_file():
            from harness.reporting.model_card import model_card

            atomic_write_text(tmp / "README.md", str(model_card(run_dir, export={"dtype": dtype,
                                                                               "dequantized": dequantize})))
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s merged into %s (%s)", adapter_dir, out_dir, dtype)
    return out_dir


def _merged(spec, model_ref: str, tokenizer, adapter_dir: Path, dequantize: bool):
    """The base with the adapter merged (peft merge_and_unload): fp32 on the CPU, or with `dequantize` the nf4
    base of QLoRA training, de-quantized to bf16 on the GPU, merged there and brought to the CPU."""
    if dequantize:
        device = devices.pick_device()
        if device.kind != "cuda":
            raise ModelError("export --dequantize: loading the nf4 base as training did needs a CUDA device and "
                             "bitsandbytes (pip install -e '.[cuda]')")
        base = models.load_model(model_ref, spec.model, tokenizer, device, quantize=True).dequantize()
    else:
        base = models.load_model(model_ref, spec.model, tokenizer, devices.Device("cpu"))
    merged = models.load_adapter(base, adapter_dir, spec.model.allow_pickle).merge_and_unload()
    return merged.to("cpu")


def _stop_at_run_eos(model, tokenizer, gen) -> None:
    """generation_config.json: stop at the run's EOS, decode with the run's settings (greedy unless it sampled)."""
    end_of_turn.sync_eos(model, tokenizer)
    config = model.generation_config
    config.max_new_tokens = gen.max_new_tokens
    config.do_sample = gen.do_sample
    if gen.do_sample:
        config.temperature, config.top_p = gen.temperature, gen.top_p
    else:
        config.temperature = config.top_p = config.top_k = None  # greedy: no sampling knobs left to warn about
    config.repetition_penalty = gen.repetition_penalty if gen.repetition_penalty != 1.0 else None
    config.no_repeat_ngram_size = gen.no_repeat_ngram_size or None


def summary(out_dir: Path) -> str:
    record = json.loads((Path(out_dir) / EXPORT_RECORD).read_text(encoding="utf-8"))
    return (f"exported: {out_dir} ({record['dtype']}, stops at {record['eos_token']}); load it with "
            f"AutoModelForCausalLM.from_pretrained('{out_dir}')")
