"""The `sweep` recipe: choose settings on validation, then score the winner once on held-out.

prepare (once) -> carve a validation slice from train -> trials (each trains one config and is
scored on the validation slice) -> choose the best feasible trial (`choice.json`) -> the winner's
complete run folder (its adapter reused, scored on held-out once) -> sweep report.

The held-out split is not looked at until the choice is written down. Trials live in an optuna
study: a SQLite file in the sweep folder by default, so `--resume` skips finished trials and
retries a failed one or one that died running; `--storage postgresql://...` lets several
machines work on one study (the same command and data on each give the same study name).
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path

from harness.data.cleaning import normalize_title
from harness.data.splitting import split_value
from harness.errors import RunError, SpecError
from harness.fingerprint import hash_json, split_fingerprint
from harness.io import atomic_write_json, atomic_writer
from harness.recipes.run import (execute, load_base_tokenizer, prepare_stage, record_long_prompts, resolve_device,
                                 resume_run, scoring_stages, stage, start_run, summary_line, train_stage)
from harness.recipes.sweep_study import (masked_url, open_storage, open_study, params_key, resumed_storage,
                                         retry_unfinished, study_name)
from harness.runfolder import ADAPTER_DIR, SPEC_FILE, Manifest, load_run_spec, process_start, read_manifest
from harness.scoring.sweep_selection import loop_constraints, maximizes, paired_gains, select_label, trial_value
from harness.spec import SweepSpec, TaskSpec, load_spec, spec_to_dict
from harness.sweepfolder import (CHOICE_FILE, STUDY_FILE, TRIALS_CSV, TRIALS_DIR, TRIALS_JSONL, VALIDATION_FILE,
                                 VALIDATION_METRICS, validation_scores)
from harness.training import tracking

log = logging.getLogger(__name__)

# Data is prepared once, and model/prompt fix the tokenizer and the base scores; metrics, gate and
# sweep settings are the yardstick itself. A sweep varies only what trains and what generates.
SWEEPABLE = ("train", "lora", "generation")


class NoFeasibleTrial(RunError):
    """Every finished trial broke the loop constraint: nothing is fit to be scored on held-out."""


@dataclass
class Sweep:
    """What every trial shares, set up once per process."""

    dir: Path
    spec: TaskSpec
    grid: dict[str, list]
    train: list  # the train split minus the validation slice: what every trial trains on
    validation: list
    study: object = field(repr=False)


def sweep_task(task: str | None, grid_args: list[str], overrides: list[str], sweeps_root: Path = Path("sweeps"),
               runs_root: Path = Path("runs"), storage: str | None = None, resume: Path | None = None) -> Path:
    """Start a sweep of `task` over `--grid` values (or continue one: `resume`); return its folder."""
    if resume:
        record = read_manifest(resume).get("sweep")
        if record is None:
            raise RunError(f"{resume}: not a sweep folder (no sweep record in manifest.json)")
        url = resumed_storage(record["storage"], storage)
    else:
        spec = load_spec(task, overrides)
        tracking.require_packages(spec)  # every trial trains with train.report_to's trackers
        grid = parse_grid(grid_args, task, overrides, spec_sweep=spec.sweep)
        url = storage
    shared = open_storage(url) if url else None  # a bad URL or server fails before any work
    if resume:
        spec, manifest = resume_run(resume)
    else:
        spec, manifest = start_run(task, overrides, sweeps_root)
        manifest.update(recipe="sweep", sweep={"grid": grid, "storage": masked_url(url) if url else None,
                                               "runs_dir": str(Path(runs_root).resolve())})
    log.info("sweep folder: %s", manifest.run_dir)
    return execute(spec, manifest, stages=functools.partial(_sweep_stages, shared))


def _sweep_stages(shared_storage, spec: TaskSpec, manifest: Manifest) -> None:
    from harness.reporting.sweep_report import write_sweep_reports  # matplotlib: only once a sweep runs

    sweep_dir = manifest.run_dir.resolve()  # trial folders are recorded in the study: absolute paths
    done = set(manifest.data.get("stages_done", []))
    prepared = prepare_stage(spec, manifest)
    load_base_tokenizer(spec, manifest)  # the probe: a broken base model stops the sweep before any trial
    train, validation = carve_validation(prepared.train, spec.sweep)
    _record_validation(sweep_dir, spec.sweep, prepared.train, validation)
    grid = manifest.data["sweep"]["grid"]
    if "study" not in manifest.data["sweep"]:
        manifest.update(sweep={**manifest.data["sweep"], "study": study_name(spec, grid, train, validation)})
    storage = shared_storage or open_storage(f"sqlite:///{sweep_dir / STUDY_FILE}")
    study = open_study(storage, manifest.data["sweep"]["study"], spec.sweep, grid)
    sweep = Sweep(sweep_dir, spec, grid, train, validation, study)

    if "trials" not in done:
        with stage(manifest, "trials"):
            run_trials(sweep)
    if "choose" not in done:
        with stage(manifest, "choose"):
            atomic_write_json(sweep_dir / CHOICE_FILE, choose(study, spec.sweep, grid))
    choice = json.loads((sweep_dir / CHOICE_FILE).read_text(encoding="utf-8"))
    if choice["winner"] is None:
        write_sweep_reports(sweep_dir)  # every trial, and why each was ruled out
        raise NoFeasibleTrial(f"no trial meets the loop constraint ({len(choice['infeasible'])} infeasible, "
                              f"see {sweep_dir / CHOICE_FILE}); nothing is scored on held-out")
    if "heldout" not in done:
        with stage(manifest, "heldout"):
            score_winner(manifest, choice)
    manifest.update(status="completed")  # as run's report_stage: the report says so; a failure resets it
    with stage(manifest, "report"):
        write_sweep_reports(sweep_dir)


# -- the grid ---------------------------------------------------------------------------------
def parse_grid(texts: list[str], task: str, overrides: list[str], spec_sweep: SweepSpec) -> dict[str, list]:
    """`--grid train.lr=1e-4,3e-4` -> {"train.lr": [0.0001, 0.0003]}, each value typed and every
    combination checked by the spec's own checks before any work starts."""
    if not texts:
        raise SpecError("sweep: give at least one --grid section.key=value1,value2,...")
    grid: dict[str, list] = {}
    set_keys = {o.partition("=")[0].strip() for o in overrides}
    for text in texts:
        key, sep, raw = text.partition("=")
        key = key.strip()
        if not sep or not key or not raw.strip():
            raise SpecError(f"--grid {text!r}: expected section.key=value1,value2,...")
        if key.count(".") != 1 or key.split(".")[0] not in SWEEPABLE:
            raise SpecError(f"--grid {key}: a sweep varies train.*, lora.* or generation.* keys only (data is "
                            "prepared once; model and prompt fix the base scores)")
        if key in grid or key in set_keys:
            raise SpecError(f"--grid {key}: given twice (in --grid or --set); list its values in one --grid")
        values = []
        for item in raw.split(","):
            value = functools.reduce(getattr, key.split("."), load_spec(task, [*overrides, f"{key}={item.strip()}"]))
            if not (value is None or isinstance(value, (bool, int, float, str))):
                raise SpecError(f"--grid {key}: only single values (numbers, strings, booleans, null) can be swept")
            if value in values:
                raise SpecError(f"--grid {key}: value {value!r} is listed twice")
            values.append(value)
        grid[key] = values
    combinations = list(itertools.product(*grid.values()))
    for combination in combinations:
        load_spec(task, [*overrides, *trial_overrides(grid, dict(zip(grid, combination)))])
    if spec_sweep.sampler == "tpe" and spec_sweep.n_trials > len(combinations):
        raise SpecError(f"sweep.n_trials: {spec_sweep.n_trials} is more than the {len(combinations)} combinations "
                        "of --grid; use sweep.sampler: grid to run them all")
    return grid


