"""Where a harness training step spends its time: torch.profiler over optimizer steps 4-6 of the
bench's harness recipe (pre-tokenized, packed, the fast path), on the GPU.

Usage: python bench/profile_train.py MODEL [BATCH] [--random-tinyllama] [--set KEY=VALUE ...]

MODEL is a model reference (`embedded:smollm2-135m-instruct`, a folder) trained with its weights;
with --random-tinyllama only its tokenizer is used, on the random TinyLlama-1.1B architecture.
Prints the wall time of a step next to the GPU's busy time in it (a step far longer than its
kernels is launch- or host-bound), then the top operators by GPU time and by host (CPU) time.
"""
import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import devices, models  # noqa: E402
from harness.benchmarks import bench_train  # noqa: E402
from harness.models import base_files  # noqa: E402
from harness.spec import load_spec  # noqa: E402
from harness.training.fused_lora import fused_lora_add  # noqa: E402
from harness.training.fast_paths import fast_path_options  # noqa: E402
from harness.training.tokenization import tokenized_dataset  # noqa: E402
from harness.training.train import build_trainer  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("model")
parser.add_argument("batch", nargs="?", type=int, default=32)
parser.add_argument("--random-tinyllama", action="store_true")
parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
args = parser.parse_args()
spec = load_spec("amazon_desc", [f"model.base={args.model}", "train.max_length=512", "train.packing=on", *args.set])
device = devices.pick_device()
folder = base_files.resolve_base(spec.model.base)
tokenizer = models.load_tokenizer(folder, spec.model, uses_chat_template=True)
fast = fast_path_options(spec, device)
if args.random_tinyllama:
    model = bench_train.random_model_factory(bench_train.TINYLLAMA_1B, tokenizer, device)(fast["attention"])
else:
    model = models.load_model(folder, spec.model, tokenizer, device, attn_implementation=fast["attention"])
data = tokenized_dataset(spec, tokenizer, bench_train.bench_examples(spec, 4096))
trainer = build_trainer(spec, model, tokenizer, data, None, Path("/tmp/profile-train"), device, fast=fast,
                        **{**bench_train.recipe_overrides("harness", args.batch, device), "max_steps": 6})
activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.kind == "cuda" else [])
prof = torch.profiler.profile(activities=activities)
wall = {}
sync = torch.cuda.synchronize if device.kind == "cuda" else (lambda: None)


class Profile(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        sync()
        if state.global_step == 3:
            prof.start()
            wall["start"] = time.perf_counter()
        if state.global_step == 6:
            sync()
            wall["s"] = time.perf_counter() - wall["start"]
            prof.stop()


trainer.add_callback(Profile())
with fused_lora_add(trainer.model, fast["fused_lora"]):
    trainer.train()
events = prof.key_averages()
# Kernels only: an operator row repeats the device time of the kernels it launched.
gpu_s = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA) / 1e6
print(f"{args.model} batch {args.batch}: wall {wall['s'] / 3:.3f} s a step (profiler on), GPU busy {gpu_s / 3:.3f} s a "
      f"step ({100 * gpu_s / wall['s']:.0f}%); fast path {fast}")
print(events.table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70))
print(events.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70))
