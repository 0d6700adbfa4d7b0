"""Which CUDA fast paths a training run takes: the `auto` switches of train.* resolved against the device, the
installed kernels and the base model's architecture, with one line of reason for each path left off (the
manifest's `fast_path_reasons`). Pure decisions: nothing here touches a model."""

from __future__ import annotations

import functools
from pathlib import Path

from harness import distributed
from harness.devices import Device
from harness.errors import HarnessError
from harness.spec import TaskSpec


def fast_path_options(spec: TaskSpec, device: Device, reasons: dict | None = None) -> dict:
    """Resolve the `auto` switches: the fast paths are for CUDA; CPU keeps the plain path. `reasons`, when
    given, receives one line for each fast path that is off saying why (the manifest's `fast_path_reasons`):
    where a fast path would compute something else than the model itself does (harness.models.attention
    .unsupported, a model type Liger has no kernels for), `auto` leaves it off and a forced `on` fails here."""
    from harness.models.attention import unsupported, varlen_available

    cuda = device.kind == "cuda"
    t = spec.train
    why = reasons if reasons is not None else {}
    config = functools.cache(lambda: base_config(spec))  # read once, and only where a decision needs it
    packing = t.packing == "on" or (t.packing == "auto" and cuda)
    if t.attention == "varlen" and not (cuda and varlen_available()):
        raise HarnessError("train.attention: 'varlen' needs a CUDA device and PyTorch >= 2.10; use 'auto'")
    if t.attention == "varlen" and unsupported(config()):
        raise HarnessError(f"train.attention: 'varlen' cannot run this model: {unsupported(config())}; use 'auto'")
    if t.quantization == "nf4" and not (cuda and _has_bitsandbytes()):
        raise HarnessError("train.quantization: 'nf4' needs a CUDA device and bitsandbytes "
                           "(pip install -e '.[cuda]'); use 'auto'")
    if t.liger_kernels == "on" and not (cuda and _has_liger()):
        raise HarnessError("train.liger_kernels: 'on' needs a CUDA device and liger-kernel "
                           "(pip install -e '.[cuda]'); use 'auto'")
    if t.liger_kernels == "on" and liger_missing(config()):
        raise HarnessError(f"train.liger_kernels: 'on': {liger_missing(config())}; use 'auto'")
    if t.compile == "on" and not cuda:
        raise HarnessError("train.compile: 'on' needs a CUDA device; use 'off'")
    if t.compile == "on" and t.liger_kernels == "on":
        raise HarnessError("train.compile: 'on' cannot compile Liger's kernels (train.liger_kernels: 'on'); "
                           "set liger_kernels to 'auto'")
    no_cuda = ("no CUDA device", lambda: cuda)
    fast = {
        # QLoRA saves memory at a speed cost: `auto` uses it on CUDA only for models too big to train
        # comfortably in bf16 (> 4 GB of weights, i.e. >= ~2B parameters).
        "quantize": t.quantization == "nf4" or (t.quantization == "auto" and _met("quantize", why, [
            no_cuda, ("bitsandbytes is not installed", _has_bitsandbytes),
            ("the bf16 weights are 4 GB or less (QLoRA only saves memory, at a speed cost)",
             lambda: weight_bytes(spec.model.base) > 4e9)])),
        "packing": packing,
        # trl 1.16 already computes the loss through a chunked LM head (no full-vocabulary logits);
        # Liger adds fused RMSNorm/SwiGLU/RoPE kernels (its own fused loss is off under trl). Compiled
        # layers get the same fusions from the compiler, so `auto` leaves Liger out of them.
        "liger_kernels": t.liger_kernels == "on" or (t.liger_kernels == "auto" and _met("liger_kernels", why, [
            no_cuda, ("liger-kernel is not installed", _has_liger),
            ("train.compile is on (the compiler fuses the same operations)", lambda: t.compile == "off"),
            (lambda: liger_missing(config()), lambda: not liger_missing(config()))])),
        # A packed batch is one long row: sdpa computes a dense (L x L) masked attention over it,
        # FlashAttention's varlen kernel attends within each example (harness.models.attention).
        "attention": t.attention if t.attention != "auto" else
        "varlen" if _met("attention", why, [
            no_cuda, ("packing is off (the kernel attends within packed examples)", lambda: packing),
            ("this PyTorch has no varlen attention kernel (PyTorch >= 2.10)", varlen_available),
            (lambda: unsupported(config()), lambda: not unsupported(config()))]) else "sdpa",
        # A small model's step is bound by kernel launches (torch.profiler on an H100: ~7,600 kernels
        # and 58 ms of GPU work in a 475 ms SmolLM2 step at batch 16): "on" compiles each decoder layer
        # into fewer, fused kernels (1.2-1.3x on SmolLM2, 1.1x on a 1.1B; its loss curve within the
        # seed-noise band of eager's in bench/RESULTS.md's fourth session; once cuda_graphs removes the
        # launches, 1.04x on SmolLM2, fifth session). Opt-in,
        # since compiling costs 20-70 s a job, which a short run does not win back; and LoRA dropout
        # draws other masks under it (inductor's generator: like another seed).
        "compile": t.compile,
        # LoRA's up-projection, scaling and add in one GEMM while training (harness.training.fused_lora):
        # the same function, fewer kernels; `auto` keeps CPU runs on PEFT's own arithmetic.
        "fused_lora": t.fused_lora == "on" or (t.fused_lora == "auto" and _met("fused_lora", why, [no_cuda])),
    }
    if not packing:
        why["packing"] = "train.packing is off" if t.packing == "off" else "no CUDA device"
    if t.attention not in ("auto", "varlen"):
        why["attention"] = f"train.attention is {t.attention}"
    if t.compile == "off":
        why["compile"] = "train.compile is off (opt-in: compiling costs 20-70 s a job)"
    for name, key in (("quantize", "quantization"), ("liger_kernels", "liger_kernels"), ("fused_lora", "fused_lora")):
        if getattr(t, key) in ("off", "none"):
            why[name] = f"train.{key} is {getattr(t, key)}"
    # The training step's forward and backward replayed as one CUDA graph (harness.training.cuda_graph_step):
    # for a launch-bound step. `auto` keeps larger models, whose step is GPU-bound, off: there the graph only
    # costs (H100, bench/RESULTS.md fifth session: SmolLM2-135M 6.2x at batch 16; the 1.1B architecture at
    # batch 64 0.95x, its fixed shapes making trl's LM head score every position, not just labelled ones).
    blockers = graph_blockers(spec, fast, cuda)
    if t.cuda_graphs == "on" and blockers:
        because = f" (attention: {why['attention']})" if "varlen" in blockers[0] and "attention" in why else ""
        raise HarnessError(f"train.cuda_graphs: 'on' needs {blockers[0]}{because}; use 'auto'")
    fast["cuda_graphs"] = t.cuda_graphs == "on" or (t.cuda_graphs == "auto" and _met("cuda_graphs", why, [
        *((f"needs {need}", lambda: False) for need in blockers[:1]),
        ("the bf16 weights are 1 GB or more (a GPU-bound step: the graph only costs)",
         lambda: weight_bytes(spec.model.base) < GRAPHS_MAX_WEIGHT_BYTES)]))
    if t.cuda_graphs == "off":
        why["cuda_graphs"] = "train.cuda_graphs is off"
    return fast


