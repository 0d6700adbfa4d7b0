"""LoRA's up-projection, scaling and residual add as one GEMM while training (`train.fused_lora`).

PEFT computes a LoRA layer as `result + lora_B(lora_A(dropout(x))) * scaling`: after the rank-r
up-projection, a multiply and an add each read and write a whole [tokens, out_features] activation
(and the multiply again in the backward pass). On the TinyLlama-1.1B architecture those elementwise
kernels were a fifth of a training step's GPU time (bench/profile_train.py: `add` 13.8%, `mul` 7.1%).
cuBLAS does both in the GEMM's epilogue: `addmm(result, h, B^T, alpha=scaling)` accumulates
`result + scaling * h @ B^T` in fp32 and rounds once, so the two kernels (and their launches, which
bound a small model's step) are gone and the sum is no less precise than PEFT's.

It plugs into PEFT's own extension point for LoRA variants (a layer's `lora_variant` entry, which
its forward calls instead of the vanilla branch) and only for the span of a training run: merging,
saving and scoring see plain PEFT layers (scoring a run's adapter in memory must give what loading
it from disk gives).
"""

from __future__ import annotations

from contextlib import contextmanager

from harness.errors import HarnessError


class FusedAddVariant:
    """A PEFT LoRA variant that is vanilla LoRA, with B, scaling and the add in one addmm."""

    @staticmethod
    def forward(module, active_adapter: str, x, result, **kwargs):
        import torch

        lora_a, lora_b = module.lora_A[active_adapter], module.lora_B[active_adapter]
        hidden = lora_a(module.lora_dropout[active_adapter](x))
        flat = result.reshape(-1, result.shape[-1])
        # Under autocast addmm runs in the compute dtype, as PEFT's Linear calls would.
        fused = torch.addmm(flat, hidden.reshape(-1, hidden.shape[-1]), lora_b.weight.t(),
                            alpha=module.scaling[active_adapter])
        return fused.view(result.shape)

    @staticmethod
    def _training_only(*args, **kwargs):
        raise HarnessError("train.fused_lora: merging a LoRA layer while its fused training path is on; "
                           "merge after training")

    init = merge_safe = merge_unsafe = unmerge = _training_only


def fusable_layers(model) -> list:
    """The plain LoRA Linear layers (not quantized, DoRA, or another variant) the fusion applies to."""
    from peft.tuners.lora.layer import Linear

    return [m for m in model.modules() if type(m) is Linear and not m.merged and not m.fan_in_fan_out
            and not any(m.lora_variant.values()) and not any(getattr(m, "lora_bias", {}).values())]


@contextmanager
def fused_lora_add(model, enabled: bool = True):
    """Train `model`'s LoRA layers through FusedAddVariant inside the block; plain PEFT after it."""
    layers = fusable_layers(model) if enabled else []
    added = []
    try:
        for layer in layers:
            for name in layer.lora_A:
                layer.lora_variant[name] = FusedAddVariant()
                added.append((layer, name))
        yield len(layers)
    finally:
        for layer, name in added:
            layer.lora_variant.pop(name, None)
