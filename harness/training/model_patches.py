"""What training changes in the model for speed, and undoing it: compiled decoder layers, PEFT's input
casts turned off, and the modeling module that Liger patches module-wide restored afterwards."""

from __future__ import annotations

import sys
from contextlib import contextmanager

from harness.errors import HarnessError
from harness.models import transformers_model


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