def trial_overrides(grid: dict[str, list], params: dict) -> list[str]:
    """`--set` strings for one configuration; JSON scalars read back as the same YAML values."""
    return [f"{key}={json.dumps(params[key])}" for key in grid]


# -- the validation slice ---------------------------------------------------------------------
def carve_validation(train: list, sweep: SweepSpec) -> tuple[list, list]:
    """(train minus validation, validation): the validation slice is carved from the TRAIN split only.

    Like the held-out split it is a pure function of the normalized title, under the sweep's own
    salt, so it is reproducible and a title is never on both sides; the cap keeps the smallest hashes."""
    values = [split_value(normalize_title(e.title), sweep.validation_salt) for e in train]
    chosen = {i for _, i in sorted((v, i) for i, v in enumerate(values) if v < sweep.validation_fraction)
              [:sweep.max_validation]}
    kept = [e for i, e in enumerate(train) if i not in chosen]
    validation = [e for i, e in enumerate(train) if i in chosen]
    if not validation or not kept:
        raise SpecError(f"sweep.validation_fraction: {sweep.validation_fraction} of {len(train)} train examples "
                        f"leaves {len(validation)} for validation and {len(kept)} to train; change it")
    return kept, validation


def _record_validation(sweep_dir: Path, sweep: SweepSpec, train: list, validation: list) -> None:
    atomic_write_json(sweep_dir / VALIDATION_FILE, {
        "carved_from": "train", "fraction": sweep.validation_fraction, "salt": sweep.validation_salt,
        "max_validation": sweep.max_validation, "train_examples": len(train), "count": len(validation),
        "fingerprint": split_fingerprint(validation), "ids": [e.id for e in validation]})


