"""The CI regression gate: is a candidate adapter still as good as the accepted baseline?

`harness check` scores a candidate adapter on the task's held-out split (or a seeded subset of
it, `gate.subset`, so a CPU-only CI can afford it) and compares it with a baseline on the same
examples and the same bootstrap draws. Every rule in `spec.gate` becomes a `CheckResult`
(harness/scoring/gate_rules.py); the verdict is written as verdict.json, verdict.md and junit.xml
(rendered by harness/reporting/verdict.py).

The gate fails closed. Anything that makes the comparison meaningless (another task, split,
tokenizer or base model, a NaN, an unreadable adapter or baseline) raises `CannotJudge`
(exit 2) and is never a pass. Outputs already computed are reused only when their
fingerprints show they come from the same computation: a baseline file's predictions, or a
run folder's scores/. The folder of a one-candidate `eval` (or `candidates/<name>/` of a larger
one) is read like a run's; a merged model's scores are reused but never re-scored here.
Under several processes (harness.distributed) an adapter is scored in shards that every process
then holds in full, so all judge alike; rank 0 writes the verdict.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from harness import devices, distributed, fingerprint, models
from harness.data.prepared import Example, read_prepared
from harness.data.prompts import encode_example, fit_prompts
from harness.data.records import prepare
from harness.errors import CannotJudge, HarnessError, RunError
from harness.io import atomic_write_json, atomic_write_text
from harness.models import base_files
from harness.reporting.verdict import render_junit, render_markdown
from harness.runfolder import ADAPTER_DIR, CANDIDATES_DIR, load_run_spec, read_manifest
from harness.scoring.gate_rules import evaluate
from harness.scoring.heldout_scoring import (assert_adapter_applied, generate_sharded, guards, metric_settings,
                                             read_generations, reference_nll_sharded)
from harness.scoring.metrics import (METRICS, MetricSettings, ModelOutputs, per_example_scores, score_single,
                                     settings_record)
from harness.spec import TaskSpec, load_spec

log = logging.getLogger(__name__)

BASELINE_FORMAT = 1
EXIT_CODES = {"pass": 0, "regression": 1, "cannot_judge": 2}
# Outputs are comparable (and reusable) only when all of these match.
SAME_COMPUTATION = {
    "base_model": "another base model",
    "tokenizer": "another tokenizer or chat template",
    "heldout_split": "another held-out split (data file or data.* settings)",
    "prompt": "other prompt settings",
    "generation": "other generation settings",
}


@dataclass
class Side:
    """One adapter's outputs on the evaluated examples, and where they came from."""

    outputs: ModelOutputs
    generations: list[dict]  # per example: text, n_tokens (generated), hit_max_new_tokens
    adapter: str  # adapter fingerprint
    source: str
    device: str  # cpu (fp32) or cuda (bf16): greedy decoding differs slightly between them


@dataclass
class Context:
    """What is evaluated, shared by candidate and baseline."""

    spec: TaskSpec
    examples: list[Example]  # the evaluated held-out examples (a subset when gate.subset is set)
    heldout_size: int
    model_ref: str
    tokenizer: object
    device: devices.Device
    settings: MetricSettings
    prints: dict[str, str]
    warnings: list[str] = field(default_factory=list)
    base_probe: dict = field(default_factory=dict)  # base_files.check_base_probe's record, and the prompt used


# -- what is evaluated -------------------------------------------------------------------------
def select_subset(examples: list, size: int | None, seed: int) -> list:
    """A seeded fixed-size subset in split order (all examples when `size` is None or larger)."""
    if size is None or size >= len(examples):
        return list(examples)
    keep = np.random.default_rng(seed).choice(len(examples), size=size, replace=False)
    return [examples[i] for i in sorted(keep)]


