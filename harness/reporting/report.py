"""Reports people want to read: one run (base vs tuned) or several adapters against one base.

An `eval` folder of several candidates is read as its candidates side by side, plus a table of
the candidates against each other (paired deltas with 95% CIs).

`write_reports` renders two files from finished run folders:

* `report.html` -- one self-contained page: inline CSS, matplotlib plots as PNG data URIs and
  a Content-Security-Policy that forbids every fetch and every script but our own filter, so
  it opens offline and stays inert whatever the model wrote. Model text is only ever inserted
  through jinja2 autoescaping.
* `report.md` -- the same numbers as a compact GitHub-flavoured summary, always under
  `MD_MAX_BYTES`, with every piece of model/data text escaped so it renders as text.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import jinja2
import numpy as np
import yaml
from markupsafe import Markup
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from harness.errors import RunError
from harness.io import atomic_write_text, os_error_message
from harness.scoring.metrics import DEGENERATION, HIGHER_IS_BETTER, METRICS, SIMILARITY, length_shift_warning

TEMPLATES = Path(__file__).parent / "templates"
MD_MAX_BYTES = 60_000
LENGTH_SHIFT = 0.5  # runs without warnings in metrics.json: metrics.length_shift_warning's default
HIGHLIGHTS = 5  # most improved / most regressed examples per run in the HTML
TIE = 1e-9  # per-example ROUGE-L deltas within this are ties
# Markdown fallbacks, tried in order until the summary fits MD_MAX_BYTES:
# (characters kept per text, warnings listed per run, best/worst examples per run).
MD_LEVELS = ((300, 20, 3), (120, 10, 3), (60, 5, 1), (0, 3, 0))
GUARDS = (
    ("empty_share", "Empty outputs", "share"),
    ("truncated_share", "Truncated outputs (hit the token limit)", "share"),
    ("length_ratio", "Length ratio (output words / reference words)", "ratio"),
    ("prompt_repeat_share", "Outputs repeating the prompt", "share"),
    ("mean_words", "Mean words per output", "count"),
    ("mean_tokens", "Mean tokens per output", "count"),
)
# Degenerate-output metrics (0-1 scale): their own section, three decimals.
DEGENERATION_LABELS = {"rep4": "rep-4", "loops": "Looping outputs", "distinct2": "distinct-2"}
PALETTE = ("#2f6fde", "#e07b28", "#2a9d5b", "#c23b3b", "#7b52c7", "#8c5a3c", "#d45aa8", "#1fa3b5")
BASE_GREYS = ("#8a8f98", "#b3b8c0", "#6b7079", "#cfd3d9")
REFERENCE_COLOR = "#222222"
_LENGTH_WARNING = re.compile(r"length\s+(shift|ratio)", re.IGNORECASE)
_MD_ESCAPES = {
    "\\": "\\\\", "&": "&amp;", "<": "&lt;", ">": "&gt;", "|": "\\|", "`": "\\`",
    "[": "\\[", "]": "\\]", "*": "\\*", "_": "\\_", "~": "\\~",
}


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


def write_reports(run_dirs: list[Path], out_dir: Path) -> tuple[Path, Path]:
    """Render `report.html` and `report.md` for `run_dirs` into `out_dir`; return both paths.

    Both are rendered before either is written, so a bad run folder leaves no half report.
    """
    if not run_dirs:
        raise RunError("no run folders given to report on")
    loaded = [load_runs(Path(d)) for d in run_dirs]
    runs = [run for folder_runs, _ in loaded for run in folder_runs]
    comparisons = [pair for _, pairs in loaded for pair in pairs]
    labels = [r.label or str(r.manifest.get("run_id") or r.path.name) for r in runs]
    if len(set(labels)) < len(labels):
        labels = [f"{i}. {label}" for i, label in enumerate(labels, 1)]
    for run, label in zip(runs, labels):
        run.label = label
    context = build_context(runs, comparisons)
    html = render_html(context)
    markdown = render_markdown(context)
    out_dir = Path(out_dir)
    html_path, md_path = out_dir / "report.html", out_dir / "report.md"
    atomic_write_text(html_path, html)
    atomic_write_text(md_path, markdown)
    return html_path, md_path


# --- reading run folders -------------------------------------------------------------------


def load_runs(path: Path) -> tuple[list[Run], list[dict]]:
    """A run folder (one Run, no comparisons), or an `eval` folder of several candidates: one Run
    per candidate folder (labelled with its name) and the paired comparisons between them."""
    metrics_path = path / "metrics.json"
    if not metrics_path.is_file():
        return [load_run(path)], []
    metrics = _read_json_object(metrics_path)
    if "candidates" not in metrics:
        return [load_run(path)], []
    candidates, comparisons = metrics["candidates"], metrics.get("comparisons")
    if not isinstance(candidates, dict) or len(candidates) < 2 or not isinstance(comparisons, list):
        raise RunError(f"{metrics_path}: an eval needs two or more candidates and a list of comparisons")
    runs = []
    for name, entry in candidates.items():
        folder = Path(str(_dict(entry).get("folder", "")))
        if not folder.parts or folder.is_absolute() or ".." in folder.parts:
            raise RunError(f"{metrics_path}: candidates.{name}.folder must be a folder inside the eval folder")
        run = load_run(path / folder)
        run.label = str(name)
        runs.append(run)
    for i, pair in enumerate(comparisons):
        delta = _dict(_dict(pair).get("delta"))
        if _dict(pair).get("a") not in candidates or pair.get("b") not in candidates or not delta:
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
    manifest = _read_json_object(path / "manifest.json")
    spec_path = path / "spec.yaml"
    spec_text = _read_text(spec_path)
    try:
        spec = yaml.safe_load(spec_text)
    except yaml.YAMLError as exc:
        raise RunError(f"{spec_path}: invalid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(spec, dict):
        raise RunError(f"{spec_path}: expected a YAML mapping")
    metrics_path = path / "metrics.json"
    metrics = _read_json_object(metrics_path)
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


def _read_json_object(path: Path) -> dict:
    try:
        data = json.loads(_read_text(path))
    except ValueError as exc:
        raise RunError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise RunError(f"{path}: expected a JSON object")
    return data


def _is_num(value) -> bool:
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
        deltas = _dict(floor.get("tuned_minus_baseline"))
        for name in (n for n in SIMILARITY if n in floor or n in deltas):
            if not (_is_estimate(floor.get(name)) and _is_estimate(deltas.get(name))):
                raise RunError(f"{path}: constant_baseline.{name} and constant_baseline.tuned_minus_baseline.{name} "
                               "need a numeric value and ci95 [low, high]")


def _is_estimate(stat) -> bool:
    """{"value": number, "ci95": [low, high]} with finite numbers."""
    ci = stat.get("ci95") if isinstance(stat, dict) else None
    return (_is_num(stat.get("value") if isinstance(stat, dict) else None)
            and isinstance(ci, list) and len(ci) == 2 and all(_is_num(x) for x in ci))


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


# --- numbers and views ---------------------------------------------------------------------


def significance(ci95: list[float], higher_is_better: bool) -> str | None:
    """"better"/"worse" when the delta's 95% CI excludes zero, else None (not significant)."""
    low, high = ci95
    if low <= 0 <= high:
        return None
    return "better" if (low > 0) == higher_is_better else "worse"