def run_trials(sweep: Sweep) -> None:
    """Run trials until every configuration is done (grid) or sweep.n_trials completed (tpe)."""
    from optuna.trial import TrialState

    retry_unfinished(sweep.study)
    try:
        while _more_to_run(sweep):
            sweep.study.optimize(functools.partial(_trial, sweep), n_trials=1)
    finally:
        write_trial_tables(sweep.dir, sweep.study, sweep.grid, sweep.spec.sweep)
    running = sweep.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if running:
        hosts = sorted({str(t.user_attrs.get("host", "?")) for t in running})
        raise RunError(f"{len(running)} trial(s) still running on other workers ({', '.join(hosts)}); "
                       f"when they finish, choose with: python -m harness sweep --resume {sweep.dir}")


def _more_to_run(sweep: Sweep) -> bool:
    from optuna.trial import TrialState

    trials = sweep.study.get_trials(deepcopy=False)
    if any(t.state == TrialState.WAITING for t in trials):
        return True
    if sweep.spec.sweep.sampler == "grid":
        tried = {params_key(t.params) for t in trials}
        return any(params_key(dict(zip(sweep.grid, c))) not in tried for c in itertools.product(*sweep.grid.values()))
    started = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.RUNNING)]
    return len(started) < sweep.spec.sweep.n_trials


# -- one trial --------------------------------------------------------------------------------
def _trial(sweep: Sweep, trial) -> float:
    """Train one configuration in its own trial folder and score it on the validation slice."""
    params = {key: trial.suggest_categorical(key, values) for key, values in sweep.grid.items()}
    overrides = trial_overrides(sweep.grid, params)
    log.info("trial %d: %s", trial.number, " ".join(overrides))
    previous = dict(trial.user_attrs)  # a retry carries the folder of the attempt that failed
    for name, value in (("host", socket.gethostname()), ("pid", os.getpid()),
                        ("pid_started", process_start(os.getpid())), ("overrides", overrides)):
        trial.set_user_attr(name, value)
    spec, manifest = _trial_folder(sweep, trial.number, overrides, previous)
    trial.set_user_attr("trial_dir", str(manifest.run_dir))
    trial.set_user_attr("train_key", train_key(spec))
    execute(spec, manifest, stages=functools.partial(_trial_stages, sweep))
    scores = validation_scores(manifest.run_dir)
    trial.set_user_attr("validation", scores)
    for name, value in loop_constraints(scores["guards"], sweep.spec.sweep).items():
        trial.set_constraint(name, value)
    value = trial_value(scores, sweep.spec.sweep.select)
    log.info("trial %d: validation %s %.3f", trial.number, select_label(sweep.spec.sweep.select), value)
    return value


