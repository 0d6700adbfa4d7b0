"""Reading run folders for the reports: each folder checked and loaded into a `Run`.

A run folder is read whole (manifest, spec, metrics, predictions, training log) and checked, so that a
damaged folder fails with one line naming the file before anything is rendered.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from harness.errors import RunError
from harness.io import os_error_message
from harness.scoring.metrics import SIMILARITY


@dataclass
class Run:
    """One run folder, read and checked; `train_log` is None when the run left no log."""

    path: Path
    manifest: dict
    spec: dict
    spec_text: str
    metrics: dict
    predictions: list[dict]
    train_log: list[dict] | None
    label: str = ""


def load_runs(path: Path) -> tuple[list[Run], list[dict]]:
    """A run folder (one Run, no comparisons), or an `eval` folder of several candidates: one Run
    per candidate folder (labelled with its name) and the paired comparisons between them."""
    metrics_path = path / "metrics.json"
    if not metrics_path.is_file():
        return [load_run(path)], []
    metrics = read_json_object(metrics_path)
    if "candidates" not in metrics:
        return [load_run(path)], []
    candidates, comparisons = metrics["candidates"], metrics.get("comparisons")
    if not isinstance(candidates, dict) or len(candidates) < 2 or not isinstance(comparisons, list):
        raise RunError(f"{metrics_path}: an eval needs two or more candidates and a list of comparisons")
    runs = []
    for name, entry in candidates.items():
        folder = Path(str(as_dict(entry).get("folder", "")))
        if not folder.parts or folder.is_absolute() or ".." in folder.parts:
            raise RunError(f"{metrics_path}: candidates.{name}.folder must be a folder inside the eval folder")
        run = load_run(path / folder)
        run.label = str(name)
        runs.append(run)
    for i, pair in enumerate(comparisons):
        delta = as_dict(as_dict(pair).get("delta"))
        if as_dict(pair).get("a") not in candidates or pair.get("b") not in candidates or not delta:
            raise RunError(f"{metrics_path}: comparisons[{i}] needs candidates a and b and a delta block")
        for name, stat in delta.items():
            if not _is_estimate(stat):
                raise RunError(f"{metrics_path}: comparisons[{i}].delta.{name} needs a numeric value and ci95 "
                               "[low, high]")
    return runs, comparisons


def load_run(path: Path) -> Run:
    """Read a run folder; anything missing or malformed is a one-line RunError naming the file."""
    if not path.is_dir():
        raise RunError(f"{path}: {'not a folder' if path.exists() else 'no such run folder'}")
    manifest = read_json_object(path / "manifest.json")
    spec_path = path / "spec.yaml"
    spec_text = _read_text(spec_path)
    try:
        spec = yaml.safe_load(spec_text)
    except yaml.YAMLError as exc:
        raise RunError(f"{spec_path}: invalid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(spec, dict):
        raise RunError(f"{spec_path}: expected a YAML mapping")
    metrics_path = path / "metrics.json"
    metrics = read_json_object(metrics_path)
    _check_metrics(metrics_path, metrics)
    log_path = path / "train_log.jsonl"
    return Run(
        path=path,
        manifest=manifest,
        spec=spec,
        spec_text=spec_text,
        metrics=metrics,
        predictions=_read_predictions(path / "predictions.jsonl"),
        train_log=_read_train_log(log_path) if log_path.exists() else None,
    )


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RunError(f"{path}: missing; not a complete run folder") from None
    except UnicodeDecodeError:
        raise RunError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise RunError(os_error_message(path, exc, "read")) from None


def read_json_object(path: Path) -> dict:
    """A run folder's JSON object file; missing, unreadable, invalid or not an object: a one-line RunError."""
    try:
        data = json.loads(_read_text(path))
    except ValueError as exc:
        raise RunError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise RunError(f"{path}: expected a JSON object")
    return data


def as_dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def is_num(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_metrics(path: Path, metrics: dict) -> None:
    """Every metric in base must have a numeric value and CI in base, tuned and delta."""
    names = metrics.get("base")
    if not isinstance(names, dict) or not names:
        raise RunError(f'{path}: no "base" metrics')
    for side in ("base", "tuned", "delta"):
        block = metrics.get(side)
        for name in names:
            if not _is_estimate(block.get(name) if isinstance(block, dict) else None):
                raise RunError(f"{path}: {side}.{name} needs a numeric value and ci95 [low, high]")
    floor = metrics.get("constant_baseline")
    if isinstance(floor, dict):
        deltas = as_dict(floor.get("tuned_minus_baseline"))
        for name in (n for n in SIMILARITY if n in floor or n in deltas):
            if not (_is_estimate(floor.get(name)) and _is_estimate(deltas.get(name))):
                raise RunError(f"{path}: constant_baseline.{name} and constant_baseline.tuned_minus_baseline.{name} "
                               "need a numeric value and ci95 [low, high]")


def _is_estimate(stat) -> bool:
    """{"value": number, "ci95": [low, high]} with finite numbers."""
    ci = stat.get("ci95") if isinstance(stat, dict) else None
    return (is_num(stat.get("value") if isinstance(stat, dict) else None)
            and isinstance(ci, list) and len(ci) == 2 and all(is_num(x) for x in ci))


def _read_predictions(path: Path) -> list[dict]:
    rows = []
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and friends unescaped.
    for lineno, line in enumerate(_read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise RunError(f"{path}:{lineno}: invalid JSON ({exc})") from None
        if not (
            isinstance(row, dict) and "id" in row
            and all(isinstance(row.get(k), str) for k in ("title", "reference", "base", "tuned"))
        ):
            raise RunError(f"{path}:{lineno}: needs an id and string title, reference, base, tuned")
        rows.append(row)
    if not rows:
        raise RunError(f"{path}: no predictions")
    return rows


def _read_train_log(path: Path) -> list[dict]:
    """Parse the loss log leniently: a run killed mid-write leaves a partial last line."""
    entries = []
    for line in _read_text(path).split("\n"):
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries
