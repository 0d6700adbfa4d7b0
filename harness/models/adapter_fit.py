"""Does an adapter or a merged model fit this base model? Refused before anything is scored when it does not:
another base model named in its config, target modules the base lacks, tensors of the wrong shape, another
tokenizer or chat template (each named in one line).
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

from harness.errors import ModelError, first_line
from harness.models.base_files import check_safe_weights, embedded_model

# Packaging a model name may carry that does not change which model it is.
_PACKAGING = re.compile(r"(?:[-_.](?:bnb|4bit|8bit|unsloth|bf16|fp16|fp32|gguf|awq|gptq|hf))+$")


_PEFT_PREFIX = "base_model.model."


# Config values a model fine-tuned from the base (and merged) keeps.
MERGED_CONFIG_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                      "intermediate_size")


def candidate_weights(path: Path) -> tuple[str, Path]:
    """What `eval --adapter PATH` names: ("adapter", PATH), ("run", PATH/adapter) or ("merged", PATH)."""
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"{path}: {'not a folder' if path.exists() else 'no such folder'} (expected a PEFT "
                         "adapter, a run folder or a merged model folder)")
    if (path / "adapter_config.json").is_file():
        return "adapter", path
    if (path / "manifest.json").is_file():
        if not (path / "adapter" / "adapter_config.json").is_file():
            raise ModelError(f"{path}: a run folder without a trained adapter in adapter/")
        return "run", path / "adapter"
    if (path / "config.json").is_file():
        return "merged", path
    raise ModelError(f"{path}: not a PEFT adapter (adapter_config.json), a run folder (manifest.json) "
                     "or a merged model folder (config.json)")


def model_name_key(name: str) -> str:
    """A model's name without owner, folder or packaging: 'unsloth/Mistral-7B-v0.3-bnb-4bit' -> 'mistral-7b-v0.3'."""
    last = str(name).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
    return _PACKAGING.sub("", last.casefold())


def _same_model(claimed: str, name: str) -> bool:
    a, b = Path(claimed).expanduser(), Path(name).expanduser()
    if a.exists() and b.exists():
        return a.resolve() == b.resolve()
    return model_name_key(claimed) == model_name_key(name)