def _higher(run: Run, name: str) -> bool:
    value = _dict(run.metrics.get("higher_is_better")).get(name)
    return value if isinstance(value, bool) else HIGHER_IS_BETTER.get(name, True)


def _ordered(names) -> list[str]:
    names = list(names)
    return [m for m in METRICS if m in names] + [m for m in names if m not in METRICS]


def _digits(name: str) -> int:
    return 3 if name in DEGENERATION else 2


def _stat(block: dict, digits: int = 2) -> dict:
    low, high = block["ci95"]
    return {"value": f"{block['value']:.{digits}f}", "ci": f"[{low:.{digits}f}, {high:.{digits}f}]"}


def _delta(block: dict, higher: bool, digits: int = 2) -> dict:
    low, high = block["ci95"]
    return {"value": f"{block['value']:+.{digits}f}", "ci": f"[{low:+.{digits}f}, {high:+.{digits}f}]",
            "sig": significance(block["ci95"], higher)}


def _wtl(run: Run, name: str) -> dict | None:
    counts = _dict(run.metrics.get("win_tie_loss")).get(name)
    if isinstance(counts, dict) and all(isinstance(counts.get(k), int) for k in ("win", "tie", "loss")):
        return counts
    return None


def _headline(runs: list[Run]) -> list[dict]:
    """Quality metrics, one row each; degenerate-output metrics have their own section."""
    rows = []
    for name in _ordered(n for n in runs[0].metrics["base"] if n not in DEGENERATION):
        higher = _higher(runs[0], name)
        cells = []
        for run in runs:
            m = run.metrics
            if name not in m["base"]:
                cells.append(None)
                continue
            cells.append({"base": _stat(m["base"][name]), "tuned": _stat(m["tuned"][name]),
                          "delta": _delta(m["delta"][name], _higher(run, name)), "wtl": _wtl(run, name)})
        rows.append({"name": name, "arrow": "↑" if higher else "↓", "runs": cells})
    return rows


def _floor(runs: list[Run]) -> list[dict]:
    """Per run, the constant answer (metrics.json `constant_baseline`) next to base and tuned on the
    similarity metrics, or why there is none."""
    out = []
    for run in runs:
        m, block = run.metrics, run.metrics.get("constant_baseline")
        if not isinstance(block, dict):
            absent = m.get("constant_baseline_absent") or "not measured (scored before metrics.json carried it)"
            out.append({"label": run.label, "absent": str(absent), "rows": []})
            continue
        deltas = block["tuned_minus_baseline"]
        names = [n for n in SIMILARITY if n in deltas and n in m["base"] and n in m["tuned"]]
        out.append({"label": run.label, "absent": None, "sha": str(block.get("text_sha256", ""))[:12],
                    "chars": _plain(block.get("chars")),
                    "rows": [{"name": n, "base": _stat(m["base"][n]), "tuned": _stat(m["tuned"][n]),
                              "constant": _stat(block[n]), "delta": _delta(deltas[n], _higher(run, n))}
                             for n in names]})
    return out


def _pairwise(runs: list[Run], comparisons: list[dict]) -> dict:
    """An eval's candidates against each other: per metric and pair, b − a with its paired 95% CI
    and win/tie/loss (b beats / equals / trails a)."""
    names = _ordered(dict.fromkeys(m for pair in comparisons for m in pair["delta"]))
    rows = []
    for name in names:
        higher = _higher(runs[0], name)
        cells = [{"delta": _delta(pair["delta"][name], higher),
                  "wtl": _dict(pair.get("win_tie_loss")).get(name)} if name in pair["delta"] else None
                 for pair in comparisons]
        rows.append({"name": name, "arrow": "↑" if higher else "↓", "cells": cells})
    return {"pairs": [{"a": str(p["a"]), "b": str(p["b"])} for p in comparisons], "rows": rows}


def _verdict(run: Run) -> dict:
    verdict = {"better": [], "worse": [], "unclear": []}
    for name in _ordered(run.metrics["base"]):
        sig = significance(run.metrics["delta"][name]["ci95"], _higher(run, name))
        verdict[sig or "unclear"].append(name)
    return verdict


def _comparability(runs: list[Run]) -> tuple[list[str], bool]:
    """Why the runs may not be comparable, and whether they share one base (scores and ids)."""
    first, problems, shared = runs[0], [], True
    first_ids = {str(p["id"]) for p in first.predictions}
    for run in runs[1:]:
        a, b = first.metrics["base"], run.metrics["base"]
        differ = [n for n in _ordered({**a, **b}) if n not in a or n not in b
                  or not math.isclose(a[n]["value"], b[n]["value"], rel_tol=1e-9, abs_tol=1e-9)]
        if differ:
            shared = False
            problems.append(f"{run.label}: base metrics differ from {first.label} ({', '.join(differ)})")
        ids = {str(p["id"]) for p in run.predictions}
        if ids != first_ids:
            shared = False
            problems.append(f"{run.label}: held-out ids differ from {first.label} "
                            f"({len(ids - first_ids)} only here, {len(first_ids - ids)} missing)")
        if run.manifest.get("task") != first.manifest.get("task"):
            problems.append(f"{run.label}: task {run.manifest.get('task')!r} differs from "
                            f"{first.label}'s {first.manifest.get('task')!r}")
    return problems, shared


def _warnings(run: Run) -> list[str]:
    """metrics.json warnings and the manifest's long-prompt counts, plus the length-shift warning for runs
    scored before metrics.json carried it."""
    raw = run.metrics.get("warnings") or []
    warnings = [str(w) for w in (raw if isinstance(raw, list) else [raw])]
    long_prompts = _long_prompt_warning(run.manifest)
    warnings += [long_prompts] if long_prompts else []
    guards = _dict(run.metrics.get("guards"))
    base = _dict(guards.get("base")).get("length_ratio")
    tuned = _dict(guards.get("tuned")).get("length_ratio")
    if not (_is_num(base) and _is_num(tuned)) or any(_LENGTH_WARNING.search(w) for w in warnings):
        return warnings
    length = length_shift_warning(_dict(run.metrics.get("delta")), base, tuned, LENGTH_SHIFT)
    return warnings + [length] if length else warnings


