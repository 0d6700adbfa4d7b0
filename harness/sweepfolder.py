"""Sweep folders: `sweeps/<sweep-id>/` holds a sweep's study, its trials' run folders, the validation
slice, every trial's scores and the choice.

The on-disk contract of a sweep folder, like `runfolder` for a run: the sweep recipe writes these files
and the sweep report reads them, by the same names.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from harness.runfolder import SPEC_FILE, read_manifest

TRIALS_DIR, STUDY_FILE = "trials", "study.db"
VALIDATION_FILE, VALIDATION_METRICS, CHOICE_FILE = "validation.json", "validation_metrics.json", "choice.json"
TRIALS_JSONL, TRIALS_CSV = "trials.jsonl", "trials.csv"


def validation_scores(trial_dir: Path) -> dict:
    """The numbers a trial is judged by: metric values (base, tuned, delta), the paired 95% CI of each
    delta, and guards, on validation."""
    metrics = json.loads((trial_dir / VALIDATION_METRICS).read_text(encoding="utf-8"))
    values = {side: {m: block["value"] for m, block in metrics[side].items()} for side in ("base", "tuned", "delta")}
    return {**values, "delta_ci95": {m: block["ci95"] for m, block in metrics["delta"].items()},
            "n": next(iter(metrics["tuned"].values()))["n"], "guards": metrics["guards"]}


def read_trials(sweep_dir: Path) -> list[dict]:
    path = Path(sweep_dir) / TRIALS_JSONL
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def sweep_record(sweep_dir: Path) -> tuple[dict, dict]:
    """(manifest, spec) of a sweep folder, for the report."""
    manifest = read_manifest(sweep_dir)
    spec = yaml.safe_load((Path(sweep_dir) / SPEC_FILE).read_text(encoding="utf-8"))
    return manifest, spec
