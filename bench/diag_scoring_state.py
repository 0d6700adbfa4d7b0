"""Does a training leave anything in the process that changes later greedy scoring? (issue 12, item 4)

On the H100 the base model's held-out texts of a `sweep` (scored after trainings, in the same process)
and of a fresh `harness eval` differed (112 of 142 identical). This separates the suspects in one call:

    python bench/diag_scoring_state.py TASK OUT.json [--train-steps N] [--set KEY=VALUE ...]

scores the base model on the held-out prompts (A1), again with a fresh copy (A2: same-process
repeatability), then trains a LoRA adapter for N steps like `run` does and scores a freshly loaded base
model again (B). It records process-wide settings that decide which kernels run (matmul precision
flags, SDPA backends, deterministic mode, the Llama module's functions, the attention registry)
before and after training, and writes the texts so a second process (`--train-steps 0`) can be
compared with the first: `python bench/diag_scoring_state.py --compare ONE.json TWO.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path


def process_state() -> dict:
    """Every process-wide switch we know of that changes which kernels a forward pass runs."""
    import torch
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama import modeling_llama as llama

    cuda = torch.backends.cuda
    state = {
        "matmul.allow_tf32": cuda.matmul.allow_tf32,
        "matmul.allow_bf16_reduced_precision_reduction": cuda.matmul.allow_bf16_reduced_precision_reduction,
        "matmul.allow_fp16_reduced_precision_reduction": cuda.matmul.allow_fp16_reduced_precision_reduction,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32, "cudnn.benchmark": torch.backends.cudnn.benchmark,
        "cudnn.deterministic": torch.backends.cudnn.deterministic,
        "sdp.flash": cuda.flash_sdp_enabled(), "sdp.mem_efficient": cuda.mem_efficient_sdp_enabled(),
        "sdp.math": cuda.math_sdp_enabled(), "sdp.cudnn": cuda.cudnn_sdp_enabled(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "default_dtype": str(torch.get_default_dtype()),
    }
    for name in ("apply_rotary_pos_emb", "rotate_half", "repeat_kv", "eager_attention_forward"):
        fn = getattr(llama, name, None)
        state[f"llama.{name}"] = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', fn)}"
    for cls in ("LlamaRMSNorm", "LlamaMLP", "LlamaAttention", "LlamaRotaryEmbedding", "LlamaDecoderLayer"):
        obj = getattr(llama, cls)
        state[f"llama.{cls}"] = f"{obj.__module__}.{obj.__qualname__}"
        state[f"llama.{cls}.forward"] = f"{obj.forward.__module__}.{obj.forward.__qualname__}"
    for registry, label in ((ALL_ATTENTION_FUNCTIONS, "attention"), (ALL_MASK_ATTENTION_FUNCTIONS, "mask")):
        for key in sorted(registry):
            fn = registry[key]
            state[f"{label}[{key}]"] = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', fn)}"
    return state


def _score(spec, model_ref, tokenizer, device, prompts, sdpa: list[str] | None = None) -> list[str]:
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    from harness import models
    from harness.scoring.generation import generate

    model = models.load_model(model_ref, spec.model, tokenizer, device)
    backends = sdpa_kernel([getattr(SDPBackend, b.upper()) for b in sdpa]) if sdpa else nullcontext()
    with backends:
        texts = [g.text for g in generate(model, tokenizer, prompts, spec.generation, device)]
    del model
    return texts


def measure(task: str, overrides: list[str], train_steps: int, sdpa: list[str] | None = None) -> dict:
    from harness import devices, models
    from harness.data import records as data_mod
    from harness.data.prompts import build_prompt
    from harness.recipes.run import load_base_tokenizer
    from harness.spec import load_spec
    from harness.training.fast_paths import fast_path_options
    from harness.training.train import train

    spec = load_spec(task, overrides)
    device = devices.pick_device()
    prepared = data_mod.prepare(spec)
    model_ref, tokenizer = load_base_tokenizer(spec)
    prompts = [build_prompt(tokenizer, spec.prompt, e.title) for e in prepared.heldout]
    result = {"device": str(device.torch_device), "prompts": len(prompts), "state_before": process_state()}
    result["sdpa_backends"] = sdpa or "default"
    result["A1"] = _score(spec, model_ref, tokenizer, device, prompts, sdpa)
    result["A2"] = _score(spec, model_ref, tokenizer, device, prompts, sdpa)
    if train_steps:
        spec = replace(spec, train=replace(spec.train, max_steps=train_steps, save_steps=10 ** 6))
        fast = fast_path_options(spec, device)
        model = models.load_model(model_ref, spec.model, tokenizer, device, quantize=fast["quantize"],
                                  attn_implementation=fast["attention"])
        with tempfile.TemporaryDirectory() as run_dir:
            train(spec, model, tokenizer, list(prepared.train), Path(run_dir), device, fast=fast)
        del model
        result["state_after_training"] = process_state()
        result["B"] = _score(spec, model_ref, tokenizer, device, prompts)
    return result


def _same(a: list[str], b: list[str]) -> str:
    return f"{sum(x == y for x, y in zip(a, b))} of {len(a)} identical"


def summary(result: dict) -> list[str]:
    lines = [f"device {result['device']}, {result['prompts']} held-out prompts, SDPA backends {result['sdpa_backends']}",
             f"A1 vs A2 (same process, fresh model each): {_same(result['A1'], result['A2'])}"]
    if "B" in result:
        lines.append(f"A1 vs B (B scored after training in the same process): {_same(result['A1'], result['B'])}")
        before, after = result["state_before"], result["state_after_training"]
        changed = [f"  {k}: {before.get(k)} -> {after.get(k)}" for k in sorted(set(before) | set(after))
                   if before.get(k) != after.get(k)]
        lines += ["process state changed by training:" if changed else "process state unchanged by training"] + changed
    return lines


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", nargs="?")
    parser.add_argument("out", nargs="?")
    parser.add_argument("--train-steps", type=int, default=5)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--sdpa", help="score with only these SDPA backends, e.g. math or efficient_attention,math")
    parser.add_argument("--compare", nargs=2, metavar="JSON", help="two outputs of this script: their A1 texts")
    args = parser.parse_args(argv)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # as harness.cli does before any CUDA work
    if args.compare:
        one, two = (json.loads(Path(p).read_text()) for p in args.compare)
        print(f"A1 of {args.compare[0]} vs A1 of {args.compare[1]} (two processes): {_same(one['A1'], two['A1'])}")
        return 0
    result = measure(args.task, args.overrides, args.train_steps,
                     args.sdpa.split(",") if args.sdpa else None)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("\n".join(summary(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