def build_context(task: str, overrides: list[str]) -> Context:
    spec = load_spec(task, overrides)  # validates gate.rules, margins and subset
    prompt = models.resolve_prompt_template(spec)  # as `run` recorded it for the baseline
    heldout = prepare(spec).heldout
    if not heldout:
        raise CannotJudge(f"{spec.name}: the held-out split is empty; nothing to judge on")
    examples = select_subset(heldout, spec.gate.subset, spec.gate.subset_seed)
    model_ref = base_files.resolve_base(spec.model.base)
    probe = base_files.check_base_probe(spec.model, model_ref)  # no verdict from a broken base model
    tokenizer = models.load_tokenizer(model_ref, spec.model, uses_chat_template=spec.prompt.template is None)
    settings = metric_settings(spec)
    prints = {"base_model": fingerprint.model_fingerprint(model_ref),
              "tokenizer": fingerprint.tokenizer_fingerprint(tokenizer),
              "heldout_split": fingerprint.split_fingerprint(heldout),
              "evaluated_split": fingerprint.split_fingerprint(examples),
              **fingerprint.settings_fingerprints(spec, settings_record(settings),
                                                  _cut_prompts(spec, tokenizer, heldout))}
    return Context(spec, examples, len(heldout), model_ref, tokenizer, devices.pick_device(), settings, prints,
                   base_probe={**probe, "prompt_template": prompt})


def _cut_prompts(spec, tokenizer, heldout: list) -> list[str]:
    """The held-out prompts cut to fit train.max_length, as the run's scoring fingerprinted them."""
    return [f.text for f in fit_prompts(tokenizer, spec.prompt, [e.title for e in heldout], spec.train.max_length)
            if f.truncated]


def _side(ctx: Context, gens: list[dict], nll, counts, adapter: str, source: str, device: str) -> Side:
    outputs = ModelOutputs([g["text"] for g in gens], [e.content for e in ctx.examples],
                           np.asarray(nll, dtype=float), np.asarray(counts))
    return Side(outputs, gens, adapter, source, device)


def _mismatch(where: Path, key: str) -> CannotJudge:
    return CannotJudge(f"{where}: fingerprints.{key} differs: scored with {SAME_COMPUTATION[key]}; "
                       "cannot compare (re-create the baseline with the current settings)")


def score_adapter(adapter_dir: Path, ctx: Context) -> Side:
    """Generate and score with an adapter on the evaluated examples (the same calls a run makes)."""
    log.info("scoring %s on %d examples (%s)", adapter_dir, len(ctx.examples), ctx.device.kind)
    model = models.load_model(ctx.model_ref, ctx.spec.model, ctx.tokenizer, ctx.device)
    try:
        model = models.load_adapter(model, adapter_dir, ctx.spec.model.allow_pickle)
    except HarnessError:
        raise
    except Exception as exc:  # e.g. a corrupt safetensors header
        raise CannotJudge(f"{adapter_dir}: unreadable adapter ({type(exc).__name__}: {exc})") from None
    prompts = [f.text for f in fit_prompts(ctx.tokenizer, ctx.spec.prompt, [e.title for e in ctx.examples],
                                           ctx.spec.train.max_length)]
    encoded = [encode_example(ctx.tokenizer, p, e.content, None) for p, e in zip(prompts, ctx.examples)]
    assert_adapter_applied(model, ctx.tokenizer, prompts[:4], ctx.device)
    results = generate_sharded(model, ctx.tokenizer, prompts, ctx.spec.generation, ctx.device)
    nll, counts = reference_nll_sharded(model, encoded, ctx.spec.generation.batch_size, ctx.device,
                                        ctx.tokenizer.pad_token_id)
    gens = [{"text": g.text, "n_tokens": g.n_tokens, "hit_max_new_tokens": g.hit_max_new_tokens} for g in results]
    return _side(ctx, gens, nll, counts, fingerprint.hash_folder(adapter_dir), f"scored {adapter_dir}",
                 ctx.device.kind)


def read_run_scores(run_dir: Path, ids: list[str]) -> tuple[list[dict], list, list] | None:
    """A run's tuned generations and reference NLLs for `ids`; None when they do not cover them."""
    scores = Path(run_dir) / "scores"
    try:
        rows = read_generations(scores / "tuned_generations.jsonl")
        nll = json.loads((scores / "tuned_nll.json").read_text(encoding="utf-8"))
        by_id = {i: (s, c) for i, s, c in zip(nll["ids"], nll["nll_sum"], nll["n_tokens"], strict=True)}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not all(i in rows and i in by_id for i in ids):
        return None
    return [rows[i] for i in ids], [by_id[i][0] for i in ids], [by_id[i][1] for i in ids]