def _json_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelError(f"{path}: unreadable ({first_line(exc)})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return data


@functools.lru_cache(maxsize=4)
def _meta_modules(model_ref: str, trust_remote_code: bool) -> dict:
    """The base model's modules by name, built on the meta device from its config: no weights read."""
    import torch
    from transformers import AutoModelForCausalLM

    config = _config(model_ref, trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return dict(model.named_modules())


def _config(model_ref: str, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_ref, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read the model config of '{model_ref}': {first_line(exc)}") from None


def _missing_target(targets, modules: dict) -> str | None:
    """The first of an adapter's target_modules that names no module of the model (PEFT's matching)."""
    names = [n for n in modules if n]
    if isinstance(targets, str):
        if targets == "all-linear" or any(re.fullmatch(targets, n) for n in names):
            return None
        return targets
    for target in targets or []:
        if not any(n == target or n.endswith(f".{target}") for n in names):
            return target
    return None


def _io_features(module) -> tuple[int, int] | None:
    """(in, out) of a layer LoRA can wrap: Linear, Embedding, GPT-2's Conv1D; None for others."""
    for a, b in (("in_features", "out_features"), ("num_embeddings", "embedding_dim"), ("nx", "nf")):
        if isinstance(getattr(module, a, None), int) and isinstance(getattr(module, b, None), int):
            return getattr(module, a), getattr(module, b)
    return None


def _tensor_misfit(key: str, shape: tuple[int, ...], modules: dict) -> str | None:
    """Why an adapter tensor cannot sit on the model's module, or None when it fits.

    LoRA A is (r, in) and B (out, r) (embedding A/B likewise); DoRA's magnitude is (out,);
    a modules_to_save tensor is a full copy of the module's parameter. Other PEFT tensors (e.g.
    trainable-token deltas under `embed_tokens.token_adapter`) only need their layer to exist."""
    name = key.removeprefix(_PEFT_PREFIX)
    owner, lora, leaf = name.partition(".lora_")
    if not lora:
        owner, _, param = name.rpartition(".")
        layer = owner
        while layer and layer not in modules:
            layer = layer.rpartition(".")[0]
        if layer != owner:
            return None if layer else f"tensor {key}: the base model has no module '{owner}'"
    module = modules.get(owner)
    if module is None:
        return f"tensor {key}: the base model has no module '{owner}'"
    if not lora:
        expected = dict(module.named_parameters(recurse=False)).get(param)
        if expected is None or tuple(expected.shape) != tuple(shape):
            want = "no such parameter" if expected is None else f"{list(expected.shape)} in the base model"
            return f"tensor {key} has shape {list(shape)}, {want}"
        return None
    features = _io_features(module)
    if features is None:
        return None  # a layer type without a rule here; PEFT's loader still checks it
    takes_input = leaf.startswith(("A", "embedding_A"))
    got, want = (shape[1], features[0]) if takes_input and len(shape) > 1 else (shape[0], features[1])
    if got != want:
        return (f"tensor {key} has shape {list(shape)}, but {owner} maps {features[0]} -> {features[1]} "
                "features in the base model")
    return None


def adapter_tensor_shapes(adapter_dir: Path, allow_pickle: bool) -> dict[str, tuple[int, ...]]:
    """Every adapter tensor's shape, read from the safetensors header (no weights loaded)."""
    from safetensors import SafetensorError, safe_open

    safe = adapter_dir / "adapter_model.safetensors"
    if safe.is_file():
        try:
            with safe_open(str(safe), "pt") as fh:
                return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
        except (OSError, SafetensorError) as exc:
            raise ModelError(f"{safe}: unreadable safetensors file ({first_line(exc)})") from None
    pickled = adapter_dir / "adapter_model.bin"
    if allow_pickle and pickled.is_file():
        import torch

        return {k: tuple(v.shape) for k, v in torch.load(pickled, map_location="cpu", weights_only=True).items()}
    raise ModelError(f"{adapter_dir}: no adapter_model.safetensors")


def check_adapter_fits(adapter_dir: Path, model_ref: str, spec_model) -> None:
    """Fail before any work when a PEFT adapter cannot belong to the spec's base model: it names
    another base model, targets modules the model lacks, or has tensors of other shapes."""
    adapter_dir = Path(adapter_dir)
    check_safe_weights(adapter_dir, spec_model.allow_pickle, "adapter")
    config = _json_object(adapter_dir / "adapter_config.json")
    claimed = config.get("base_model_name_or_path")
    # An embedded model's public id is one of its names: its adapters name it (not this machine's cache).
    public = [e.hub_id] if (e := embedded_model(spec_model.base)) else []
    if claimed and not any(_same_model(str(claimed), n) for n in (spec_model.base, model_ref,
                                                                   *spec_model.base_aliases, *public)):
        raise ModelError(f"{adapter_dir}: adapter_config.json names base model '{claimed}', not the spec's "
                         f"model.base '{spec_model.base}' (if it is the same model under another name, "
                         "add that name to model.base_aliases)")
    modules = _meta_modules(model_ref, spec_model.trust_remote_code)
    missing = _missing_target(config.get("target_modules"), modules)
    if missing:
        raise ModelError(f"{adapter_dir}: target module '{missing}' (adapter_config.json target_modules) "
                         f"is not in the base model '{spec_model.base}'")
    for key, shape in adapter_tensor_shapes(adapter_dir, spec_model.allow_pickle).items():
        misfit = _tensor_misfit(key, shape, modules)
        if misfit:
            raise ModelError(f"{adapter_dir}: {misfit}; the adapter does not fit the base model '{spec_model.base}'")


def check_merged_fits(model_dir: Path, model_ref: str, spec_model) -> None:
    """Fail before any work when a merged model cannot be a fine-tune of the base (other architecture/size)."""
    check_safe_weights(Path(model_dir), spec_model.allow_pickle, "merged model")
    base = _config(model_ref, spec_model.trust_remote_code)
    merged = _config(str(model_dir), spec_model.trust_remote_code)
    base, merged = (c.get_text_config() if hasattr(c, "get_text_config") else c for c in (base, merged))
    for key in MERGED_CONFIG_KEYS:
        if getattr(base, key, None) != getattr(merged, key, None):
            raise ModelError(f"{model_dir}: a merged model with {key} {getattr(merged, key, None)}, but the base "
                             f"model '{spec_model.base}' has {getattr(base, key, None)}; it is no fine-tune of it")


def tokenizer_differences(saved, base, uses_chat_template: bool) -> list[str]:
    """What differs between two tokenizers: the vocabulary, and the chat template when prompts use it."""
    out = []
    a, b = saved.get_vocab(), base.get_vocab()
    if a != b:
        differ = sum(1 for token, i in a.items() if b.get(token) != i) + len(b.keys() - a.keys())
        out.append(f"vocabulary ({len(a)} vs {len(b)} tokens, {differ} differ)")
    if uses_chat_template and (saved.chat_template or None) != (base.chat_template or None):
        out.append("chat template")
    return out