def _trial_folder(sweep: Sweep, number: int, overrides: list[str], previous: dict) -> tuple[TaskSpec, Manifest]:
    """A new trial folder, or the one a failed attempt left on this host (training resumes there)."""
    folder = Path(previous.get("trial_dir", ""))
    if previous.get("host") == socket.gethostname() and (folder / "manifest.json").is_file():
        if read_manifest(folder).get("status") == "completed":
            return load_run_spec(folder), Manifest.load(folder)
        return resume_run(folder)
    return start_run(str(sweep.dir / SPEC_FILE), overrides, sweep.dir / TRIALS_DIR, label=f"trial-{number:03d}")


def _trial_stages(sweep: Sweep, spec: TaskSpec, manifest: Manifest) -> None:
    """run's stages, on the sweep's data: train on train-minus-validation, score on validation."""
    from harness.scoring.heldout_scoring import ScoringSession

    run_dir = manifest.run_dir
    manifest.update(recipe="sweep-trial", scored_on="validation", sweep_dir=str(sweep.dir))
    device, fast = resolve_device(spec, manifest)
    model_ref, tokenizer = load_base_tokenizer(spec, manifest)
    session = ScoringSession(spec, tokenizer, sweep.validation, run_dir, device, model_ref, manifest,
                             train=sweep.train)
    record_long_prompts(spec, manifest, session)

    def train() -> None:
        twin = _trained_twin(sweep, train_key(spec))
        if twin:
            _copy_training(twin, manifest)
        else:
            train_stage(spec, manifest, sweep.train, model_ref, tokenizer, device, fast)

    def results() -> None:
        session.write_results(run_dir / VALIDATION_METRICS)

    scoring_stages(manifest, session, train, results)


def train_key(spec: TaskSpec) -> str:
    """Everything that determines the adapter: trials that differ only in generation share one."""
    setup = spec_to_dict(spec)
    return hash_json({k: v for k, v in setup.items() if k not in ("generation", "metrics", "gate", "sweep")})


def _trained_twin(sweep: Sweep, key: str) -> Path | None:
    from optuna.trial import TrialState

    for t in sweep.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        folder = Path(t.user_attrs.get("trial_dir", ""))
        if t.user_attrs.get("train_key") == key and (folder / ADAPTER_DIR / "adapter_config.json").is_file():
            return folder
    return None


def _copy_training(source: Path, manifest: Manifest) -> None:
    """The adapter, loss log, train record and long-prompt counts of a finished trial (or the winning trial,
    for held-out)."""
    run_dir = manifest.run_dir
    shutil.copytree(source / "adapter", run_dir / "adapter", dirs_exist_ok=True)
    if (source / "train_log.jsonl").is_file():
        shutil.copyfile(source / "train_log.jsonl", run_dir / "train_log.jsonl")
    recorded = read_manifest(source)
    # Trackers: the held-out metrics go to the run that trained (train.report_to).
    counted = {"train": recorded["long_prompts"]["train"]} if "train" in recorded.get("long_prompts", {}) else {}
    manifest.update(train={**recorded.get("train", {}), "adapter_from": str(source)},
                    long_prompts={**manifest.data.get("long_prompts", {}), **counted},
                    **({"tracking": recorded["tracking"]} if "tracking" in recorded else {}))
    log.info("adapter copied from %s", source)


def _gains(t, sweep: SweepSpec) -> dict[str, float] | None:
    """The listed metrics' paired gains of a scored trial (null under a single-metric select)."""
    validation = t.user_attrs.get("validation")
    if isinstance(sweep.select, str) or validation is None:
        return None
    return paired_gains(validation, sweep.select)


