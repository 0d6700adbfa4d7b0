"""Several base models on one task: `run TASK --models A,B` and `sweep TASK --models A,B`.

`run --models` makes one folder, `runs/<task>-models-<time>-<rand>/`: the data is prepared there once
(`data/`), each model runs in turn into its own run folder under `models/` (the `run` recipe, on a copy of
that data), and the leaderboard of all of them (harness.reporting.leaderboard) is written at the top. The
manifest's `models` list records each model's run folder as soon as it exists, so `run --resume FOLDER`
skips the finished models, resumes the one that was interrupted and starts the rest.

`sweep --models` runs one sweep per model (settings chosen on validation, the winner scored once on
held-out) into `sweeps/<task>-models-<time>-<rand>/sweeps/<name>/`, then the leaderboard of the winners.

Per-model settings: `--set model@NAME.section.key=value`, NAME a model's short name (`gemma3-270m` for
`embedded:gemma3-270m`, a folder's or hub id's last part). Only what belongs to one model may differ:
model, prompt, lora, train and generation keys. Data and metric settings are shared: one held-out split,
one yardstick.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from harness.errors import SpecError
from harness.models import model_label
from harness.recipes.run import execute, prepare_stage, resume_run, stage, start_run
from harness.runfolder import SPEC_FILE, Manifest, load_run_spec, read_manifest
from harness.spec import load_spec

log = logging.getLogger(__name__)
MODELS_DIR, SWEEPS_DIR, SWEEP_RUNS_DIR = "models", "sweeps", "runs"
PER_MODEL_PREFIX = "model@"
PER_MODEL_SECTIONS = ("model", "prompt", "lora", "train", "generation")


def parse_models(text: str) -> dict[str, str]:
    """`--models a,b` -> {short name: model.base}, two or more, names unique."""
    bases = [b.strip() for b in text.split(",") if b.strip()]
    if len(bases) < 2:
        raise SpecError(f"--models {text!r}: give two or more models, comma-separated")
    models: dict[str, str] = {}
    for base in bases:
        name = model_label(base)
        if name in models:
            raise SpecError(f"--models: two models are named {name!r} ({models[name]}, {base}); "
                            "give each a folder of its own name")
        models[name] = base
    return models


def split_overrides(overrides: list[str], names: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """(--set values for every model, {name: its own}): `model@NAME.prompt.template=alpaca` is NAME's."""
    common, own = [], {name: [] for name in names}
    for text in overrides:
        if not text.startswith(PER_MODEL_PREFIX):
            key = text.partition("=")[0].strip()
            if key == "model.base":
                raise SpecError(f"--set {text}: --models names the base models; leave out model.base")
            common.append(text)
            continue
        rest = text[len(PER_MODEL_PREFIX):]
        name = max((n for n in names if rest.startswith(n + ".")), key=len, default=None)
        if name is None:
            raise SpecError(f"--set {text}: no model of --models is named like that (names: {', '.join(names)})")
        setting = rest[len(name) + 1:]
        key = setting.partition("=")[0].strip()
        if key.split(".")[0] not in PER_MODEL_SECTIONS or key == "model.base":
            raise SpecError(f"--set {text}: a model's own settings are {', '.join(PER_MODEL_SECTIONS)} keys "
                            "(not model.base); data and metrics are shared by every model")
        own[name].append(setting)
    return common, own


def model_overrides(base: str, own: list[str]) -> list[str]:
    return [f"model.base={base}", *own]


def _plan(task: str, models: dict[str, str], overrides: list[str]) -> tuple[list[str], list[dict]]:
    """The shared --set values and each model's record; every model's spec is checked before any work."""
    common, own = split_overrides(overrides, list(models))
    for name, base in models.items():
        load_spec(task, [*common, *model_overrides(base, own[name])])
    return common, [{"name": n, "base": b, "overrides": own[n]} for n, b in models.items()]


# -- run --models -----------------------------------------------------------------------------
def run_models(task: str | None, models_text: str | None, overrides: list[str], runs_root: Path = Path("runs"),
               resume: Path | None = None) -> Path:
    """`run --models` (or `run --resume` of its folder): returns the comparison folder."""
    if resume:
        spec, manifest = resume_run(resume)
    else:
        common, plan = _plan(task, parse_models(models_text), overrides)
        spec, manifest = start_run(task, common, runs_root, label=f"{load_spec(task, common).name}-models")
        manifest.update(recipe="models", models=plan)
    log.info("comparison folder: %s", manifest.run_dir)
    return execute(spec, manifest, stages=_models_stages)


