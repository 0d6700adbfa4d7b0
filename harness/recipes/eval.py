"""The `eval` recipe: score adapters made elsewhere (or merged models) against the base model.

No training. The data is prepared like `run` (a hash split of data.path, or the test file(s) of
data.heldout_path, checked for title leaks against data.path), every candidate is checked
against the base model before any work, the base model is scored once (from the base cache
when the fingerprints match) and each candidate with the same scorer, statistics and guards.

One candidate: the folder is exactly run-shaped (metrics.json base/tuned/delta), so `check`,
`report` and `baseline` read it like a run. Several: `candidates/<name>/` is a run-shaped folder
per candidate, and the top-level metrics.json adds the paired comparisons between candidates
(docs/results-schema.md).
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from harness import models
from harness.distributed import main_only
from harness.errors import HarnessError, ModelError
from harness.io import atomic_write_json, atomic_write_text
from harness.models import adapter_fit
from harness.recipes.run import (command_line, execute, load_base_tokenizer, prepare_stage, probe_base,
                                 record_long_prompts, record_prompt, report_stage, resolve_device, results_stage,
                                 stage, start_run, summary_line)
from harness.runfolder import ADAPTER_DIR, CANDIDATES_DIR, SPEC_FILE, Manifest, load_run_spec
from harness.scoring.metrics import paired_comparison
from harness.spec import TaskSpec

log = logging.getLogger(__name__)
BASE_SCORE_FILES = ("base_generations.jsonl", "base_nll.json")
SUMMARY_METRICS = ("rougeL", "bleu", "chrf", "perplexity")


@dataclass(frozen=True)
class Candidate:
    """One model to score: `given` is what --adapter named, `weights` the folder that is loaded."""

    name: str
    given: Path
    kind: str  # adapter (PEFT folder), run (a run folder's adapter/), merged (a full model folder)
    weights: Path

    def record(self, fingerprint: str | None = None) -> dict:
        out = {"name": self.name, "path": str(self.given.resolve()), "kind": self.kind,
               "weights": str(self.weights.resolve())}
        return {**out, "fingerprint": fingerprint} if fingerprint else out


def eval_task(task: str, adapters: list[Path], overrides: list[str], runs_root: Path = Path("runs")) -> Path:
    """`harness eval`: a new run folder scoring each adapter against the base; returns the folder."""
    if not adapters:
        raise HarnessError("eval: give at least one --adapter DIR")
    # Trained elsewhere, the adapters may have seen any of data.path: every training title counts in
    # the leak check, so data.max_train (a cap on what `run` trains on) does not apply here.
    command = command_line("eval", task, overrides, *(x for a in adapters for x in ("--adapter", str(a))))
    run_dir = _open_eval(task, [*overrides, "data.max_train=null"], runs_root, command)
    log.info("run folder: %s", run_dir)
    return execute(load_run_spec(run_dir), Manifest.load(run_dir),
                   stages=lambda s, m: _stages(s, m, [Path(a) for a in adapters]))


@main_only
def _open_eval(task: str, overrides: list[str], runs_root: Path, command: list[str]) -> Path:
    _spec, manifest = start_run(task, overrides, runs_root, command=command)
    manifest.update(recipe="eval")
    return manifest.run_dir


def _stages(spec: TaskSpec, manifest: Manifest, adapters: list[Path]) -> None:
    from harness.scoring.heldout_scoring import ScoringSession

    run_dir = manifest.run_dir
    device, _fast = resolve_device(spec, manifest)
    model_ref, tokenizer = load_base_tokenizer(spec)
    candidates = resolve_candidates(adapters)
    tokenizer = check_candidates(candidates, spec, model_ref, tokenizer)
    record_prompt(manifest, spec, tokenizer)
    manifest.update(candidates=[c.record() for c in candidates])
    probe_base(spec, manifest, model_ref)  # after the cheap checks of the candidates, before any scoring
    prepared = prepare_stage(spec, manifest)
    if not spec.data.heldout_path:
        log.warning("held-out examples are a hash split of data.path: the scores mean something only if the "
                    "adapters were not trained on them (data.heldout_path scores a test file instead)")
    session = ScoringSession(spec, tokenizer, prepared.heldout, run_dir, device, model_ref, manifest,
                             train=prepared.train)
    record_long_prompts(spec, manifest, session)
    with stage(manifest, "score_base"):
        session.score_base()
    if len(candidates) == 1:
        with stage(manifest, "score_tuned"):
            score_candidate(session, candidates[0])
        with stage(manifest, "metrics"):
            results_stage(session, run_dir)
        sessions = [session]
    else:
        sessions = []
        for candidate in candidates:
            with stage(manifest, f"score_{candidate.name}"):
                sessions.append(candidate_session(session, candidate))
        with stage(manifest, "metrics"):
            comparison_stage(session, candidates, sessions)
    manifest.update(candidates=[c.record(s.manifest.data["fingerprints"]["adapter"])
                                for c, s in zip(candidates, sessions)])
    report_stage(spec, manifest)


# -- candidates --------------------------------------------------------------------------------
def resolve_candidates(paths: list[Path]) -> list[Candidate]:
    """What each --adapter is (adapter_fit.candidate_weights), named after its folder, names made unique."""
    out: list[Candidate] = []
    for path in paths:
        kind, weights = adapter_fit.candidate_weights(path)
        if any(c.weights.resolve() == weights.resolve() for c in out):
            raise HarnessError(f"--adapter {path}: given twice")
        folder = path.resolve()
        stem = re.sub(r"[^A-Za-z0-9._-]+", "-", folder.parent.name if folder.name == ADAPTER_DIR else folder.name)
        name = stem.strip("-.") or "candidate"
        taken = {c.name for c in out}
        name = next(n for n in itertools.chain([name], (f"{name}-{i}" for i in itertools.count(2)))
                    if n not in taken)
        out.append(Candidate(name, path, kind, weights))
    return out


def check_candidates(candidates: list[Candidate], spec: TaskSpec, model_ref: str, tokenizer):
    """Every candidate against the base model, before any work (one-line ModelError on a misfit).

    A tokenizer saved next to a candidate must match the base's vocabulary (and chat template,
    when prompts use it); with `model.adapter_tokenizer: true` the saved one scores everything
    instead, base included, so all sides still see the same prompts. Returns the tokenizer to use."""
    chat = spec.prompt.template is None
    adopted = None
    for c in candidates:
        if c.kind == "merged":
            adapter_fit.check_merged_fits(c.weights, model_ref, spec.model)
        else:
            adapter_fit.check_adapter_fits(c.weights, model_ref, spec.model)
        saved = models.saved_tokenizer(c.weights, spec.model)
        if saved is None:
            continue
        differ = adapter_fit.tokenizer_differences(saved, tokenizer, chat)
        if differ and not spec.model.adapter_tokenizer:
            raise ModelError(f"{c.weights}: the tokenizer saved with it differs from the base model's in its "
                             f"{' and '.join(differ)}; set model.adapter_tokenizer: true to score with it")
        if spec.model.adapter_tokenizer:
            if adopted is not None and adapter_fit.tokenizer_differences(saved, adopted[1], chat):
                raise ModelError(f"{c.weights}: its tokenizer differs from the one saved with {adopted[0]}; "
                                 "score them in separate evals")
            adopted = (c.weights, saved)
    if adopted is None:
        return tokenizer
    log.info("scoring with the tokenizer saved with %s (model.adapter_tokenizer)", adopted[0])
    return models.load_tokenizer(str(adopted[0]), spec.model, uses_chat_template=chat)


def score_candidate(session, candidate: Candidate) -> None:
    if candidate.kind == "merged":
        session.score_merged(candidate.weights)
    else:
        session.score_tuned(candidate.weights)


def candidate_session(top, candidate: Candidate):
    """Score one of several candidates in its own run-shaped folder `candidates/<name>/`, with the
    eval's base scores copied in (one base model, scored once) and its data/ linked."""
    from harness.scoring.heldout_scoring import ScoringSession

    folder = top.run_dir / CANDIDATES_DIR / candidate.name
    _candidate_folder(top.run_dir, folder, top.scores_dir)
    shared = {k: v for k, v in top.manifest.data.items() if k not in ("stages_done", "timings_s", "candidates")}
    manifest = Manifest(folder, {**shared, "run_id": f"{shared['run_id']}/{candidate.name}",
                                 "candidates": [candidate.record()], "timings_s": {}})
    manifest.save()
    session = ScoringSession(top.spec, top.tokenizer, top.heldout, folder, top.device, top.model_ref, manifest,
                             train=top.train)
    with stage(manifest, "score_tuned"):
        score_candidate(session, candidate)
    with stage(manifest, "metrics"):
        results_stage(session, folder)
    manifest.update(status="completed", candidates=[candidate.record(manifest.data["fingerprints"]["adapter"])])
    return session


