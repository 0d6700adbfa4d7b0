"""Fingerprints: sha256 of everything that determines a score.

Two results are comparable (and a cached base score reusable) only when the model weights,
tokenizer and chat template, held-out split, prompt, generation and metric settings all
match. Each gets its own hash so a mismatch can be named.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "config.json", "adapter_config.json")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def hash_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


def hash_folder(folder: Path, patterns=WEIGHT_PATTERNS) -> str:
    """sha256 over (name, file sha256) of the weight and config files in a folder."""
    files = sorted({p for pattern in patterns for p in Path(folder).glob(pattern) if p.is_file()})
    return hash_json([[p.name, sha256_file(p)] for p in files])


def model_fingerprint(model_ref: str) -> str:
    """Local folders are hashed by content; a hub id only by name (its cache may change)."""
    path = Path(model_ref)
    return hash_folder(path) if path.is_dir() else hash_json({"hub_id": model_ref})


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    return hash_json({"vocab": vocab, "chat_template": tokenizer.chat_template,
                      "eos": tokenizer.eos_token, "pad": tokenizer.pad_token})


def split_fingerprint(examples) -> str:
    return hash_json([[e.id, e.title, e.content] for e in examples])


# Bumped when the same generation settings decode differently (v2: repetition penalties count the output
# only, harness.scoring.decoding.output_penalties; v3: scoring never runs cuDNN's attention kernel,
# harness.scoring.decoding.DETERMINISTIC_SDPA), so base scores cached by older code are not reused.
GENERATION_SEMANTICS = 3


def generation_record(gen) -> dict:
    """The generation settings a fingerprint covers: all of them, except MBR's keys while MBR is off
    (`mbr_samples` 0) and `min_new_tokens` while it is 0, where they change no output: a spec from before
    they existed keeps its fingerprint, and so its cached base scores."""
    from dataclasses import asdict

    record = asdict(gen)
    if not gen.mbr_samples:
        record = {k: v for k, v in record.items() if not k.startswith("mbr_")}
    if not gen.min_new_tokens:
        record.pop("min_new_tokens")
    return {**record, "semantics": GENERATION_SEMANTICS}


def settings_fingerprints(spec, metric_settings_record: dict, cut_prompts: list[str] = ()) -> dict[str, str]:
    """`cut_prompts`: the held-out prompts whose titles were cut to fit train.max_length
    (harness.data.prompts.fit_prompts), in split order. They join the prompt fingerprint only when there are
    any: a split whose prompts all fit keeps the fingerprint it had before titles could be cut."""
    from dataclasses import asdict

    generation = generation_record(spec.generation)
    prompt = asdict(spec.prompt)
    if cut_prompts:
        prompt["cut_prompts"] = list(cut_prompts)
    return {"prompt": hash_json(prompt), "generation": hash_json(generation),
            "metrics": hash_json(metric_settings_record)}