def _long_prompt_warning(manifest: dict) -> str | None:
    """Titles cut (or left out of training) to fit train.max_length, from the manifest's `long_prompts`."""
    record = _dict(manifest.get("long_prompts"))
    train, heldout = _dict(record.get("train")), _dict(record.get("heldout"))
    counts = [(train.get("truncated"), "train titles cut"), (train.get("skipped"), "train examples skipped"),
              (heldout.get("truncated"), "held-out titles cut")]
    named = [f"{n} {what}" for n, what in counts if _is_num(n) and n > 0]
    if not named:
        return None
    return (f"long prompts: {', '.join(named)} to fit train.max_length {record.get('max_length')} (prompts of at "
            f"most {record.get('max_prompt_tokens')} tokens; train.long_prompts: {record.get('policy')})")


def _guard_value(value, kind: str) -> str:
    if not _is_num(value):
        return "—"
    return {"share": f"{100 * value:.1f}%", "ratio": f"{value:.2f}", "count": f"{value:.1f}"}[kind]


def _guards(runs: list[Run]) -> list[dict]:
    rows = []
    for key, label, kind in GUARDS:
        cells = []
        for run in runs:
            guards = _dict(run.metrics.get("guards"))
            cells.append({side: _guard_value(_dict(guards.get(side)).get(key), kind)
                          for side in ("base", "tuned")})
        rows.append({"label": label, "runs": cells})
    return rows


def _degeneration(runs: list[Run], shared_base: bool) -> dict:
    """Per model rep-4 / looping share / distinct-2 with CIs and paired deltas, and per model its
    most repetitive looping output, so the numbers come with what they measure."""
    names = [n for n in DEGENERATION if n in runs[0].metrics["base"]]
    multi = len(runs) > 1

    def cells(run: Run, side: str) -> list[dict | None]:
        block = run.metrics[side]
        if side == "delta":
            return [_delta(block[n], _higher(run, n), _digits(n)) if n in block else None for n in names]
        return [_stat(block[n], _digits(n)) if n in block else None for n in names]

    rows, examples = [], []
    for k, run in enumerate(runs):
        if k == 0 or not shared_base:
            label = f"Base · {run.label}" if multi and not shared_base else "Base"
            rows.append({"label": label, "kind": "base", "cells": cells(run, "base")})
            examples.append(_looping_example(run, "base", label))
        label = run.label if multi else "Tuned"
        rows.append({"label": label, "kind": "tuned", "cells": cells(run, "tuned")})
        rows.append({"label": f"Δ {label if multi else 'tuned'} − base", "kind": "delta",
                     "cells": cells(run, "delta")})
        examples.append(_looping_example(run, "tuned", label))
    columns = [{"name": n, "label": DEGENERATION_LABELS[n], "arrow": "↑" if _higher(runs[0], n) else "↓"}
               for n in names]
    return {"columns": columns, "rows": rows, "examples": examples}


def _looping_example(run: Run, side: str, model: str) -> dict:
    """The looping output of one model with the highest rep-4 (the first on ties), or why there is none."""
    flag, rep4 = f"{side}_loops", f"{side}_rep4"
    if not any(flag in p for p in run.predictions):
        return {"model": model, "note": "looping not recorded in predictions.jsonl", "example": None}
    looping = [p for p in run.predictions if p.get(flag) is True]
    note = f"{len(looping)} of {len(run.predictions)} outputs loop"
    if not looping:
        return {"model": model, "note": note, "example": None}
    row = max(looping, key=lambda p: p[rep4] if _is_num(p.get(rep4)) else 0.0)
    return {"model": model, "note": note,
            "example": {"id": str(row["id"]), "title": row["title"], "text": row[side],
                        "rep4": f"{row[rep4]:.3f}" if _is_num(row.get(rep4)) else "—",
                        "truncated": bool(row.get(f"{side}_truncated"))}}


def _scores(row: dict, side: str) -> dict[str, float]:
    scores = row.get("scores")
    scores = scores.get(side) if isinstance(scores, dict) else None
    return {k: float(v) for k, v in scores.items() if _is_num(v)} if isinstance(scores, dict) else {}


def rouge_delta(row: dict) -> float | None:
    """Per-example ROUGE-L tuned - base, or None when the row has no ROUGE-L scores."""
    base, tuned = _scores(row, "base").get("rougeL"), _scores(row, "tuned").get("rougeL")
    return None if base is None or tuned is None else tuned - base


def _state(delta: float | None) -> str:
    if delta is None:
        return ""
    return "up" if delta > TIE else "down" if delta < -TIE else "tie"


