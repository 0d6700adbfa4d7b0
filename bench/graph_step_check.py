"""Is the captured training step (train.cuda_graphs) the same training? Checked on the GPU.

Usage: python bench/graph_step_check.py MODEL [--batch 16] [--steps 30] [--set KEY=VALUE ...]

1. FlashAttention's varlen kernel with the boundary list padded by empty sequences (what the
   fixed-shape batch does) gives the same outputs and gradients as with the exact list.
2. The bench's harness recipe trains MODEL for --steps steps with LoRA dropout 0 and one seed:
   graphs off twice (the run-to-run band of GPU training, which is not bit-reproducible) and graphs
   on once. Prints each run's per-step loss, the largest loss gap to the first run and the largest
   LoRA-weight gap after the last step, and the mean step time after the first 5 steps.
"""
import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import devices, models  # noqa: E402
from harness.benchmarks import bench_train  # noqa: E402
from harness.models import base_files  # noqa: E402
from harness.spec import load_spec  # noqa: E402
from harness.models.attention import varlen_call  # noqa: E402
from harness.training.cuda_graph_step import GraphedTrainingStep  # noqa: E402
from harness.training.fused_lora import fused_lora_add  # noqa: E402
from harness.training.fast_paths import fast_path_options  # noqa: E402
from harness.training.tokenization import tokenized_dataset  # noqa: E402
from harness.training.train import build_trainer  # noqa: E402

WARM = 5


def empty_sequences_check() -> float:
    """Largest |difference| in outputs and input gradients, exact vs padded boundary list."""
    torch.manual_seed(0)
    lengths = [100, 37, 250, 1]
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    padded = torch.cat([cu, cu.new_full((6,), total)])
    q, k, v = (torch.randn(total, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    gaps = []
    results = []
    for boundaries in (cu, padded):
        for t in (q, k, v):
            t.grad = None
        out = varlen_call(q, k, v, boundaries, 256, None)
        out.float().square().sum().backward()
        results.append([out.detach().float(), *(t.grad.float() for t in (q, k, v))])
    for a, b in zip(*results):
        gaps.append((a - b).abs().max().item())
    return max(gaps)


class StepLog(TrainerCallback):
    def __init__(self):
        self.losses, self.times = {}, []

    def on_step_end(self, args, state, control, **kwargs):
        torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses[state.global_step] = float(logs["loss"])


def train_once(spec, tokenizer, data, device, batch: int, steps: int, graphs: str):
    spec = replace(spec, train=replace(spec.train, cuda_graphs=graphs))
    fast = fast_path_options(spec, device)
    model = models.load_model(base_files.resolve_base(spec.model.base), spec.model, tokenizer, device,
                              attn_implementation=fast["attention"])
    trainer = build_trainer(spec, model, tokenizer, data, None, Path(f"/tmp/graph-check-{graphs}"), device, fast=fast,
                            **{**bench_train.recipe_overrides("harness", batch, device), "max_steps": steps,
                               "logging_steps": 1})
    log = StepLog()
    trainer.add_callback(log)
    captured = isinstance(trainer.training_step, GraphedTrainingStep)  # what trains, not what the switch says
    with fused_lora_add(trainer.model, fast["fused_lora"]):
        trainer.train()
    weights = {n: p.detach().float().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    step_s = (log.times[-1] - log.times[WARM - 1]) / (len(log.times) - WARM)
    del trainer, model
    torch.cuda.empty_cache()
    return log.losses, weights, step_s, captured


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    print(f"1. varlen kernel, boundary list padded with empty sequences: largest gap {empty_sequences_check():.3g} "
          "(outputs and q/k/v gradients; 0 = identical)")
    spec = load_spec("amazon_desc", [f"model.base={args.model}", "train.max_length=512", "train.packing=on",
                                     "lora.dropout=0.0", *args.set])
    device = devices.pick_device()
    tokenizer = models.load_tokenizer(base_files.resolve_base(spec.model.base), spec.model, uses_chat_template=True)
    data = tokenized_dataset(spec, tokenizer, bench_train.bench_examples(spec, 4096))
    runs = {}
    for label, graphs in (("off", "off"), ("off again", "off"), ("on", "on")):
        runs[label] = train_once(spec, tokenizer, data, device, args.batch, args.steps, graphs)
        losses, _, step_s, captured = runs[label]
        print(f"graphs {label}: captured {captured}, {step_s:.4f} s a step after step {WARM}; "
              f"losses {[round(v, 4) for v in losses.values()]}")
    ref_losses, ref_weights, ref_s, _ = runs["off"]
    for label in ("off again", "on"):
        losses, weights, step_s, _ = runs[label]
        loss_gap = max(abs(losses[s] - ref_losses[s]) for s in ref_losses)
        weight_gap = max((weights[n] - ref_weights[n]).abs().max().item() for n in ref_weights)
        print(f"2. graphs {label} vs off: largest loss gap {loss_gap:.4g}, largest LoRA weight gap {weight_gap:.3g}, "
              f"step time ratio off/{label} = {ref_s / step_s:.2f}x")


if __name__ == "__main__":
    main()