# -- the choice -------------------------------------------------------------------------------
def choose(study, sweep: SweepSpec, grid: dict) -> dict:
    """The best feasible trial by sweep.select on validation (`trial_value`; ties: the earlier trial),
    with the runner-up and why each infeasible trial was ruled out."""
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise RunError("no trial completed; nothing to choose from")
    higher = maximizes(sweep.select)
    feasible = [t for t in complete if _feasible(t)]
    ranked = sorted(feasible, key=lambda t: (-t.value if higher else t.value, t.number))
    winner, runner_up = (ranked + [None, None])[:2]
    ranking = (f"{'highest' if higher else 'lowest'} validation {sweep.select}" if isinstance(sweep.select, str)
               else "highest worst paired gain (lower bound of the paired 95% CI of tuned − base on validation, "
                    f"sign-flipped where lower is better) over {', '.join(sweep.select)}")
    return {
        "select": sweep.select, "direction": "maximize" if higher else "minimize",
        "rule": f"{ranking} among feasible trials; feasible: "
                f"tuned loop_share <= sweep.max_loop_share ({sweep.max_loop_share}) and <= the base model's; "
                "ties go to the earlier trial",
        "completed": len(complete), "feasible": len(feasible),
        "winner": _summary(winner, grid, sweep), "runner_up": _summary(runner_up, grid, sweep),
        "margin": abs(winner.value - runner_up.value) if winner and runner_up else None,
        "infeasible": [{**_summary(t, grid, sweep), "reasons": _reasons(t, sweep)}
                       for t in complete if not _feasible(t)],
        "given_up": _given_up(study, grid),
        "heldout_run": None,
    }