def _device_kind(description: str | None) -> str:
    return (description or "unknown").split(":")[0].split(" ")[0]


def scored_weights(run_dir: Path, manifest: dict) -> tuple[Path, str]:
    """The folder a run folder's tuned scores come from, and its kind: a run's adapter/, or the one
    candidate an `eval` folder scored (an adapter folder, a run's adapter/ or a merged model)."""
    candidates = manifest.get("candidates")
    if candidates is None:
        return run_dir / ADAPTER_DIR, "adapter"
    if not isinstance(candidates, list) or len(candidates) != 1:
        names = ", ".join(str(run_dir / CANDIDATES_DIR / str(c.get("name"))) for c in candidates or [])
        raise CannotJudge(f"{run_dir}: an eval folder of {len(candidates or [])} candidates; name one: {names}")
    return Path(candidates[0]["weights"]), candidates[0]["kind"]


def from_run(run_dir: Path, ctx: Context) -> Side:
    """A run folder's tuned outputs: its scores/ when fingerprints prove them reusable, else its adapter/."""
    manifest = read_manifest(run_dir)
    if manifest.get("task") != ctx.spec.name:
        raise CannotJudge(f"{run_dir}: a run of task '{manifest.get('task')}', not '{ctx.spec.name}'")
    prints = manifest.get("fingerprints") or {}
    for key in ("base_model", "tokenizer"):  # the adapter itself belongs to that model
        if key in prints and prints[key] != ctx.prints[key]:
            raise _mismatch(run_dir / "manifest.json", key)
    adapter_dir, kind = scored_weights(run_dir, manifest)
    adapter = fingerprint.hash_folder(adapter_dir)
    if all(prints.get(k) == ctx.prints[k] for k in SAME_COMPUTATION) and prints.get("adapter") == adapter:
        cached = read_run_scores(run_dir, [e.id for e in ctx.examples])
        if cached is not None:
            log.info("%s: reusing its scores/ (fingerprints match)", run_dir)
            return _side(ctx, *cached, adapter, f"cached scores of {run_dir}", _device_kind(manifest.get("device")))
    if kind == "merged":
        raise CannotJudge(f"{run_dir}: its scores do not fit this evaluation (other split, settings or changed "
                          f"model) and the gate scores adapters only, not the merged model {adapter_dir}; "
                          "score it again with `harness eval` under these settings")
    log.info("%s: scores/ not reusable for this evaluation; scoring its adapter", run_dir)
    return score_adapter(adapter_dir, ctx)


def _nonfinite(obj, where: str = "") -> str | None:
    """Path of the first NaN/Infinity in parsed JSON (Python's json reads them as floats)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return where or "value"
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:
        found = _nonfinite(value, f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}".lstrip("."))
        if found:
            return found
    return None


def from_baseline_file(path: Path, ctx: Context) -> Side:
    """A committed baseline's predictions, reused as they are: it must match what is evaluated now."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CannotJudge(f"{path}: unreadable baseline file ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != BASELINE_FORMAT:
        raise CannotJudge(f"{path}: not a harness baseline file (expected format {BASELINE_FORMAT}; "
                          "write one with `harness baseline RUN --out FILE`)")
    bad = _nonfinite(doc)
    if bad:
        raise CannotJudge(f"{path}: {bad} is not a finite number")
    if doc.get("task") != ctx.spec.name:
        raise CannotJudge(f"{path}: a baseline of task '{doc.get('task')}', not '{ctx.spec.name}'")
    prints = doc.get("fingerprints")
    if not isinstance(prints, dict):
        raise CannotJudge(f"{path}: fingerprints missing")
    for key in SAME_COMPUTATION:
        if key not in prints:
            raise CannotJudge(f"{path}: fingerprints.{key} missing")
        if prints[key] != ctx.prints[key]:
            raise _mismatch(path, key)
    if prints.get("metrics") != ctx.prints["metrics"]:
        ctx.warnings.append(f"{path}: metric settings differ from the baseline's; both sides are re-scored "
                            "with the current settings from their predictions")
    try:
        rows = {r["id"]: r for r in doc["examples"]}
        picked = [rows[e.id] for e in ctx.examples]
        gens = [{"text": r["prediction"], "n_tokens": r["generated_tokens"],
                 "hit_max_new_tokens": r["hit_max_new_tokens"]} for r in picked]
        nll, counts = [r["nll_sum"] for r in picked], [r["n_tokens"] for r in picked]
    except (KeyError, TypeError) as exc:
        raise CannotJudge(f"{path}: examples: missing or malformed key {exc}") from None
    return _side(ctx, gens, nll, counts, str(prints.get("adapter", "")), f"baseline file {path}",
                 str(doc.get("device", "unknown")))


