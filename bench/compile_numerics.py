"""Why `train.compile: on` moves the loss curve: LoRA training of the task's model, the same batches
in the same order, eager and with compiled decoder layers (inductor), in fp32 and in bf16, plus fp32
eager re-seeded (the noise band), and each run's largest |loss - fp32 eager loss| over the steps.

Liger is off and attention is sdpa in every run, so runs differ only in precision and compiling.
bf16 runs are harness' CUDA recipe (bf16 weights, autocast, LoRA inputs in bf16); on a CPU they
run the same way, slowly (SmolLM2-135M: about a minute a run for 10 steps of batch 4).

Usage: python bench/compile_numerics.py [STEPS] [BATCH] [--set KEY=VALUE ...]
    e.g. python bench/compile_numerics.py 10 4 --set lora.dropout=0 --set train.max_length=96   (CPU)
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import devices, models  # noqa: E402
from harness.benchmarks import bench_train  # noqa: E402
from harness.models import base_files  # noqa: E402
from harness.spec import load_spec  # noqa: E402
from harness.training.model_patches import compile_layers, lora_inputs_in_compute_dtype  # noqa: E402
from harness.training.tokenization import tokenized_dataset  # noqa: E402
from harness.training.train import build_trainer  # noqa: E402

args = sys.argv[1:]
overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
positional = [a for i, a in enumerate(args) if a != "--set" and (i == 0 or args[i - 1] != "--set")]
steps, batch = (int(positional[0]) if positional else 10), (int(positional[1]) if len(positional) > 1 else 4)
spec = load_spec("amazon_desc", ["train.max_length=512", "train.packing=on", "train.liger_kernels=off",
                                 "train.attention=sdpa", *overrides])
device = devices.pick_device()
folder = base_files.resolve_base(spec.model.base)
tokenizer = models.load_tokenizer(folder, spec.model, uses_chat_template=spec.prompt.template is None)
examples = steps * batch * max(1, spec.train.max_length // 64)  # enough to pack `steps` full batches
data = tokenized_dataset(spec, tokenizer, bench_train.bench_examples(spec, examples))
seed = spec.train.seed


def losses(bf16: bool, compiled: bool, train_seed: int) -> dict[int, float]:
    from transformers import AutoModelForCausalLM
    from transformers.trainer_callback import PrinterCallback

    torch._dynamo.reset()
    dtype = torch.bfloat16 if bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").to(device.torch_device)
    trainer = build_trainer(spec, model, tokenizer, data, None, Path("/tmp/compile-numerics"), device, max_steps=steps,
                            per_device_train_batch_size=batch, logging_steps=1, save_strategy="no", warmup_steps=0,
                            seed=train_seed, data_seed=seed, bf16=bf16, disable_tqdm=True)
    trainer.remove_callback(PrinterCallback)  # the table below is the output
    if bf16:
        lora_inputs_in_compute_dtype(trainer.model)
    if compiled:
        compile_layers(trainer.model)
    trainer.train()
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


runs = {"fp32 eager": losses(False, False, seed), f"fp32 eager, seed {seed + 1}": losses(False, False, seed + 1),
        "fp32 compiled": losses(False, True, seed), "bf16 eager": losses(True, False, seed),
        "bf16 compiled": losses(True, True, seed)}
reference = runs["fp32 eager"]
print(f"device {device.describe()}, lora.dropout {spec.lora.dropout}, {steps} steps of batch {batch}")
for name, run in runs.items():
    gap = max(abs(run[k] - reference[k]) for k in reference)
    print(f"{name:>22}: " + " ".join(f"{run[k]:.4f}" for k in sorted(run)) + f" | largest |loss - fp32| {gap:.4f}")
print(json.dumps(runs))
