"""Rendering a leaderboard (harness.reporting.leaderboard): `leaderboard.html` and `leaderboard.md`.

The HTML page is self-contained and inert like report.html: inline CSS, plots as PNG data URIs, a
Content-Security-Policy without scripts, every string inserted through jinja2 autoescaping. The Markdown
fits a pull-request comment (under MD_MAX_BYTES), its strings escaped with `report.md_escape`.
"""

from __future__ import annotations


import jinja2
import numpy as np

from harness.reporting.content import significance
from harness.reporting.figures import PALETTE, figure, mpl_text, png
from harness.reporting.report import MD_MAX_BYTES, TEMPLATES, md_escape
from harness.scoring.metrics import DEGENERATION

GUARD_KEYS = (("length_ratio", "length ratio", "ratio"), ("empty_share", "empty", "share"),
              ("truncated_share", "truncated", "share"), ("loop_share", "looping", "share"),
              ("prompt_repeat_share", "repeats prompt", "share"))
MAX_DELTA_PLOTS = 6  # pairs whose per-example deltas are plotted (the first in pair order)

_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATES),
    autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), disabled_extensions=("md.j2",),
                                        default=True),
    undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
_ENV.filters["md"] = md_escape


def render_html(board) -> str:
    return _ENV.get_template("leaderboard.html.j2").render(**context(board), plots=plots(board))


def render_markdown(board) -> str:
    """The summary with every pair's every metric, or (to fit MD_MAX_BYTES) only the ranking metric's pairs."""
    ctx = context(board)
    template = _ENV.get_template("leaderboard.md.j2")
    text = template.render(**ctx, pair_metrics=ctx["metrics"])
    if len(text.encode("utf-8")) >= MD_MAX_BYTES:
        text = template.render(**ctx, pair_metrics=[board.doc["rank_by"]])
    if len(text.encode("utf-8")) >= MD_MAX_BYTES:
        note = "\n\n_Cut to fit; see leaderboard.html and leaderboard.json._\n"
        cut = text.encode("utf-8")[:MD_MAX_BYTES - len(note) - 4].decode("utf-8", errors="ignore")
        text = cut[:cut.rfind("\n")] + note
    return text


# -- numbers as strings -----------------------------------------------------------------------
def _digits(metric: str) -> int:
    return 3 if metric in DEGENERATION else 2


def _est(block: dict | None, metric: str, signed: bool = False, higher: bool = True) -> dict:
    if not block:
        return {"value": "—", "ci": "", "sig": None, "mark": ""}
    d, sign = _digits(metric), "+" if signed else ""
    low, high = block["ci95"]
    sig = significance(block["ci95"], higher) if signed else None
    return {"value": f"{block['value']:{sign}.{d}f}", "ci": f"[{low:{sign}.{d}f}, {high:{sign}.{d}f}]",
            "sig": sig, "mark": ("sig. " + sig) if sig else ("n.s." if signed else "")}


def _wtl(counts: dict | None) -> str:
    return f"{counts['win']}/{counts['tie']}/{counts['loss']}" if counts else "—"


def _amount(value, unit: str = "") -> str:
    """A recorded figure, or `not recorded`: never a made-up number."""
    if value is None:
        return "not recorded"
    if isinstance(value, str):
        return value
    if unit == "bytes":
        for scale, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
            if value >= scale:
                return f"{value / scale:.2f} {name}"
        return f"{value} B"
    if unit == "count":
        return f"{value / 1e6:.1f} M" if value >= 1e6 else f"{value:,}"
    if unit == "s":
        return f"{value:.1f} s"
    if unit == "rate":
        return f"{value:,.0f}"
    return str(value)


def context(board) -> dict:
    doc = board.doc
    names, higher = doc["metrics"], doc["higher_is_better"]
    models = doc["models"]
    rank_by = doc["rank_by"]
    by_name = {m["name"]: m for m in models}
    leaderboard = []
    for row in doc["ranking"][rank_by]:
        m = by_name[row["name"]]
        floor = m["constant_baseline"] or {}
        leaderboard.append({
            "rank": row["rank"], "name": m["name"], "base_model": str(m["base_model"]),
            "prompt": "chat template" if m["prompt_template"] is None else str(m["prompt_template"]),
            "tuned": _est(m["tuned"][rank_by], rank_by), "base": _est(m["base"][rank_by], rank_by),
            "delta": _est(m["delta"][rank_by], rank_by, True, higher[rank_by]),
            "floor": _est(floor.get(rank_by), rank_by),
            "over_floor": _est(floor.get("tuned_minus_baseline", {}).get(rank_by), rank_by, True, higher[rank_by]),
            "not_separated": ", ".join(row["not_separated_from"]) or "—"})
    per_model = [{"name": m["name"], "cells": [{"base": _est(m["base"][k], k), "tuned": _est(m["tuned"][k], k),
                                                  "delta": _est(m["delta"][k], k, True, higher[k])} for k in names]}
                 for m in models]
    pairs = [{"a": p["a"], "b": p["b"],
              "rows": [{"metric": k, "arrow": "↑" if higher[k] else "↓",
                        "tuned": _est(p["tuned"]["delta"].get(k), k, True, higher[k]),
                        "tuned_wtl": _wtl(p["tuned"]["win_tie_loss"].get(k)),
                        "base": _est(p["base"]["delta"].get(k), k, True, higher[k]),
                        "base_wtl": _wtl(p["base"]["win_tie_loss"].get(k)),
                        "omitted": p["omitted"].get(k)} for k in names]}
             for p in doc["pairs"]]
    rankings = [{"metric": k, "arrow": "↑" if higher[k] else "↓",
                 "rows": [{"rank": r["rank"], "name": r["name"], "value": f"{r['value']:.{_digits(k)}f}",
                           "not_separated": ", ".join(r["not_separated_from"]) or "—",
                           "not_comparable": ", ".join(r["not_comparable_with"])} for r in doc["ranking"][k]]}
                for k in names]
    guards = [{"name": m["name"], "cells": [{side: _guard(m["guards"].get(side, {}).get(key), kind)
                                             for side in ("base", "tuned")} for key, _, kind in GUARD_KEYS]}
              for m in models]
    costs = [{"name": m["name"], "device": _amount(m["cost"]["device"]),
              "parameters": _amount(m["cost"]["base_parameters"], "count"),
              "adapter_parameters": _amount(m["cost"]["adapter_parameters"], "count"),
              "adapter_size": _amount(m["cost"]["adapter_bytes"], "bytes"),
              "train_time": _amount(m["cost"]["train_seconds"], "s"),
              "train_rate": _amount(m["cost"]["train_tokens_per_s"], "rate"),
              "peak_memory": _amount(m["cost"]["peak_gpu_memory_bytes"], "bytes"),
              "scoring_rate": _amount(m["cost"]["scoring_tokens_per_s"], "rate")} for m in models]
    return {
        "task": str(doc["task"]), "n": doc["heldout"]["examples"], "split_sha": doc["heldout"]["ids_references_sha256"],
        "rank_by": rank_by, "rank_arrow": "↑" if higher[rank_by] else "↓", "metrics": names,
        "arrows": {k: "↑" if higher[k] else "↓" for k in names},
        "settings": doc["metric_settings"], "leaderboard": leaderboard, "per_model": per_model, "pairs": pairs,
        "rankings": rankings, "guard_heads": [label for _, label, _ in GUARD_KEYS], "guards": guards,
        "costs": costs, "notes": doc["notes"],
        "warnings": [{"name": m["name"], "lines": m["warnings"]} for m in models if m["warnings"]],
        "folders": [{"name": m["name"], "folder": m["folder"]} for m in models],
    }