@main_only
def _candidate_folder(run_dir: Path, folder: Path, scores_dir: Path) -> None:
    (folder / "scores").mkdir(parents=True)
    for name in BASE_SCORE_FILES:
        shutil.copyfile(scores_dir / name, folder / "scores" / name)
    shutil.copyfile(run_dir / SPEC_FILE, folder / SPEC_FILE)
    (folder / "data").symlink_to(Path("..") / ".." / "data")  # the eval's prepared data, not a copy of it


# -- several candidates: each against the base (their folders), and against each other -----------
@main_only
def comparison_stage(top, candidates: list[Candidate], sessions: list) -> None:
    """The top-level metrics.json and predictions.jsonl of an eval with several candidates."""
    names = [c.name for c in candidates]
    per = {n: json.loads((s.run_dir / "metrics.json").read_text(encoding="utf-8")) for n, s in zip(names, sessions)}
    outputs = {n: s.outputs("tuned") for n, s in zip(names, sessions)}
    keep = top.spec.metrics.names
    comparisons = []
    for a, b in itertools.combinations(names, 2):
        paired = paired_comparison(outputs[a], outputs[b], top.settings)
        comparisons.append({"a": a, "b": b, "delta": {m: paired["delta"][m] for m in keep},
                            "win_tie_loss": {m: paired["win_tie_loss"][m] for m in keep}})
    first = per[names[0]]
    warnings = [w if w.startswith("base:") else f"{n}: {w}" for n, m in per.items() for w in m["warnings"]]
    doc = {
        "base": first["base"],
        "candidates": {n: {"folder": f"{CANDIDATES_DIR}/{n}", "fingerprint": m["fingerprints"]["adapter"],
                           "tuned": m["tuned"], "delta": m["delta"], "win_tie_loss": m["win_tie_loss"],
                           "guards": m["guards"]["tuned"], "warnings": m["warnings"]} for n, m in per.items()},
        "comparisons": comparisons,
        "higher_is_better": first["higher_is_better"],
        "settings": first["settings"],
        "guards": {"base": first["guards"]["base"]},
        "warnings": list(dict.fromkeys(warnings)),
        "fingerprints": {k: v for k, v in first["fingerprints"].items() if k != "adapter"},
    }
    atomic_write_json(top.run_dir / "metrics.json", doc)
    atomic_write_text(top.run_dir / "predictions.jsonl", _merged_predictions(names, [s.run_dir for s in sessions]))


