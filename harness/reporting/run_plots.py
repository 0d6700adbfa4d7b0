"""The run report's plots: corpus metrics, per-example ROUGE-L changes, output lengths, training loss."""

from __future__ import annotations

import numpy as np

from harness.reporting.content import TIE, ordered_metrics, rouge_delta
from harness.reporting.figures import (BASE_GREYS, PALETTE, REFERENCE_COLOR, figure, legend_above, mpl_text,
                                      placeholder, png, style_axes)
from harness.reporting.loading import Run, is_num
from harness.scoring.metrics import DEGENERATION


def _tuned_label(run: Run, multi: bool) -> str:
    return mpl_text(run.label) if multi else "tuned"


def _bars_plot(runs: list[Run], shared_base: bool) -> str:
    multi = len(runs) > 1
    bases = [runs[0]] if shared_base else runs
    series = [("base" if len(bases) == 1 else f"base · {mpl_text(r.label)}", BASE_GREYS[k % len(BASE_GREYS)],
               r.metrics["base"]) for k, r in enumerate(bases)]
    series += [(_tuned_label(r, multi), PALETTE[k % len(PALETTE)], r.metrics["tuned"])
               for k, r in enumerate(runs)]
    names = [n for n in ordered_metrics(runs[0].metrics["base"])
             if n not in DEGENERATION and all(n in block for _, _, block in series)]
    groups = [(g, label) for g, label in (
        ([n for n in names if n != "perplexity"], "score (0–100), higher is better"),
        ([n for n in names if n == "perplexity"], "perplexity, lower is better")) if g]
    fig = figure(3.9)
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
        style_axes(ax)
        if g == 0:
            legend_above(fig, ax)
    return png(fig)


def _delta_plot(runs: list[Run]) -> str:
    multi = len(runs) > 1
    series = []
    for k, run in enumerate(runs):
        deltas = np.array([d for row in run.predictions if (d := rouge_delta(row)) is not None])
        if deltas.size:
            series.append((_tuned_label(run, multi), PALETTE[k % len(PALETTE)], deltas))
    if not series:
        return placeholder("no per-example ROUGE-L scores")
    values = np.concatenate([d for _, _, d in series])
    low, high = float(values.min()), float(values.max())
    if low == high:
        low, high = low - 1, high + 1
    bins = np.linspace(low, high, int(np.clip(2 * np.sqrt(values.size / len(series)), 10, 50)) + 1)
    fig = figure(3.4)
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
    fig = figure(3.4)
    ax = fig.add_subplot()
    for label, color, counts in series:
        ax.hist(np.clip(counts, 0, top), bins=bins, histtype="step", linewidth=1.8, color=color,
                label=f"{label} (mean {counts.mean():.1f} words)")
    return _finish_histogram(fig, ax, "words per text (the longest 1% are counted in the last bin)")


def _finish_histogram(fig, ax, xlabel: str) -> str:
    ax.set_xlabel(xlabel)
    ax.set_ylabel("examples")
    legend_above(fig, ax)
    style_axes(ax)
    return png(fig)


def _loss_plot(runs: list[Run]) -> str:
    multi = len(runs) > 1
    curves = []
    for k, run in enumerate(runs):
        log = run.train_log or []
        train = [(e["step"], e["loss"]) for e in log if is_num(e.get("step")) and is_num(e.get("loss"))]
        evals = [(e["step"], e["eval_loss"]) for e in log
                 if is_num(e.get("step")) and is_num(e.get("eval_loss"))]
        if train or evals:
            curves.append((run.label, PALETTE[k % len(PALETTE)], train, evals))
    if not curves:
        no_log = all(r.train_log is None for r in runs)
        return placeholder("no training log" if no_log else "no loss values in the training log")
    fig = figure(3.4)
    ax = fig.add_subplot()
    for label, color, train, evals in curves:
        prefix = f"{mpl_text(label)}: " if multi else ""
        if train:
            ax.plot(*zip(*train), color=color, linewidth=1.6, label=f"{prefix}train loss")
        if evals:
            ax.plot(*zip(*evals), color=color, linestyle="--", marker="o", markersize=4,
                    linewidth=1.4, label=f"{prefix}eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    legend_above(fig, ax)
    style_axes(ax)
    return png(fig)


def plots(runs: list[Run], shared_base: bool) -> list[dict]:
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