def is_models_folder(folder: Path) -> bool:
    return read_manifest(folder).get("recipe") == "models"


def _models_stages(spec, manifest: Manifest) -> None:
    top = manifest.run_dir
    prepare_stage(spec, manifest)
    for i, record in enumerate(manifest.data["models"]):
        if record.get("status") == "completed":
            continue
        model_spec, model_manifest = _model_run(top, manifest, record)
        manifest.data["models"][i] = {**record, "run_dir": str(model_manifest.run_dir)}
        manifest.save()
        log.info("== model %s (%s): %s", record["name"], record["base"], model_manifest.run_dir)
        execute(model_spec, model_manifest)
        manifest.data["models"][i]["status"] = "completed"
        manifest.save()
    _leaderboard_stage(manifest, [Path(r["run_dir"]) for r in manifest.data["models"]])


def _model_run(top: Path, manifest: Manifest, record: dict):
    """The model's run folder: resumed where a run was started, else a new one on the shared data."""
    if record.get("run_dir"):
        folder = Path(record["run_dir"])
        if read_manifest(folder).get("status") == "completed":
            return load_run_spec(folder), Manifest.load(folder)
        return resume_run(folder)
    spec, model_manifest = start_run(str(top / SPEC_FILE), model_overrides(record["base"], record["overrides"]),
                                     top / MODELS_DIR, label=record["name"])
    shutil.copytree(top / "data", model_manifest.run_dir / "data")
    model_manifest.update(stages_done=["prepare"], data_counts=manifest.data.get("data_counts"),
                          models_folder=str(top))
    return spec, model_manifest


def _leaderboard_stage(manifest: Manifest, run_dirs: list[Path]) -> None:
    from harness.reporting.leaderboard import write_leaderboard

    manifest.update(status="completed")  # as run's report_stage: a failure here resets it
    with stage(manifest, "compare"):
        write_leaderboard(run_dirs, manifest.run_dir)


# -- sweep --models ---------------------------------------------------------------------------
def sweep_models(task: str | None, models_text: str | None, grid: list[str], overrides: list[str],
                 sweeps_root: Path = Path("sweeps"), runs_root: Path = Path("runs"), storage: str | None = None,
                 resume: Path | None = None) -> Path:
    """`sweep --models`: one sweep per model, then the leaderboard of the winners; returns the top folder."""
    from harness.recipes.sweep import parse_grid

    if resume:
        spec, manifest = resume_run(resume)
    else:
        common, plan = _plan(task, parse_models(models_text), overrides)
        for record in plan:  # every model's grid checked before any work
            model_set = [*common, *model_overrides(record["base"], record["overrides"])]
            parse_grid(grid, task, model_set, spec_sweep=load_spec(task, model_set).sweep)
        spec, manifest = start_run(task, common, sweeps_root, label=f"{load_spec(task, common).name}-models")
        manifest.update(recipe="sweep-models", models=plan, grid=list(grid), storage=storage,
                        runs_dir=str(Path(runs_root).resolve()))
    log.info("comparison folder: %s", manifest.run_dir)
    return execute(spec, manifest, stages=_sweep_models_stages)


def is_sweep_models_folder(folder: Path) -> bool:
    return read_manifest(folder).get("recipe") == "sweep-models"


def _sweep_models_stages(spec, manifest: Manifest) -> None:
    from harness.recipes.sweep import sweep_task
    from harness.sweepfolder import CHOICE_FILE

    top = manifest.run_dir
    winners = []
    for record in manifest.data["models"]:
        root = top / SWEEPS_DIR / record["name"]
        started = sorted(p for p in root.glob("*") if (p / "manifest.json").is_file()) if root.is_dir() else []
        if started and read_manifest(started[0]).get("status") == "completed":
            sweep_dir = started[0]
        elif started:
            log.info("== model %s: resuming its sweep %s", record["name"], started[0])
            sweep_dir = sweep_task(None, [], [], root, Path(manifest.data["runs_dir"]),
                                   storage=manifest.data.get("storage"), resume=started[0])
        else:
            log.info("== model %s (%s): sweep", record["name"], record["base"])
            sweep_dir = sweep_task(str(top / SPEC_FILE), manifest.data["grid"],
                                   model_overrides(record["base"], record["overrides"]), root,
                                   Path(manifest.data["runs_dir"]), storage=manifest.data.get("storage"))
        winners.append(Path(json.loads((sweep_dir / CHOICE_FILE).read_text(encoding="utf-8"))["heldout_run"]))
    _leaderboard_stage(manifest, winners)