def _guard(value, kind: str) -> str:
    if not isinstance(value, (int, float)):
        return "—"
    return f"{100 * value:.1f}%" if kind == "share" else f"{value:.2f}"


# -- plots ------------------------------------------------------------------------------------


def plots(board) -> list[dict]:
    return [_cost_plot(board), _delta_plot(board)]


def _cost_plot(board) -> dict:
    """Each metric's tuned score (95% CI) against training seconds, one panel per metric."""
    doc = board.doc
    names = doc["metrics"]
    timed = [m for m in doc["models"] if m["cost"]["train_seconds"] is not None]
    untimed = [m["name"] for m in doc["models"] if m["cost"]["train_seconds"] is None]
    cols = min(5, len(names))
    rows = -(-len(names) // cols)
    fig = figure(2.4 * rows + 0.5, width=2.6 * cols)
    for i, metric in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        for k, m in enumerate(timed):
            est = m["tuned"][metric]
            low, high = est["ci95"]
            ax.errorbar([m["cost"]["train_seconds"]], [est["value"]], capsize=3, fmt="o",
                        yerr=[[max(est["value"] - low, 0)], [max(high - est["value"], 0)]],
                        color=PALETTE[k % len(PALETTE)], label=mpl_text(m["name"]) if i == 0 else None)
        ax.set_title(f"{metric} {'↑' if doc['higher_is_better'][metric] else '↓'}", fontsize=10)
        ax.set_xlabel("training seconds", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    if timed:
        fig.legend(loc="outside upper center", ncols=min(len(timed), 4), frameon=False, fontsize=9)
    caption = "Tuned score with its 95% bootstrap CI against the training time the manifest recorded."
    if untimed:
        caption += f" Not plotted (no training time recorded): {', '.join(untimed)}."
    if "perplexity" in names:
        caption += " Perplexity is per token of each model's own tokenizer."
    return {"id": "plot-cost", "title": "Score against training cost", "caption": caption, "src": png(fig),
            "alt": "Scatter plots of each metric's tuned score against training seconds, one point per model"}


def _delta_plot(board) -> dict:
    """Per-example tuned − tuned of each pair (b − a) on the ranking metric."""
    doc, metric = board.doc, board.doc["rank_by"]
    pairs = doc["pairs"][:MAX_DELTA_PLOTS]
    cols = min(3, len(pairs))
    rows = -(-len(pairs) // cols)
    fig = figure(2.8 * rows, width=3.6 * cols)
    for i, pair in enumerate(pairs):
        deltas = np.array([row[pair["b"]]["tuned"][metric] - row[pair["a"]]["tuned"][metric]
                           for row in board.examples])
        better = deltas if doc["higher_is_better"][metric] else -deltas
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.hist(deltas, bins=int(np.clip(2 * np.sqrt(deltas.size), 10, 40)), color=PALETTE[i % len(PALETTE)])
        ax.axvline(0, color="#222222", linestyle="--", linewidth=1)
        ax.set_title(mpl_text(f"{pair['b']} − {pair['a']}"), fontsize=9)
        ax.set_xlabel(f"{metric}, per example: mean {deltas.mean():+.2f}; b better on {int(np.sum(better > 1e-9))}, "
                      f"worse on {int(np.sum(better < -1e-9))}", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    caption = (f"Per held-out example, the tuned {metric} of the second model minus the first's (sentence-level "
               "scores; the corpus delta and its CI are in the pairwise table).")
    if len(doc["pairs"]) > MAX_DELTA_PLOTS:
        caption += f" The first {MAX_DELTA_PLOTS} of {len(doc['pairs'])} pairs."
    return {"id": "plot-deltas", "title": "Per-example deltas between models", "caption": caption, "src": png(fig),
            "alt": f"Histograms of per-example {metric} differences between the tuned models of each pair"}