def _example(run: Run, row: dict) -> dict:
    base, tuned = _scores(row, "base"), _scores(row, "tuned")
    scores = []
    for name in _ordered(n for n in base if n in tuned):
        gain = (tuned[name] - base[name]) * (1 if _higher(run, name) else -1)
        scores.append({"name": name, "base": f"{base[name]:.2f}", "tuned": f"{tuned[name]:.2f}",
                       "delta": f"{tuned[name] - base[name]:+.2f}", "state": _state(gain)})
    delta = rouge_delta(row)
    return {"id": str(row["id"]), "title": row["title"], "reference": row["reference"],
            "base": row["base"], "tuned": row["tuned"],
            "base_truncated": bool(row.get("base_truncated")),
            "tuned_truncated": bool(row.get("tuned_truncated")),
            "rouge": f"{base['rougeL']:.2f} → {tuned['rougeL']:.2f}" if delta is not None else "",
            "delta": f"{delta:+.2f}" if delta is not None else "", "state": _state(delta),
            "scores": scores}


def _highlights(run: Run) -> dict:
    """Most improved and most regressed examples by ROUGE-L delta (ties and unscored left out)."""
    scored = [(d, i, row) for i, row in enumerate(run.predictions) if (d := rouge_delta(row)) is not None]
    improved = sorted((x for x in scored if x[0] > TIE), key=lambda x: (-x[0], x[1]))
    regressed = sorted((x for x in scored if x[0] < -TIE), key=lambda x: (x[0], x[1]))
    keep = max(HIGHLIGHTS, max(level[2] for level in MD_LEVELS))
    return {"improved": [_example(run, row) for _, _, row in improved[:keep]],
            "regressed": [_example(run, row) for _, _, row in regressed[:keep]]}


def _all_examples(runs: list[Run]) -> list[dict]:
    """One row per held-out id (union over runs, first run's order), outputs per run."""
    rows: dict[str, dict] = {}
    for k, run in enumerate(runs):
        for p in run.predictions:
            key = str(p["id"])
            if key not in rows:
                rows[key] = {"id": key, "title": p["title"], "reference": p["reference"],
                             "base": p["base"], "base_truncated": bool(p.get("base_truncated")),
                             "outputs": [None] * len(runs), "flags": set()}
            row, delta = rows[key], rouge_delta(p)
            rouge = "" if delta is None else (f"{_scores(p, 'base')['rougeL']:.1f} → "
                                              f"{_scores(p, 'tuned')['rougeL']:.1f} ({delta:+.1f})")
            row["outputs"][k] = {"text": p["tuned"], "truncated": bool(p.get("tuned_truncated")),
                                 "state": _state(delta), "rouge": rouge}
            if p.get("base_truncated") or p.get("tuned_truncated"):
                row["flags"].add("truncated")
            if not p["base"].strip() or not p["tuned"].strip():
                row["flags"].add("empty")
            if p.get("base_loops") is True or p.get("tuned_loops") is True:
                row["flags"].add("loops")
    for row in rows.values():
        row["flags"] = " ".join(sorted(row["flags"]))
    return list(rows.values())


def _plain(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def _union_rows(dicts: list[dict], fmt=_plain) -> list[dict]:
    """Key/value tables across runs: one row per key, one value per run ("—" where absent)."""
    keys = list(dict.fromkeys(k for d in dicts for k in d))
    return [{"label": str(k), "values": [fmt(d[k]) if k in d else "—" for d in dicts]} for k in keys]


def _base_cache(manifest: dict) -> str:
    cache = manifest.get("base_cache")
    if not isinstance(cache, dict):
        return "not recorded"
    return f"{'hit' if cache.get('hit') else 'miss'} ({_plain(cache.get('key'))})"


def _environment(runs: list[Run]) -> dict:
    manifests = [r.manifest for r in runs]
    fields = (
        ("Run id", lambda m: m.get("run_id")), ("Task", lambda m: m.get("task")),
        ("Status", lambda m: m.get("status")), ("Started", lambda m: m.get("started_at")),
        ("Device", lambda m: m.get("device")), ("Git commit", lambda m: m.get("git_commit")),
        ("Python", lambda m: m.get("python")), ("Platform", lambda m: m.get("platform")),
        ("Base-score cache", _base_cache),
        ("Scored candidates", lambda m: ", ".join(str(_dict(c).get("path")) for c in m.get("candidates") or [])
         or None),
        ("Train steps", lambda m: _dict(m.get("train")).get("steps")),
        ("Train tokens", lambda m: _dict(m.get("train")).get("train_tokens")),
        ("Train seconds", lambda m: _dict(m.get("train")).get("seconds")),
    )
    return {
        "general": [{"label": label, "values": [_plain(get(m)) for m in manifests]} for label, get in fields],
        "timings": _union_rows([_dict(m.get("timings_s")) for m in manifests],
                               lambda s: f"{s:.1f} s" if _is_num(s) else _plain(s)),
        "data_counts": _union_rows([_dict(m.get("data_counts")) for m in manifests]),
        "long_prompts": _union_rows([_flatten(m["long_prompts"]) if _dict(m.get("long_prompts")) else {}
                                     for m in manifests]),
        "packages": _union_rows([_dict(m.get("packages")) for m in manifests],
                                lambda v: "not installed" if v is None else _plain(v)),
        "fingerprints": _union_rows([_dict(m.get("fingerprints")) for m in manifests]),
    }


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict) and value:
        out = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def _spec_differences(runs: list[Run]) -> list[dict]:
    """Spec settings that differ between the runs (what makes the adapters different)."""
    flat = [_flatten(r.spec) for r in runs]
    rows = _union_rows(flat, lambda v: json.dumps(v, ensure_ascii=False))
    return [row for row in rows if len(set(row["values"])) > 1]