def _met(name: str, reasons: dict, needs: list) -> bool:
    """Whether every (reason, check) in `needs` holds, checked in order and lazily; the first that fails
    puts its reason (a string, or a callable giving one) under `name` in `reasons`."""
    for reason, check in needs:
        if not check():
            reasons[name] = reason() if callable(reason) else reason
            return False
    return True


def base_config(spec: TaskSpec):
    """The base model's transformers config (its architecture decides which fast paths compute what the
    model computes)."""
    from transformers import AutoConfig

    from harness.models.base_files import resolve_base

    ref = resolve_base(spec.model.base)
    try:
        return AutoConfig.from_pretrained(ref, trust_remote_code=spec.model.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise HarnessError(f"model.base: cannot read the config of '{ref}': {str(exc).splitlines()[0]}") from None


def liger_missing(config) -> str | None:
    """Why Liger would not patch this model, or None. liger-kernel picks its kernels by `model_type`
    (monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN; Gemma 3 270M is `gemma3_text`) and only logs a line for a
    type it has none for, so an unsupported model would train unpatched while the manifest said Liger."""
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:  # not installed (_has_liger decides), or broken: the Trainer's own import then fails loudly
        return None
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return f"liger-kernel has no kernels for model type '{model_type}'"
    return None


GRAPHS_MAX_WEIGHT_BYTES = 1e9  # bf16 weights of a ~500M-parameter model: between the two measured sizes


def graph_blockers(spec: TaskSpec, fast: dict, cuda: bool) -> list[str]:
    """What keeps the training step from being captured as a CUDA graph (empty: nothing)."""
    t = spec.train
    needs = {
        "a CUDA device": cuda,
        "packing with the varlen attention kernel (fixed-shape packed batches)": fast["packing"]
        and fast["attention"] == "varlen",
        "train.grad_accum 1 (a captured backward overwrites gradients)": t.grad_accum == 1,
        "one process (DDP's gradient all-reduce is not captured)": distributed.world_size() == 1,
        "no nf4 quantization (bitsandbytes kernels are not checked under capture)": not fast["quantize"],
        "gradient_checkpointing off (its recompute re-seeds the generator)": not t.gradient_checkpointing,
    }
    return [need for need, met in needs.items() if not met]


def weight_bytes(model_ref: str) -> int:
    """Size of a model's weight files: safetensors, else pickled `.bin` ones (0 when it is not a local
    folder yet). Folders that ship both formats hold the same weights twice: one format is counted."""
    from harness.models.base_files import resolve_base

    folder = Path(resolve_base(model_ref))
    if not folder.is_dir():
        return 0
    files = list(folder.glob("*.safetensors")) or list(folder.glob("*.bin"))
    return sum(p.stat().st_size for p in files)


def _has_bitsandbytes() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def _has_liger() -> bool:
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None