def _merged_predictions(names: list[str], folders: list[Path]) -> str:
    """One line per held-out example: the base output and every candidate's, with per-example scores."""
    rows = {n: [json.loads(line) for line in (f / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
            for n, f in zip(names, folders)}
    lines = []
    for i, row in enumerate(rows[names[0]]):
        lines.append(json.dumps({
            "id": row["id"], "title": row["title"], "reference": row["reference"], "base": row["base"],
            "base_truncated": row["base_truncated"], "scores": {"base": row["scores"]["base"]},
            "candidates": {n: {"text": rows[n][i]["tuned"], "truncated": rows[n][i]["tuned_truncated"],
                               "scores": rows[n][i]["scores"]["tuned"]} for n in names},
        }, ensure_ascii=False))
    return "\n".join(lines) + "\n"


def summary_lines(run_dir: Path) -> list[str]:
    """Headline lines for the terminal: each candidate vs base, then each pair of candidates."""
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    if "candidates" not in metrics:
        return [summary_line(run_dir)]
    lines = [f"{n}: {summary_line(run_dir / c['folder'])}" for n, c in metrics["candidates"].items()]
    for pair in metrics["comparisons"]:
        parts = [f"{m} {d['value']:+.2f} (95% CI [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}])"
                 for m in SUMMARY_METRICS if (d := pair["delta"].get(m))]
        lines.append(f"{pair['b']} - {pair['a']}: {'; '.join(parts)}")
    return lines