def _model_check(manifest: dict) -> str:
    """Which prompt format the run used and the base model's probe perplexity (models.check_base_probe)."""
    prompt, probe = _dict(manifest.get("prompt_template")), _dict(manifest.get("base_probe"))
    template = f"{prompt['template']} ({prompt.get('source')})" if prompt.get("template") else "not recorded"
    if not _is_num(probe.get("perplexity")):
        return f"prompt: {template} · probe perplexity: not recorded"
    note = (" (random weights on purpose)" if probe.get("random_weights") else
            f" (expected {probe['expected']:g})" if _is_num(probe.get("expected")) else "")
    return f"prompt: {template} · base model probe perplexity {probe['perplexity']:.1f}{note}"


def build_context(runs: list[Run], comparisons: list[dict] = ()) -> dict:
    """Everything both templates show, as pre-formatted strings (templates only lay out);
    `comparisons` are an eval's candidates against each other (metrics.json `comparisons`)."""
    problems, shared_base = _comparability(runs)
    tasks = {str(r.manifest.get("task") or r.spec.get("name") or "") for r in runs}
    first = runs[0]
    model = _dict(first.spec.get("model")).get("base")
    return {
        "task": tasks.pop() if len(tasks) == 1 else "several tasks",
        "model": _plain(model),
        "model_check": _model_check(first.manifest),
        "runs": [{"label": r.label, "color": PALETTE[k % len(PALETTE)],
                  "n": len(r.predictions), "status": _plain(r.manifest.get("status")),
                  "started": _plain(r.manifest.get("started_at")), "device": _plain(r.manifest.get("device")),
                  "verdict": _verdict(r), "warnings": _warnings(r), "highlights": _highlights(r),
                  "spec_text": r.spec_text,
                  "settings": yaml.safe_dump(_dict(r.metrics.get("settings")), sort_keys=False,
                                             allow_unicode=True)}
                 for k, r in enumerate(runs)],
        "multi": len(runs) > 1,
        "highlight_count": HIGHLIGHTS,
        "shared_base": shared_base,
        "problems": problems,
        "headline": _headline(runs),
        "floor": _floor(runs),
        "guards": _guards(runs),
        "degeneration": _degeneration(runs, shared_base),
        "examples": _all_examples(runs),
        "plots": _plots(runs, shared_base),
        "spec_differences": _spec_differences(runs) if len(runs) > 1 else [],
        "environment": _environment(runs),
        "pairwise": _pairwise(runs, list(comparisons)) if comparisons else None,
    }


# --- plots ---------------------------------------------------------------------------------