def load_side(path: Path, ctx: Context, label: str) -> Side:
    """An adapter folder, a run folder, or (for the baseline only) a baseline file."""
    path = Path(path)
    if path.is_file() and label == "baseline":
        return from_baseline_file(path, ctx)
    if (path / "adapter_config.json").is_file():
        return score_adapter(path, ctx)
    if (path / "manifest.json").is_file():
        return from_run(path, ctx)
    kinds = "a baseline file, a run folder or an adapter folder" if label == "baseline" else \
        "a run folder or an adapter folder"
    what = "does not exist" if not path.exists() else f"is not {kinds}"
    raise CannotJudge(f"--{label} {path}: {what}")


# -- the verdict -------------------------------------------------------------------------------
def judge(record: dict, task: str, candidate: Path, baseline: Path, overrides: list[str]) -> dict:
    """Fill `record` (the verdict.json object) step by step, so a failure still says how far it got."""
    ctx = build_context(task, overrides)
    record.update(task=ctx.spec.name, n=len(ctx.examples), heldout_size=ctx.heldout_size,
                  subset={"size": ctx.spec.gate.subset, "seed": ctx.spec.gate.subset_seed},
                  fingerprints=dict(ctx.prints), base_probe=ctx.base_probe)
    base = load_side(baseline, ctx, "baseline")  # first: a mismatched baseline fails before any scoring
    cand = load_side(candidate, ctx, "candidate")
    record["fingerprints"].update(baseline_adapter=base.adapter, candidate_adapter=cand.adapter)
    record["sources"] = {"baseline": base.source, "candidate": cand.source}
    if base.device != cand.device:
        ctx.warnings.append(f"baseline outputs come from {base.device}, candidate outputs from {cand.device}: "
                            "bf16 and fp32 decode slightly differently")
    shares = guards(cand.outputs.predictions, cand.outputs.references, [e.title for e in ctx.examples],
                    cand.generations, ctx.spec.prompt.instruction)
    results, power, metrics = evaluate(ctx.spec.gate, base.outputs, cand.outputs, shares, ctx.settings)
    verdict = "pass" if all(r.passed for r in results) else "regression"
    failed = [r.name for r in results if not r.passed]
    reason = f"failed: {', '.join(failed)}" if failed else f"all {len(results)} rules passed"
    if power:
        reason += " (underpowered: see warnings)"
    record.update(verdict=verdict, exit_code=EXIT_CODES[verdict], reason=reason,
                  rules=[asdict(r) for r in results], warnings=power + ctx.warnings, metrics=metrics)
    return record


def write_outputs(record: dict, out_dir: Path) -> None:
    if not distributed.is_main():  # every process judged the same outputs; one writes the verdict
        return
    out_dir = Path(out_dir)
    markdown = render_markdown(record)
    atomic_write_json(out_dir / "verdict.json", record)
    atomic_write_text(out_dir / "verdict.md", markdown)
    atomic_write_text(out_dir / "junit.xml", render_junit(record))
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        try:
            with open(summary, "a", encoding="utf-8") as fh:
                fh.write(markdown + "\n")
        except OSError as exc:  # the verdict files are what counts; the summary is a courtesy
            log.warning("cannot append to $GITHUB_STEP_SUMMARY (%s): %s", summary, exc.strerror)


def run_check(task: str, candidate: Path, baseline: Path, out_dir: Path, overrides: list[str]) -> int:
    """`harness check`: 0 pass, 1 regression, 2 cannot judge (raised as a HarnessError)."""
    record = {"task": task, "verdict": "cannot_judge", "exit_code": 2, "reason": "", "rules": [], "warnings": [],
              "n": None, "fingerprints": {}, "candidate": str(candidate), "baseline": str(baseline)}
    try:
        judge(record, task, Path(candidate), Path(baseline), overrides)
    except Exception as exc:
        record.update(verdict="cannot_judge", rules=[], reason=str(exc) or type(exc).__name__,
                      exit_code=exc.exit_code if isinstance(exc, HarnessError) else 3)
        try:
            write_outputs(record, out_dir)
        except Exception as write_exc:  # keep the original error; it is the one to report
            log.warning("could not write the cannot-judge verdict: %s", write_exc)
        raise
    write_outputs(record, out_dir)
    if not distributed.is_main():
        return record["exit_code"]
    for r in record["rules"]:
        print(f"{'PASS' if r['passed'] else 'FAIL'}  {r['name']}: {r['reason']}")
    for w in record["warnings"]:
        print(f"warning: {w}")
    print(f"verdict: {record['verdict']} (exit {record['exit_code']}); {Path(out_dir) / 'verdict.md'}")
    return record["exit_code"]


# -- baseline files ----------------------------------------------------------------------------
def write_baseline(run_dir: Path, out: Path) -> Path:
    """Freeze a finished run's tuned outputs as a committed baseline (atomic write).

    Predictions and reference NLLs are stored per example so `check` never regenerates them;
    fingerprints say exactly which model, tokenizer, split and settings they belong to.
    """
    run_dir, out = Path(run_dir), Path(out)
    manifest = read_manifest(run_dir)
    if manifest.get("status") != "completed":
        raise RunError(f"{run_dir}: run status is '{manifest.get('status')}'; only a completed run can be a baseline")
    spec = load_run_spec(run_dir)
    heldout = read_prepared(run_dir / "data").heldout
    prints = manifest.get("fingerprints") or {}
    for key in (*SAME_COMPUTATION, "metrics", "adapter"):
        if key not in prints:
            raise RunError(f"{run_dir / 'manifest.json'}: fingerprints.{key} missing")
    if prints["heldout_split"] != fingerprint.split_fingerprint(heldout):
        raise RunError(f"{run_dir / 'data'}: held-out split changed since the run scored it")
    adapter_dir, _kind = scored_weights(run_dir, manifest)
    if prints["adapter"] != fingerprint.hash_folder(adapter_dir):
        raise RunError(f"{adapter_dir}: adapter changed since the run scored it")
    scored = read_run_scores(run_dir, [e.id for e in heldout])
    if scored is None:
        raise RunError(f"{run_dir / 'scores'}: tuned scores missing or do not cover the held-out split")
    gens, nll, counts = scored
    outputs = ModelOutputs([g["text"] for g in gens], [e.content for e in heldout], np.asarray(nll, dtype=float),
                           np.asarray(counts))
    settings = metric_settings(spec)
    per_example = per_example_scores(outputs, settings)
    doc = {
        "format": BASELINE_FORMAT, "task": spec.name, "source_run": run_dir.name,
        "device": _device_kind(manifest.get("device")), "n": len(heldout),
        "metrics": score_single(outputs, settings),
        "fingerprints": {k: prints[k] for k in (*SAME_COMPUTATION, "metrics", "adapter")},
        "examples": [{"id": e.id, "prediction": g["text"], "nll_sum": float(s), "n_tokens": int(c),
                      "generated_tokens": int(g["n_tokens"]), "hit_max_new_tokens": bool(g["hit_max_new_tokens"]),
                      "scores": {m: float(per_example[m][i]) for m in METRICS}}
                     for i, (e, g, s, c) in enumerate(zip(heldout, gens, nll, counts))],
    }
    atomic_write_json(out, doc)
    return out