def _given_up(study, grid: dict) -> list[dict]:
    """Configurations that failed and are neither complete nor queued (each failed MAX_ATTEMPTS times)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    done = {params_key(t.params) for t in trials if t.state != TrialState.FAIL}
    failed = {params_key(t.params): t for t in trials
              if t.state == TrialState.FAIL and params_key(t.params) not in done}
    return [{"params": {k: t.params.get(k) for k in grid}, "last_trial": t.number} for t in failed.values()]


def _feasible(t) -> bool:
    return all(v <= 0 for v in t.constraints.values())


def _summary(t, grid: dict, sweep: SweepSpec) -> dict | None:
    if t is None:
        return None
    guards = t.user_attrs["validation"]["guards"]
    return {"trial": t.number, "params": {k: t.params[k] for k in grid}, "overrides": trial_overrides(grid, t.params),
            "value": t.value, "gains": _gains(t, sweep), "loop_share": guards["tuned"]["loop_share"],
            "base_loop_share": guards["base"]["loop_share"],
            "trial_dir": t.user_attrs["trial_dir"], "host": t.user_attrs.get("host")}


def _reasons(t, sweep: SweepSpec) -> list[str]:
    guards = t.user_attrs["validation"]["guards"]
    tuned, base = guards["tuned"]["loop_share"], guards["base"]["loop_share"]
    return ([f"tuned loop_share {tuned:.3f} > sweep.max_loop_share {sweep.max_loop_share}"]
            if tuned > sweep.max_loop_share else []) + \
        ([f"tuned loop_share {tuned:.3f} > base loop_share {base:.3f}"] if tuned > base else [])


# -- the winner, once on held-out -------------------------------------------------------------
def score_winner(sweep_manifest: Manifest, choice: dict) -> Path:
    """The winner's complete run folder (same contract as `run`), from its trial's adapter: no retraining."""
    sweep_dir, record, winner = sweep_manifest.run_dir.resolve(), sweep_manifest.data["sweep"], choice["winner"]
    trial_dir = Path(winner["trial_dir"])
    if not (trial_dir / "adapter" / "adapter_config.json").is_file():
        raise RunError(f"the winner, trial {winner['trial']}, ran on {winner['host']}: its adapter {trial_dir} "
                       f"is not on this machine; resume the sweep there")
    if record.get("heldout_run"):
        folder = Path(record["heldout_run"])
        spec, manifest = ((load_run_spec(folder), Manifest.load(folder))
                          if read_manifest(folder).get("status") == "completed" else resume_run(folder))
    else:
        spec, manifest = start_run(str(sweep_dir / SPEC_FILE), winner["overrides"], Path(record["runs_dir"]))
        sweep_manifest.update(sweep={**record, "heldout_run": str(manifest.run_dir)})
        atomic_write_json(sweep_dir / CHOICE_FILE, {**choice, "heldout_run": str(manifest.run_dir)})
    if "train" not in manifest.data.get("stages_done", []):
        shutil.copytree(sweep_dir / "data", manifest.run_dir / "data", dirs_exist_ok=True)
        _copy_training(trial_dir, manifest)
        manifest.update(stages_done=["prepare", "train"], data_counts=sweep_manifest.data.get("data_counts"),
                        sweep={"dir": str(sweep_dir), "trial": winner["trial"], "trial_dir": str(trial_dir),
                               "params": winner["params"], "choice": str(sweep_dir / CHOICE_FILE),
                               "trained_on": f"data/train.jsonl minus the sweep's validation slice "
                                             f"({sweep_dir / VALIDATION_FILE})"})
    log.info("winner: trial %d; scoring it once on held-out in %s", winner["trial"], manifest.run_dir)
    return execute(spec, manifest)


# -- records ----------------------------------------------------------------------------------
def trial_rows(study, grid: dict, sweep: SweepSpec) -> list[dict]:
    """One row per trial in the study: state, parameters, validation scores, guards, constraints."""
    from optuna.trial import TrialState

    rows = []
    for t in study.get_trials(deepcopy=False):
        duration = t.duration.total_seconds() if t.duration else None
        rows.append({"trial": t.number, "state": t.state.name.lower(), "params": {k: t.params.get(k) for k in grid},
                     "value": t.value, "gains": _gains(t, sweep),
                     "feasible": _feasible(t) if t.state == TrialState.COMPLETE else None,
                     "infeasible_because": _reasons(t, sweep) if t.state == TrialState.COMPLETE else [],
                     "constraints": t.constraints, "validation": t.user_attrs.get("validation"),
                     "retry_of": t.system_attrs.get("failed_trial"), "trial_dir": t.user_attrs.get("trial_dir"),
                     "host": t.user_attrs.get("host"), "seconds": duration})
    return rows


def write_trial_tables(sweep_dir: Path, study, grid: dict, sweep: SweepSpec) -> None:
    """`trials.jsonl` (nested) and `trials.csv` (flat, dotted columns), rewritten from the study."""
    import pandas as pd

    rows = trial_rows(study, grid, sweep)
    with atomic_writer(sweep_dir / TRIALS_JSONL) as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
    with atomic_writer(sweep_dir / TRIALS_CSV) as fh:
        pd.json_normalize(rows).to_csv(fh, index=False)


def summary_lines(sweep_dir: Path) -> list[str]:
    """What the CLI prints when a sweep finishes."""
    choice = json.loads((Path(sweep_dir) / CHOICE_FILE).read_text(encoding="utf-8"))
    winner, runner_up = choice["winner"], choice["runner_up"]
    lines = [f"sweep folder: {sweep_dir}",
             f"winner: trial {winner['trial']} ({' '.join(winner['overrides'])}), "
             f"validation {select_label(choice['select'])} {winner['value']:.2f}"
             + (f"; runner-up trial {runner_up['trial']} {runner_up['value']:.2f}" if runner_up else "; no runner-up")]
    run_dir = Path(choice["heldout_run"])
    lines += [f"held-out run folder: {run_dir}", f"held-out: {summary_line(run_dir)}",
              f"reports: {Path(sweep_dir) / 'sweep.html'}  {Path(sweep_dir) / 'sweep.md'}  {run_dir / 'report.html'}"]
    return lines
