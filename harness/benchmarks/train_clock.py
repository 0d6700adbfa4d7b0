"""The clock and FLOP counting every training bench shares (harness' recipes in-process, Unsloth's in its own
process): tokens per optimizer step as the trainer sees them, steady-state time, peak memory and MFU.

Imports only the standard library and harness.errors at module level: bench_unsloth imports Unsloth
first, so that Unsloth can patch transformers and trl before anything else loads them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from harness.errors import HarnessError

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "T4": 65e12}


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


def peak_flops(device) -> float | None:
    import torch

    if device.kind != "cuda":
        return None
    name = torch.cuda.get_device_name(device.index)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def flops_per_token(model, mean_len: float) -> tuple[float, float]:
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


def peak_mem_gb(device) -> float:
    import torch

    return torch.cuda.max_memory_allocated(device.index) / 2**30 if device.kind == "cuda" else 0.0


def with_mfu(figures: dict, flops: tuple[float, float], device) -> dict:
    peak = peak_flops(device)
    tps = figures["tokens_per_s"]
    return {**figures, "mfu_palm": tps * flops[0] / peak if peak else None,
            "mfu_lora": tps * flops[1] / peak if peak else None}
