"""What the run report shows, pre-formatted for the templates: headline metrics with their intervals, the
floor, guards, degenerate outputs, examples, warnings, the environment and the spec differences.

`build_context` assembles it all from loaded runs (harness/reporting/loading.py); the plots come from
harness/reporting/run_plots.py and the rendering from harness/reporting/report.py.
"""

from __future__ import annotations

import json
import math
import re

import yaml

from harness.reporting.figures import PALETTE
from harness.reporting.loading import Run, as_dict, is_num
from harness.scoring.metrics import DEGENERATION, HIGHER_IS_BETTER, METRICS, SIMILARITY, length_shift_warning

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
_LENGTH_WARNING = re.compile(r"length\s+(shift|ratio)", re.IGNORECASE)


def significance(ci95: list[float], higher_is_better: bool) -> str | None:
    """"better"/"worse" when the delta's 95% CI excludes zero, else None (not significant)."""
    low, high = ci95
    if low <= 0 <= high:
        return None
    return "better" if (low > 0) == higher_is_better else "worse"


def _higher(run: Run, name: str) -> bool:
    value = as_dict(run.metrics.get("higher_is_better")).get(name)
    return value if isinstance(value, bool) else HIGHER_IS_BETTER.get(name, True)


def ordered_metrics(names) -> list[str]:
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
    counts = as_dict(run.metrics.get("win_tie_loss")).get(name)
    if isinstance(counts, dict) and all(isinstance(counts.get(k), int) for k in ("win", "tie", "loss")):
        return counts
    return None


def _headline(runs: list[Run]) -> list[dict]:
    """Quality metrics, one row each; degenerate-output metrics have their own section."""
    rows = []
    for name in ordered_metrics(n for n in runs[0].metrics["base"] if n not in DEGENERATION):
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
    names = ordered_metrics(dict.fromkeys(m for pair in comparisons for m in pair["delta"]))
    rows = []
    for name in names:
        higher = _higher(runs[0], name)
        cells = [{"delta": _delta(pair["delta"][name], higher),
                  "wtl": as_dict(pair.get("win_tie_loss")).get(name)} if name in pair["delta"] else None
                 for pair in comparisons]
        rows.append({"name": name, "arrow": "↑" if higher else "↓", "cells": cells})
    return {"pairs": [{"a": str(p["a"]), "b": str(p["b"])} for p in comparisons], "rows": rows}


def _verdict(run: Run) -> dict:
    verdict = {"better": [], "worse": [], "unclear": []}
    for name in ordered_metrics(run.metrics["base"]):
        sig = significance(run.metrics["delta"][name]["ci95"], _higher(run, name))
        verdict[sig or "unclear"].append(name)
    return verdict


