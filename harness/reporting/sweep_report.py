"""The sweep report: every trial's validation score, the choice, and the winner's held-out result.

`sweep.html` (self-contained and script-free, like report.html) and `sweep.md` are rendered from
the sweep folder's files alone (manifest, spec, validation.json, trials.jsonl, choice.json and
the winner's metrics.json), so a report can be rendered again at any time.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from harness.io import atomic_write_text
from harness.reporting import figures
from harness.reporting.report import TEMPLATE_ENV
from harness.scoring.metrics import HIGHER_IS_BETTER, METRICS
from harness.scoring.sweep_selection import maximizes, select_label
from harness.sweepfolder import CHOICE_FILE, VALIDATION_FILE, read_trials, sweep_record


def write_sweep_reports(sweep_dir: Path) -> tuple[Path, Path]:
    """Render `sweep.html` and `sweep.md` into the sweep folder; return both paths."""
    sweep_dir = Path(sweep_dir)
    context = build_context(sweep_dir)
    html = TEMPLATE_ENV.get_template("sweep.html.j2").render(**context)
    markdown = TEMPLATE_ENV.get_template("sweep.md.j2").render(**context)
    html_path, md_path = sweep_dir / "sweep.html", sweep_dir / "sweep.md"
    atomic_write_text(html_path, html)
    atomic_write_text(md_path, markdown)
    return html_path, md_path


def build_context(sweep_dir: Path) -> dict:
    manifest, spec = sweep_record(sweep_dir)
    grid = manifest["sweep"]["grid"]
    sweep = spec["sweep"]
    select = sweep["select"]
    trials = read_trials(sweep_dir)
    choice_path = sweep_dir / CHOICE_FILE
    choice = json.loads(choice_path.read_text(encoding="utf-8")) if choice_path.is_file() else None
    validation = json.loads((sweep_dir / VALIDATION_FILE).read_text(encoding="utf-8"))
    roles = {}
    if choice:
        roles = {c["trial"]: role for role, c in (("runner-up", choice["runner_up"]), ("winner", choice["winner"]))
                 if c}
    return {
        "task": str(manifest.get("task", "")), "sweep_id": sweep_dir.name, "status": str(manifest.get("status")),
        "select": select_label(select), "arrow": "↑" if maximizes(select) else "↓",
        # beside the value: base and Δ of the one metric, or each listed metric's paired gain
        "heads": ["Base", "Δ"] if isinstance(select, str) else [f"gain {m}" for m in select],
        "sampler": sweep["sampler"] + (f", {sweep['n_trials']} trials" if sweep["sampler"] == "tpe" else ""),
        "grid": [{"key": k, "values": ", ".join(_fmt_param(v) for v in values)} for k, values in grid.items()],
        "keys": list(grid),
        "validation": validation, "max_loop_share": sweep["max_loop_share"],
        "study": manifest["sweep"].get("study", ""),
        "storage": manifest["sweep"].get("storage") or "study.db (SQLite)",
        "trials": [_row(t, grid, select, roles) for t in trials],
        "choice": _choice(choice, select),
        "heldout": _heldout(choice),
        "plots": _plots(trials, grid, select, roles),
    }


def _fmt_param(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return json.dumps(value) if value is None or isinstance(value, bool) else str(value)


def _num(value, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _row(t: dict, grid: dict, select: str | list[str], roles: dict) -> dict:
    scores = t.get("validation") or {}
    guards = scores.get("guards", {})
    tuned_loop = guards.get("tuned", {}).get("loop_share")
    base_loop = guards.get("base", {}).get("loop_share")
    feasible = "—" if t["feasible"] is None else "yes" if t["feasible"] else "no: " + "; ".join(t["infeasible_because"])
    if isinstance(select, str):
        beside = [_num(scores.get("base", {}).get(select)), _num(scores.get("delta", {}).get(select))]
    else:
        beside = [_num((t.get("gains") or {}).get(m)) for m in select]
    return {"trial": t["trial"], "state": t["state"], "role": roles.get(t["trial"], ""),
            "params": [_fmt_param(t["params"].get(k)) for k in grid], "value": _num(t["value"]), "beside": beside,
            "loops": "—" if tuned_loop is None else f"{tuned_loop:.0%} (base {base_loop:.0%})",
            "feasible": feasible, "retry_of": t.get("retry_of"),
            "seconds": "—" if t.get("seconds") is None else f"{t['seconds']:.0f}"}


def _choice(choice: dict | None, select: str | list[str]) -> dict | None:
    if not choice:
        return None

    def who(c):
        if c is None:
            return None
        gains = "" if isinstance(select, str) else ", ".join(f"{m} {c['gains'][m]:+.2f}" for m in select)
        return {"trial": c["trial"], "overrides": " ".join(c["overrides"]), "value": _num(c["value"]), "gains": gains}

    return {"rule": choice["rule"], "winner": who(choice["winner"]), "runner_up": who(choice["runner_up"]),
            "margin": _num(choice["margin"]), "completed": choice["completed"], "feasible": choice["feasible"],
            "run": choice.get("heldout_run"),
            "given_up": [" ".join(f"{k}={_fmt_param(v)}" for k, v in g["params"].items())
                         for g in choice["given_up"]]}


def _heldout(choice: dict | None) -> dict | None:
    """The winner's held-out headline, once its run folder has metrics."""
    run = Path(choice["heldout_run"]) if choice and choice.get("heldout_run") else None
    if run is None or not (run / "metrics.json").is_file():
        return None
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    rows = []
    for name in (m for m in METRICS if m in metrics["tuned"]):
        lo, hi = metrics["delta"][name]["ci95"]
        rows.append({"name": name, "arrow": "↑" if HIGHER_IS_BETTER[name] else "↓",
                     "base": _num(metrics["base"][name]["value"]), "tuned": _num(metrics["tuned"][name]["value"]),
                     "delta": f"{metrics['delta'][name]['value']:+.2f}", "ci": f"[{lo:+.2f}, {hi:+.2f}]"})
    return {"run": str(run), "report": str(run / "report.html"), "n": metrics["tuned"][rows[0]["name"]]["n"],
            "rows": rows}