def _figure(height: float = 3.6) -> Figure:
    fig = Figure(figsize=(10, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)  # explicit Agg: never touch pyplot's global backend
    return fig


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _placeholder(message: str) -> str:
    fig = _figure(1.3)
    fig.text(0.5, 0.5, message, ha="center", va="center", fontsize=14, color="#5b6472")
    return _png(fig)


def _mpl(text: str) -> str:
    """A run label as matplotlib text: `$` would start mathtext; long ids would swamp legends."""
    text = text if len(text) <= 40 else text[:39] + "…"
    return text.replace("$", r"\$")


def _style(ax) -> None:
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _tuned_label(run: Run, multi: bool) -> str:
    return _mpl(run.label) if multi else "tuned"


def _legend(fig: Figure, ax) -> None:
    """Legend above the axes (never over the data), as many columns as long labels allow."""
    handles, labels = ax.get_legend_handles_labels()
    widest = max(len(label) for label in labels)
    ncols = max(1, min(len(labels), 4, int(10 / (0.075 * widest + 0.8))))
    fig.legend(handles, labels, loc="outside upper center", ncols=ncols, frameon=False, fontsize=9)


def _bars_plot(runs: list[Run], shared_base: bool) -> str:
    multi = len(runs) > 1
    bases = [runs[0]] if shared_base else runs
    series = [("base" if len(bases) == 1 else f"base · {_mpl(r.label)}", BASE_GREYS[k % len(BASE_GREYS)],
               r.metrics["base"]) for k, r in enumerate(bases)]
    series += [(_tuned_label(r, multi), PALETTE[k % len(PALETTE)], r.metrics["tuned"])
               for k, r in enumerate(runs)]
    names = [n for n in _ordered(runs[0].metrics["base"])
             if n not in DEGENERATION and all(n in block for _, _, block in series)]
    groups = [(g, label) for g, label in (
        ([n for n in names if n != "perplexity"], "score (0–100), higher is better"),
        ([n for n in names if n == "perplexity"], "perplexity, lower is better")) if g]
    fig = _figure(3.9)
    grid = fig.add_gridspec(1, 5)
    width = 0.8 / len(series)
    for g, (group, ylabel) in enumerate(groups):
        span = grid[0, :] if len(groups) == 1 else grid[0, :4] if g == 0 else grid[0, 4]
        ax = fig.add_subplot(span)
        for i, (label, color, block) in enumerate(series):
            x = np.arange(len(group)) + (i - (len(series) - 1) / 2) * width
            values = np.array([block[n]["value"] for n in group])
            low = np.array([block[n]["ci95"][0] for n in group])
            high = np.array([block[n]["ci95"][1] for n in group])
            err = np.vstack([np.clip(values - low, 0, None), np.clip(high - values, 0, None)])
            ax.bar(x, values, width, yerr=err, capsize=3, color=color, label=label,
                   error_kw={"elinewidth": 1, "ecolor": "#333333"})
        ax.set_xticks(np.arange(len(group)), group)
        ax.set_ylabel(ylabel)
        _style(ax)
        if g == 0:
            _legend(fig, ax)
    return _png(fig)


def _delta_plot(runs: list[Run]) -> str:
    multi = len(runs) > 1
    series = []
    for k, run in enumerate(runs):
        deltas = np.array([d for row in run.predictions if (d := rouge_delta(row)) is not None])
        if deltas.size:
            series.append((_tuned_label(run, multi), PALETTE[k % len(PALETTE)], deltas))
    if not series:
        return _placeholder("no per-example ROUGE-L scores")
    values = np.concatenate([d for _, _, d in series])
    low, high = float(values.min()), float(values.max())
    if low == high:
        low, high = low - 1, high + 1
    bins = np.linspace(low, high, int(np.clip(2 * np.sqrt(values.size / len(series)), 10, 50)) + 1)
    fig = _figure(3.4)
    ax = fig.add_subplot()
    for label, color, deltas in series:
        ups, downs = int(np.sum(deltas > TIE)), int(np.sum(deltas < -TIE))
        ax.hist(deltas, bins=bins, color=color, histtype="step" if multi else "stepfilled",
                alpha=1 if multi else 0.75, linewidth=1.8,
                label=f"{label}: mean {deltas.mean():+.2f}, {ups} better / {downs} worse")
    ax.axvline(0, color="#222222", linestyle="--", linewidth=1)
    return _finish_histogram(fig, ax, "ROUGE-L, tuned − base, per example")


def _length_plot(runs: list[Run]) -> str:
    multi, first = len(runs) > 1, runs[0]

    def words(field: str, run: Run) -> np.ndarray:
        return np.array([len(row[field].split()) for row in run.predictions], dtype=float)

    series = [("reference", REFERENCE_COLOR, words("reference", first)),
              ("base", BASE_GREYS[0], words("base", first))]
    series += [(_tuned_label(r, multi), PALETTE[k % len(PALETTE)], words("tuned", r)) for k, r in enumerate(runs)]
    top = max(1.0, float(np.percentile(np.concatenate([w for _, _, w in series]), 99)))
    bins = np.linspace(0, top, 31)
    fig = _figure(3.4)
    ax = fig.add_subplot()
    for label, color, counts in series:
        ax.hist(np.clip(counts, 0, top), bins=bins, histtype="step", linewidth=1.8, color=color,
                label=f"{label} (mean {counts.mean():.1f} words)")
    return _finish_histogram(fig, ax, "words per text (the longest 1% are counted in the last bin)")


def _finish_histogram(fig, ax, xlabel: str) -> str:
    ax.set_xlabel(xlabel)
    ax.set_ylabel("examples")
    _legend(fig, ax)
    _style(ax)
    return _png(fig)


def _loss_plot(runs: list[Run]) -> str:
    multi = len(runs) > 1
    curves = []
    for k, run in enumerate(runs):
        log = run.train_log or []
        train = [(e["step"], e["loss"]) for e in log if _is_num(e.get("step")) and _is_num(e.get("loss"))]
        evals = [(e["step"], e["eval_loss"]) for e in log
                 if _is_num(e.get("step")) and _is_num(e.get("eval_loss"))]
        if train or evals:
            curves.append((run.label, PALETTE[k % len(PALETTE)], train, evals))
    if not curves:
        no_log = all(r.train_log is None for r in runs)
        return _placeholder("no training log" if no_log else "no loss values in the training log")
    fig = _figure(3.4)
    ax = fig.add_subplot()
    for label, color, train, evals in curves:
        prefix = f"{_mpl(label)}: " if multi else ""
        if train:
            ax.plot(*zip(*train), color=color, linewidth=1.6, label=f"{prefix}train loss")
        if evals:
            ax.plot(*zip(*evals), color=color, linestyle="--", marker="o", markersize=4,
                    linewidth=1.4, label=f"{prefix}eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    _legend(fig, ax)
    _style(ax)
    return _png(fig)


def _plots(runs: list[Run], shared_base: bool) -> list[dict]:
    without_log = [r.label for r in runs if r.train_log is None]
    loss_caption = "Training loss (solid) and eval loss (dashed) per logged step."
    if without_log:
        loss_caption += f" No training log for: {', '.join(without_log)}."
    return [
        {"id": "plot-metrics", "title": "Corpus metrics",
         "alt": "Bar chart of corpus metrics, base vs tuned, with 95% confidence whiskers",
         "caption": "Corpus scores with 95% bootstrap confidence intervals; perplexity on its own axis.",
         "src": _bars_plot(runs, shared_base)},
        {"id": "plot-deltas", "title": "Per-example ROUGE-L change",
         "alt": "Histogram of per-example ROUGE-L deltas, tuned minus base",
         "caption": "Right of the dashed line: tuned beats base on that example.",
         "src": _delta_plot(runs)},
        {"id": "plot-lengths", "title": "Output lengths",
         "alt": "Histograms of output lengths in words: reference, base and tuned",
         "caption": "A tuned model that wins ROUGE by writing much longer or shorter text shows up here.",
         "src": _length_plot(runs)},
        {"id": "plot-loss", "title": "Training", "alt": "Training and eval loss curves",
         "caption": loss_caption, "src": _loss_plot(runs)},
    ]


# --- rendering -----------------------------------------------------------------------------


def md_escape(text, limit: int | None = None) -> str:
    """Model/data text as inert Markdown: one line, at most `limit` chars, markup escaped."""
    text = " ".join(str(text).split())
    if limit is not None and len(text) > limit:
        text = text[: max(limit - 1, 0)].rstrip() + "…"
    text = "".join(_MD_ESCAPES.get(c, c) for c in text)
    return "\\" + text if text.startswith("#") else text


_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATES),
    autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), disabled_extensions=("md.j2",),
                                        default=True),
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)
_ENV.filters["md"] = md_escape


def render_html(context: dict) -> str:
    """The page; its only script is our filter, allowed by hash in the page's CSP."""
    script = (TEMPLATES / "filter.js").read_text(encoding="utf-8")
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    return _ENV.get_template("report.html.j2").render(
        **context, script=Markup(script), script_hash=f"sha256-{digest}")


def render_markdown(context: dict) -> str:
    """The summary at the most detailed level that fits MD_MAX_BYTES (cut hard as a last resort)."""
    template = _ENV.get_template("report.md.j2")
    for text_limit, max_warnings, per_side in MD_LEVELS:
        text = template.render(**context, text_limit=text_limit, max_warnings=max_warnings,
                               per_side=per_side)
        if len(text.encode("utf-8")) < MD_MAX_BYTES:
            return text
    note = "\n\n_Summary cut to fit; see report.html._\n"
    budget = MD_MAX_BYTES - len(note.encode("utf-8")) - 4
    cut = text.encode("utf-8")[:budget].decode("utf-8", errors="ignore")
    return cut[: cut.rfind("\n")] + note