def _comparability(runs: list[Run]) -> tuple[list[str], bool]:
    """Why the runs may not be comparable, and whether they share one base (scores and ids)."""
    first, problems, shared = runs[0], [], True
    first_ids = {str(p["id"]) for p in first.predictions}
    for run in runs[1:]:
        a, b = first.metrics["base"], run.metrics["base"]
        differ = [n for n in ordered_metrics({**a, **b}) if n not in a or n not in b
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
    guards = as_dict(run.metrics.get("guards"))
    base = as_dict(guards.get("base")).get("length_ratio")
    tuned = as_dict(guards.get("tuned")).get("length_ratio")
    if not (is_num(base) and is_num(tuned)) or any(_LENGTH_WARNING.search(w) for w in warnings):
        return warnings
    length = length_shift_warning(as_dict(run.metrics.get("delta")), base, tuned, LENGTH_SHIFT)
    return warnings + [length] if length else warnings


def _long_prompt_warning(manifest: dict) -> str | None:
    """Titles cut (or left out of training) to fit train.max_length, from the manifest's `long_prompts`."""
    record = as_dict(manifest.get("long_prompts"))
    train, heldout = as_dict(record.get("train")), as_dict(record.get("heldout"))
    counts = [(train.get("truncated"), "train titles cut"), (train.get("skipped"), "train examples skipped"),
              (heldout.get("truncated"), "held-out titles cut")]
    named = [f"{n} {what}" for n, what in counts if is_num(n) and n > 0]
    if not named:
        return None
    return (f"long prompts: {', '.join(named)} to fit train.max_length {record.get('max_length')} (prompts of at "
            f"most {record.get('max_prompt_tokens')} tokens; train.long_prompts: {record.get('policy')})")


def _guard_value(value, kind: str) -> str:
    if not is_num(value):
        return "—"
    return {"share": f"{100 * value:.1f}%", "ratio": f"{value:.2f}", "count": f"{value:.1f}"}[kind]


def _guards(runs: list[Run]) -> list[dict]:
    rows = []
    for key, label, kind in GUARDS:
        cells = []
        for run in runs:
            guards = as_dict(run.metrics.get("guards"))
            cells.append({side: _guard_value(as_dict(guards.get(side)).get(key), kind)
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
    row = max(looping, key=lambda p: p[rep4] if is_num(p.get(rep4)) else 0.0)
    return {"model": model, "note": note,
            "example": {"id": str(row["id"]), "title": row["title"], "text": row[side],
                        "rep4": f"{row[rep4]:.3f}" if is_num(row.get(rep4)) else "—",
                        "truncated": bool(row.get(f"{side}_truncated"))}}


def _scores(row: dict, side: str) -> dict[str, float]:
    scores = row.get("scores")
    scores = scores.get(side) if isinstance(scores, dict) else None
    return {k: float(v) for k, v in scores.items() if is_num(v)} if isinstance(scores, dict) else {}


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
    for name in ordered_metrics(n for n in base if n in tuned):
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
        ("Scored candidates", lambda m: ", ".join(str(as_dict(c).get("path")) for c in m.get("candidates") or [])
         or None),
        ("Train steps", lambda m: as_dict(m.get("train")).get("steps")),
        ("Train tokens", lambda m: as_dict(m.get("train")).get("train_tokens")),
        ("Train seconds", lambda m: as_dict(m.get("train")).get("seconds")),
    )
    return {
        "general": [{"label": label, "values": [_plain(get(m)) for m in manifests]} for label, get in fields],
        "timings": _union_rows([as_dict(m.get("timings_s")) for m in manifests],
                               lambda s: f"{s:.1f} s" if is_num(s) else _plain(s)),
        "data_counts": _union_rows([as_dict(m.get("data_counts")) for m in manifests]),
        "long_prompts": _union_rows([_flatten(m["long_prompts"]) if as_dict(m.get("long_prompts")) else {}
                                     for m in manifests]),
        "packages": _union_rows([as_dict(m.get("packages")) for m in manifests],
                                lambda v: "not installed" if v is None else _plain(v)),
        "fingerprints": _union_rows([as_dict(m.get("fingerprints")) for m in manifests]),
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
    """Which prompt format the run used and the base model's probe perplexity
    (harness.models.base_files.check_base_probe)."""
    prompt, probe = as_dict(manifest.get("prompt_template")), as_dict(manifest.get("base_probe"))
    template = f"{prompt['template']} ({prompt.get('source')})" if prompt.get("template") else "not recorded"
    if not is_num(probe.get("perplexity")):
        return f"prompt: {template} · probe perplexity: not recorded"
    note = (" (random weights on purpose)" if probe.get("random_weights") else
            f" (expected {probe['expected']:g})" if is_num(probe.get("expected")) else "")
    return f"prompt: {template} · base model probe perplexity {probe['perplexity']:.1f}{note}"


def build_context(runs: list[Run], comparisons: list[dict] = ()) -> dict:
    """Everything both templates show but the plots, as pre-formatted strings (templates only lay out);
    `comparisons` are an eval's candidates against each other (metrics.json `comparisons`)."""
    problems, shared_base = _comparability(runs)
    tasks = {str(r.manifest.get("task") or r.spec.get("name") or "") for r in runs}
    first = runs[0]
    model = as_dict(first.spec.get("model")).get("base")
    return {
        "task": tasks.pop() if len(tasks) == 1 else "several tasks",
        "model": _plain(model),
        "model_check": _model_check(first.manifest),
        "runs": [{"label": r.label, "color": PALETTE[k % len(PALETTE)],
                  "n": len(r.predictions), "status": _plain(r.manifest.get("status")),
                  "started": _plain(r.manifest.get("started_at")), "device": _plain(r.manifest.get("device")),
                  "verdict": _verdict(r), "warnings": _warnings(r), "highlights": _highlights(r),
                  "spec_text": r.spec_text,
                  "settings": yaml.safe_dump(as_dict(r.metrics.get("settings")), sort_keys=False,
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
        "spec_differences": _spec_differences(runs) if len(runs) > 1 else [],
        "environment": _environment(runs),
        "pairwise": _pairwise(runs, list(comparisons)) if comparisons else None,
    }
