"""The `run` recipe: prepare -> score base -> train -> score tuned -> metrics -> reports.

One readable workflow. Each stage records itself in the manifest when it finishes, so
`--resume RUN` skips finished stages, continues training from the last checkpoint and
does not regenerate predictions already written. Under several processes (harness.distributed)
every process runs the same stages; rank 0 alone writes the run folder.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import yaml

from harness import devices, distributed, models
from harness.data.leakage import assert_no_exact_leak, leakage_report
from harness.data.prepared import PreparedData, read_prepared, write_prepared
from harness.data.records import prepare
from harness.distributed import main_only
from harness.errors import HarnessError, RunError
from harness.io import atomic_write_text, os_error_message
from harness.models import base_files
from harness.runfolder import (ADAPTER_DIR, SPEC_FILE, Manifest, load_run_spec, new_run_dir, pid_alive,
                               process_start, read_manifest)
from harness.spec import TaskSpec, load_spec, spec_to_dict
from harness.training import tracking
from harness.training.fast_paths import fast_path_options

log = logging.getLogger(__name__)


@contextmanager
def stage(manifest: Manifest, name: str):
    log.info("== %s", name)
    started = time.perf_counter()
    yield
    manifest.timing(name, time.perf_counter() - started)
    manifest.update(stages_done=[*manifest.data.get("stages_done", []), name])


def start_run(task: str, overrides: list[str], runs_root: Path,
              label: str | None = None, command: list[str] | None = None) -> tuple[TaskSpec, Manifest]:
    """A new run folder `<runs_root>/<label or task name>-<time>-<rand>` with its resolved spec;
    `command`: the harness command line that made it (recorded for the model card)."""
    spec = load_spec(task, overrides)
    prompt = models.resolve_prompt_template(spec)  # recorded in spec.yaml: every later stage reads it there
    run_dir = new_run_dir(runs_root, label or spec.name)
    atomic_write_text(run_dir / SPEC_FILE, yaml.safe_dump(spec_to_dict(spec), sort_keys=False))
    manifest = Manifest.create(run_dir, spec.name)
    manifest.update(overrides=list(overrides), prompt_template=prompt, **({"command": command} if command else {}))
    return load_run_spec(run_dir), manifest


def resume_run(run_dir: Path) -> tuple[TaskSpec, Manifest]:
    """Take over an unfinished run: `interrupted`, `failed`, or `running` whose process is gone (kill -9)."""
    recorded = read_manifest(run_dir)
    status, pid = recorded.get("status"), recorded.get("pid")
    if status == "completed":
        raise RunError(f"{run_dir}: run already completed; nothing to resume")
    if status == "running" and pid_alive(pid, recorded.get("pid_started")):
        raise RunError(f"{run_dir}: run is still in progress (pid {pid} is alive); stop it or wait, then resume")
    if status == "running":
        log.warning("%s: its process (pid %s) is gone without a word (killed?); resuming", run_dir, pid)
    spec = load_run_spec(run_dir)
    tracking.require_packages(spec)
    manifest = Manifest.load(run_dir)
    manifest.update(status="running", pid=os.getpid(), pid_started=process_start(os.getpid()),
                    resumed_at=time.time())
    return spec, manifest


@main_only
def open_run(task: str | None, overrides: list[str], runs_root: Path, resume: Path | None = None) -> Path:
    """Start a new run folder, or take over `resume`; the other processes get its path. A tracker that
    train.report_to names but is not installed fails here, before either."""
    if not resume:
        tracking.require_packages(load_spec(task, overrides))
    _spec, manifest = resume_run(resume) if resume else start_run(task, overrides, runs_root,
                                                                   command=command_line("run", task, overrides))
    return manifest.run_dir


def command_line(recipe: str, task: str, overrides: list[str], *options: str) -> list[str]:
    """The `python -m harness` arguments that start `recipe` on `task` with these `--set` overrides."""
    return [recipe, task, *options, *(x for o in overrides for x in ("--set", o))]


def execute(spec: TaskSpec, manifest: Manifest, stages=None) -> Path:
    """Run every unfinished stage (`stages(spec, manifest)`: this recipe's by default); mark the
    manifest `completed`, `interrupted` or `failed`."""
    from harness.training.train import TrainingInterrupted

    try:
        (stages or _stages)(spec, manifest)
    except (TrainingInterrupted, KeyboardInterrupt):
        manifest.update(status="interrupted", last_checkpoint=_last_checkpoint(manifest.run_dir))
        raise
    except HarnessError as exc:
        manifest.update(status="failed", error=str(exc))
        raise
    except Exception as exc:
        user = _user_error(exc, manifest.run_dir)
        manifest.update(status="failed", error=str(user) if user else f"{type(exc).__name__}: {exc}")
        if user:
            raise user from None
        raise
    manifest.update(status="completed")
    return manifest.run_dir


_USER_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def _user_error(exc: BaseException, run_dir: Path) -> RunError | None:
    """A full disk, a read-only folder or out-of-memory inside any stage: one line, exit 2, no traceback."""
    if isinstance(exc, OSError) and exc.errno in _USER_ERRNOS:
        return RunError(os_error_message(exc.filename or run_dir, exc))
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":  # torch's CUDA OOM too
        return RunError(f"out of memory in {run_dir.name}; lower train.batch_size, train.max_length, "
                        f"generation.batch_size or (CUDA scoring) generation.static_batch_size, then resume "
                        f"with --resume {run_dir}")
    return None


def _last_checkpoint(run_dir: Path) -> str | None:
    from harness.training.interruptions import latest_checkpoint

    found = latest_checkpoint(run_dir / "checkpoints")
    return str(found) if found else None


def _stages(spec: TaskSpec, manifest: Manifest) -> None:
    from harness.scoring.heldout_scoring import ScoringSession

    run_dir = manifest.run_dir
    device, fast = resolve_device(spec, manifest)
    prepared = prepare_stage(spec, manifest)
    model_ref, tokenizer = load_base_tokenizer(spec, manifest)
    record_prompt(manifest, spec, tokenizer)
    session = ScoringSession(spec, tokenizer, prepared.heldout, run_dir, device, model_ref, manifest,
                             train=prepared.train)
    record_long_prompts(spec, manifest, session)

    def results() -> None:
        results_stage(session, run_dir)
        log_heldout_stage(spec, manifest)

    scoring_stages(manifest, session,
                   train=lambda: train_stage(spec, manifest, prepared.train, model_ref, tokenizer, device, fast),
                   results=results)
    report_stage(spec, manifest)


# -- stages shared by the recipes (run, sweep, eval) ------------------------------------------
def resolve_device(spec: TaskSpec, manifest: Manifest):
    """The device and the fast-path switches, before any work: an impossible switch fails here.

    `device` is rank 0's; `world_size` says how many processes (one a GPU) share the work."""
    device = devices.pick_device()
    reasons: dict[str, str] = {}
    fast = fast_path_options(spec, device, reasons)
    manifest.update(device=device.describe(), world_size=distributed.world_size(), fast_path=fast,
                    fast_path_reasons=reasons)
    return device, fast


def scoring_stages(manifest: Manifest, session, train: Callable[[], None], results: Callable[[], None]) -> None:
    """Base scores, training, tuned scores and results, in that order; each skipped once the manifest
    records it done (a resumed run goes on where it stopped)."""
    done = set(manifest.data.get("stages_done", []))
    for name, work in (("score_base", session.score_base), ("train", train),
                       ("score_tuned", lambda: session.score_tuned(manifest.run_dir / ADAPTER_DIR)),
                       ("metrics", results)):
        if name not in done:
            with stage(manifest, name):
                work()


def prepare_stage(spec: TaskSpec, manifest: Manifest) -> PreparedData:
    """Clean and split once (recorded in `data/`), then check the split for leaks on every start."""
    run_dir = manifest.run_dir
    if "prepare" not in manifest.data.get("stages_done", []):
        with stage(manifest, "prepare"):
            _write_prepared(spec, manifest)
    prepared = read_prepared(run_dir / "data")
    _check_split(spec, manifest, prepared)
    return prepared


@main_only
def _write_prepared(spec: TaskSpec, manifest: Manifest) -> None:
    prepared = prepare(spec)
    write_prepared(prepared, manifest.run_dir / "data")
    manifest.update(data_counts=prepared.counts)
    log.info("data: %d train, %d held-out", len(prepared.train), len(prepared.heldout))


@main_only
def _check_split(spec: TaskSpec, manifest: Manifest, prepared: PreparedData) -> None:
    leaks = leakage_report(prepared.train, prepared.heldout)
    manifest.update(leakage=leaks)
    assert_no_exact_leak(leaks)
    if leaks["near"]:
        log.warning("%d held-out title(s) are near-duplicates of train titles (other edition/format)", leaks["near"])
    if not prepared.train or not prepared.heldout:
        raise HarnessError(f"{spec.name}: need at least one train and one held-out example "
                           f"(got {len(prepared.train)} train, {len(prepared.heldout)} held-out)")


def load_base_tokenizer(spec: TaskSpec, manifest: Manifest | None = None):
    """The base model's reference (fetched/converted once) and its tokenizer, set up for the prompt.

    With a manifest (a recipe about to train or score), the base model's probe perplexity is measured
    first and recorded; a broken model stops the run here (base_files.check_base_probe)."""
    model_ref = main_only(base_files.resolve_base)(spec.model.base)  # fetched or converted once, by rank 0
    if manifest is not None:
        probe_base(spec, manifest, model_ref)
    tokenizer = models.load_tokenizer(model_ref, spec.model, uses_chat_template=spec.prompt.template is None)
    return model_ref, tokenizer


def probe_base(spec: TaskSpec, manifest: Manifest, model_ref: str) -> None:
    """Measure the base model's probe perplexity and record it; a broken model stops here (exit 4)."""
    manifest.update(base_probe=main_only(base_files.check_base_probe)(spec.model, model_ref))


def record_prompt(manifest: Manifest, spec: TaskSpec, tokenizer) -> None:
    """The prompt's shape (title left as `{title}`) and the EOS that ends an answer, for model cards and exports."""
    from harness.data.prompts import build_prompt

    manifest.update(prompt_format={"example": build_prompt(tokenizer, spec.prompt, "{title}"),
                                   "eos_token": tokenizer.eos_token})


def record_long_prompts(spec: TaskSpec, manifest: Manifest, session) -> None:
    """The held-out side of the manifest's `long_prompts`: how many of the titles `session` scores were cut
    to fit train.max_length (harness.data.prompts.fit_prompts; never skipped, whatever train.long_prompts
    says), with a warning naming the count. train_stage adds the training side, counted as it tokenizes."""
    from harness.data.prompts import max_prompt_tokens

    t = spec.train
    cut = len(session.cut_prompts)
    manifest.update(long_prompts={**manifest.data.get("long_prompts", {}), "policy": t.long_prompts,
                                  "max_length": t.max_length, "max_prompt_tokens": max_prompt_tokens(t.max_length),
                                  "heldout": {"truncated": cut}})
    if cut and distributed.is_main():
        log.warning("long prompts: %d of %d held-out titles cut to fit train.max_length %d (prompts of at most "
                    "%d tokens)", cut, len(session.heldout), t.max_length, max_prompt_tokens(t.max_length))


def train_stage(spec: TaskSpec, manifest: Manifest, train_examples, model_ref: str, tokenizer, device,
                fast: dict) -> None:
    """Train a LoRA adapter into `<run>/adapter`, continuing from the last checkpoint if there is one."""
    from harness.training.interruptions import latest_checkpoint
    from harness.training.train import train

    run_dir = manifest.run_dir
    model = models.load_model(model_ref, spec.model, tokenizer, device, quantize=fast["quantize"],
                              attn_implementation=fast["attention"])
    parameters = model.num_parameters()  # transformers' count: a 4-bit model's packed weights counted unpacked
    peak_memory = _peak_gpu_memory(device, reset=True)
    resume_from = latest_checkpoint(run_dir / "checkpoints")
    result = train(spec, model, tokenizer, train_examples, run_dir, device, resume_from=resume_from, fast=fast,
                   tracked=manifest.data.get("tracking"), on_tracking=lambda record: manifest.update(tracking=record))
    peak_memory = _peak_gpu_memory(device)
    t = spec.train
    manifest.update(train={"steps": result.steps, "train_tokens": result.train_tokens,
                           "seconds": round(result.seconds, 2), "resumed_from": str(resume_from or ""),
                           "global_batch": t.batch_size * distributed.world_size() * t.grad_accum,
                           "base_parameters": parameters,
                           **({"peak_gpu_memory_bytes": peak_memory} if peak_memory is not None else {}),
                           **({"best": result.best} if result.best else {})},
                    long_prompts={**manifest.data.get("long_prompts", {}), "train": result.long_prompts})


def _peak_gpu_memory(device, reset: bool = False) -> int | None:
    """Rank 0's peak CUDA memory allocated by tensors since the last reset (None off CUDA)."""
    if device.kind != "cuda":
        return None
    import torch

    if reset:
        torch.cuda.reset_peak_memory_stats(device.torch_device)
    return int(torch.cuda.max_memory_allocated(device.torch_device))


@main_only
def results_stage(session, run_dir: Path) -> None:
    """`metrics.json` (with CIs and guards) and `predictions.jsonl` from the scores on disk."""
    session.write_results(run_dir / "metrics.json")


@main_only
def log_heldout_stage(spec: TaskSpec, manifest: Manifest) -> None:
    """The held-out metrics with their CIs, to the trackers training logged to (train.report_to)."""
    metrics = json.loads((manifest.run_dir / "metrics.json").read_text(encoding="utf-8"))
    tracking.log_heldout(spec, manifest.run_dir, manifest.data.get("tracking"), metrics,
                         step=manifest.data.get("train", {}).get("steps", 0))


@main_only
def report_stage(spec: TaskSpec, manifest: Manifest) -> None:
    """Every result is in: mark the run completed (a report failure resets it), then write the reports
    and the model card(s) (harness.reporting.model_card)."""
    from harness.reporting.model_card import write_model_cards
    from harness.reporting.report import write_reports

    run_dir = manifest.run_dir
    manifest.update(status="completed")
    with stage(manifest, "report"):
        write_reports([run_dir], run_dir)
        write_reports([run_dir], Path("reports") / spec.name / run_dir.name)
        write_model_cards(run_dir)


def summary_line(run_dir: Path) -> str:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    parts = []
    for name in ("rougeL", "bleu", "chrf", "perplexity"):
        if name in metrics["base"]:
            b, t = metrics["base"][name]["value"], metrics["tuned"][name]["value"]
            lo, hi = metrics["delta"][name]["ci95"]
            parts.append(f"{name} {b:.2f} -> {t:.2f} (delta 95% CI [{lo:+.2f}, {hi:+.2f}])")
    return "; ".join(parts)


def run_task(task: str, overrides: list[str], runs_root: Path = Path("runs"), resume: Path | None = None) -> Path:
    run_dir = open_run(task, overrides, runs_root, resume)
    log.info("run folder: %s", run_dir)
    return execute(load_run_spec(run_dir), Manifest.load(run_dir))