# -- plots ------------------------------------------------------------------------------------
def _plots(trials: list[dict], grid: dict, select: str | list[str], roles: dict) -> list[dict]:
    done = [t for t in trials if t["value"] is not None]
    label = select_label(select)
    if isinstance(select, str):
        better = "higher" if HIGHER_IS_BETTER[select] else "lower"
        what = (f"Each completed trial's tuned {select} on the validation slice ({better} is better); grey ticks: "
                "the base model with the same generation settings.")
    else:
        what = (f"Each completed trial's worst paired gain over {', '.join(select)} on the validation slice: the "
                "lowest of the listed metrics' lower 95% CI bounds of tuned − base (sign-flipped where lower is "
                "better); above the line at 0, tuned beat base on every listed metric.")
    return [
        {"id": "plot-trials", "title": f"Validation {label} per trial",
         "alt": f"Validation {label} of each trial; infeasible trials crossed, the winner starred",
         "caption": f"{what} Crossed: infeasible (loop constraint).",
         "src": _trials_plot(done, select, roles) if done else figures.placeholder("no completed trial")},
        {"id": "plot-params", "title": f"Validation {label} by setting",
         "alt": f"Validation {label} against each swept setting",
         "caption": "One panel per swept key: every completed trial at the value it used.",
         "src": _params_plot(done, grid, select, roles) if done else figures.placeholder("no completed trial")},
    ]


def _axis_label(select: str | list[str]) -> str:
    return f"validation {select}" if isinstance(select, str) else f"worst paired gain\n({', '.join(select)})"


def _markers(ax, xs, trials: list[dict], roles: dict) -> None:
    """Feasible trials as dots, infeasible as crosses, the winner as a star."""
    values = np.array([t["value"] for t in trials], dtype=float)
    feasible = np.array([bool(t["feasible"]) for t in trials])
    xs = np.asarray(xs, dtype=float)
    ax.scatter(xs[feasible], values[feasible], s=42, color=figures.PALETTE[0], label="feasible", zorder=3)
    if (~feasible).any():
        ax.scatter(xs[~feasible], values[~feasible], s=56, marker="x", color=figures.PALETTE[3],
                   label="infeasible (loops)", zorder=3)
    winner = [i for i, t in enumerate(trials) if roles.get(t["trial"]) == "winner"]
    if winner:
        ax.scatter(xs[winner], values[winner], s=220, marker="*", color=figures.PALETTE[1], label="winner", zorder=4)


def _trials_plot(trials: list[dict], select: str | list[str], roles: dict) -> str:
    fig = figures.figure(3.4)
    ax = fig.add_subplot()
    numbers = [t["trial"] for t in trials]
    if isinstance(select, str):
        base = [(t["trial"], t["validation"]["base"][select]) for t in trials if t.get("validation")]
        if base:
            ax.scatter(*zip(*base), marker="_", s=260, color=figures.BASE_GREYS[0], label="base", zorder=2)
    else:  # a gain is already relative to base: its line is 0
        ax.axhline(0.0, color=figures.BASE_GREYS[0], linewidth=1, label="tuned = base", zorder=1)
    _markers(ax, numbers, trials, roles)
    ax.set_xticks(numbers, [str(n) for n in numbers])
    ax.set_xlabel("trial")
    ax.set_ylabel(_axis_label(select))
    figures.legend_above(fig, ax)
    figures.style_axes(ax)
    return figures.png(fig)


def _params_plot(trials: list[dict], grid: dict, select: str | list[str], roles: dict) -> str:
    fig = figures.figure(3.2)
    axes = fig.subplots(1, len(grid), squeeze=False)[0]
    for ax, (key, values) in zip(axes, grid.items()):
        labels = [_fmt_param(v) for v in values]
        xs = [labels.index(_fmt_param(t["params"][key])) for t in trials]
        _markers(ax, xs, trials, roles)
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlim(-0.5, len(labels) - 0.5)
        ax.set_xlabel(figures.mpl_text(key))
        figures.style_axes(ax)
    axes[0].set_ylabel(_axis_label(select))
    figures.legend_above(fig, axes[0])
    return figures.png(fig)
