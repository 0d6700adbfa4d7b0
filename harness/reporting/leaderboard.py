"""`harness compare`: fine-tunes of different base models on one held-out split, side by side.

Each run (or each candidate of an `eval` folder) is one leaderboard entry: its base and tuned scores,
tuned − base with its paired CI, the constant-answer floor and the guards, as its metrics.json recorded
them, and what it cost, as its manifest recorded it. Between every two entries, tuned − tuned and
base − base are bootstrapped from the outputs on disk with `metrics.paired_comparison`: the same
resample draws for both sides (`resample_counts` depends only on the split size and the metric settings),
corpus BLEU and chrF included. Nothing is compared unless it was scored on the same held-out examples and
references with the same metric settings: otherwise `compare` refuses, in one line naming the difference.

Perplexity is per token of each model's own tokenizer: between models whose tokenizers differ it is
not comparable (a tokenizer that cuts text into more, easier tokens gets a lower perplexity on the same
text), so such pairs leave it out and say why; each entry still shows its own base and tuned perplexity.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harness.errors import RunError
from harness.io import atomic_write_json, atomic_write_text
from harness.models import model_label
from harness.models.adapter_fit import adapter_tensor_shapes
from harness.reporting.loading import Run, load_runs
from harness.runfolder import ADAPTER_DIR
from harness.scoring.metrics import (HIGHER_IS_BETTER, METRICS, MetricSettings, ModelOutputs, paired_comparison,
                                     per_example_from_stats, sufficient_stats)

SCHEMA = "harness.leaderboard/1"
LEADERBOARD_JSON, EXAMPLES_JSONL = "leaderboard.json", "leaderboard_examples.jsonl"
# The spec's metric keys that change a number (the warning thresholds only add warnings).
SCORING_KEYS = ("names", "rouge_stemmer", "bootstrap_replicates", "bootstrap_seed")
PERPLEXITY_ACROSS_TOKENIZERS = ("left out: perplexity is per token of each model's own tokenizer, and these "
                                "tokenizers differ (or one is not recorded), so the values are not comparable")
VALUE_TOLERANCE = 1e-6  # recomputed point values must equal metrics.json's up to float printing


@dataclass
class Entry:
    """One model of the leaderboard: a run-shaped folder and its outputs, aligned to the shared split."""

    name: str
    run: Run
    base: ModelOutputs
    tuned: ModelOutputs

    @property
    def folder(self) -> Path:
        return self.run.path


@dataclass
class Leaderboard:
    doc: dict  # leaderboard.json
    examples: list[dict]  # leaderboard_examples.jsonl: per held-out id, each model's base and tuned scores


def build_leaderboard(folders: list[Path], rank_by: str = "rougeL") -> Leaderboard:
    """Read, check and compare the folders' models (see the module docstring)."""
    runs = _read_runs(folders)
    _check_comparable(runs)
    settings = _metric_settings(runs[0])
    names = [m for m in METRICS if m in runs[0].spec["metrics"]["names"]]
    if rank_by not in names:
        raise RunError(f"--rank-by {rank_by}: not among the runs' metrics.names ({', '.join(names)})")
    order = [str(p["id"]) for p in runs[0].predictions]
    entries = [Entry(name, run, *_outputs(run, order)) for name, run in zip(_entry_names(runs), runs)]
    stats = {e.name: {side: sufficient_stats(getattr(e, side), settings) for side in ("base", "tuned")}
             for e in entries}
    per_example = {e.name: {side: per_example_from_stats(s) for side, s in stats[e.name].items()} for e in entries}
    pairs = [_pair(a, b, stats, settings, names) for a, b in itertools.combinations(entries, 2)]
    for entry in entries:
        _check_reproduces(entry, pairs, names)
    models = [_model_block(e, names) for e in entries]
    doc = {
        "schema": SCHEMA,
        "task": runs[0].manifest.get("task"),
        "heldout": {"examples": len(order), "ids_references_sha256": _split_hash(runs[0]),
                    "heldout_split": _dict(runs[0].manifest.get("fingerprints")).get("heldout_split")},
        "metric_settings": {k: runs[0].spec["metrics"][k] for k in SCORING_KEYS},
        "metrics": names,
        "higher_is_better": {m: HIGHER_IS_BETTER[m] for m in names},
        "rank_by": rank_by,
        "models": models,
        "pairs": [{k: v for k, v in p.items() if not k.startswith("_")} for p in pairs],
        "ranking": {m: _ranking(models, pairs, m) for m in names},
        "notes": _notes(entries, pairs),
    }
    examples = [{"id": order[i], **{e.name: {side: {m: float(per_example[e.name][side][m][i]) for m in names}
                                             for side in ("base", "tuned")} for e in entries}}
                for i in range(len(order))]
    return Leaderboard(doc, examples)


# -- reading and checking ---------------------------------------------------------------------
def _read_runs(folders: list[Path]) -> list[Run]:
    if not folders:
        raise RunError("compare: give two or more run or eval folders")
    seen: set[Path] = set()
    runs = []
    for folder in folders:
        if Path(folder).resolve() in seen:
            raise RunError(f"compare: {folder} is given twice")
        seen.add(Path(folder).resolve())
        for run in load_runs(Path(folder))[0]:
            if run.manifest.get("status") != "completed":
                raise RunError(f"{run.path}: run is {run.manifest.get('status')!r}, not completed; resume it first")
            _check_metric_keys(run)
            runs.append(run)
    if len(runs) < 2:
        raise RunError(f"compare: {folders[0]} holds one model; give two or more run or eval folders")
    return runs


def _check_metric_keys(run: Run) -> None:
    """spec.yaml's scoring settings, and a metrics.json entry for each of its metrics.names."""
    metrics = _dict(run.spec.get("metrics"))
    for key in SCORING_KEYS:
        if key not in metrics:
            raise RunError(f"{run.path / 'spec.yaml'}: metrics.{key} missing; not a run folder's resolved spec")
    for name in metrics["names"]:
        if name not in METRICS or name not in run.metrics["base"]:
            raise RunError(f"{run.path / 'metrics.json'}: no {name!r} scores, though spec.yaml metrics.names lists it")


def _check_comparable(runs: list[Run]) -> None:
    """Refuse, in one line naming the difference, runs not scored on one split with one yardstick."""
    first = runs[0]
    for run in runs[1:]:
        where = f"{run.path} vs {first.path}"
        if run.manifest.get("task") != first.manifest.get("task"):
            raise RunError(f"{where}: different tasks ({run.manifest.get('task')!r} vs {first.manifest.get('task')!r})")
        split = _split_difference(first, run)
        if split:
            raise RunError(f"{where}: different held-out splits ({split}); compare runs scored on one split")
        a, b = _dict(first.spec.get("metrics")), _dict(run.spec.get("metrics"))
        for key in SCORING_KEYS:
            if a.get(key) != b.get(key):
                raise RunError(f"{where}: different metric settings (metrics.{key}: {b.get(key)!r} vs {a.get(key)!r})")
        prints = [_dict(r.manifest.get("fingerprints")).get("metrics") for r in (first, run)]
        if None not in prints and prints[0] != prints[1]:
            raise RunError(f"{where}: different metric settings (fingerprints.metrics: the scorers' settings or "
                           "versions differ, see metrics.json settings)")


def _split_difference(a: Run, b: Run) -> str | None:
    """What differs between two runs' held-out examples (ids, references, the recorded fingerprint), if anything."""
    refs_a = {str(p["id"]): p["reference"] for p in a.predictions}
    refs_b = {str(p["id"]): p["reference"] for p in b.predictions}
    only_b, only_a = len(refs_b.keys() - refs_a.keys()), len(refs_a.keys() - refs_b.keys())
    if only_a or only_b:  # `b vs a`, as the message names them
        return f"held-out ids: {only_b} only in the first, {only_a} only in the second"
    changed = sum(refs_a[k] != refs_b[k] for k in refs_a)
    if changed:
        return f"same ids, {changed} reference(s) differ"
    prints = [_dict(r.manifest.get("fingerprints")).get("heldout_split") for r in (a, b)]
    if None not in prints and prints[0] != prints[1]:
        return "same ids and references, but fingerprints.heldout_split differs (the titles differ)"
    return None


def _split_hash(run: Run) -> str:
    """sha256 of the (id, reference) pairs sorted by id: the split compared, whatever the order of the rows."""
    pairs = sorted([str(p["id"]), p["reference"]] for p in run.predictions)
    return hashlib.sha256(json.dumps(pairs, ensure_ascii=False).encode("utf-8")).hexdigest()


def _metric_settings(run: Run) -> MetricSettings:
    m = run.spec["metrics"]
    return MetricSettings(rouge_stemmer=m["rouge_stemmer"], bootstrap_replicates=m["bootstrap_replicates"],
                          bootstrap_seed=m["bootstrap_seed"])


def _outputs(run: Run, order: list[str]) -> tuple[ModelOutputs, ModelOutputs]:
    """Base and tuned outputs from predictions.jsonl and scores/*_nll.json, in the first run's order."""
    rows = {str(p["id"]): p for p in run.predictions}
    refs = [rows[i]["reference"] for i in order]
    out = []
    for side in ("base", "tuned"):
        path = run.path / "scores" / f"{side}_nll.json"
        try:
            nll = json.loads(path.read_text(encoding="utf-8"))
            by_id = {str(i): (s, n) for i, s, n in zip(nll["ids"], nll["nll_sum"], nll["n_tokens"], strict=True)}
            values = [by_id[i] for i in order]
        except FileNotFoundError:
            raise RunError(f"{path}: missing; a run folder keeps its reference likelihoods there") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RunError(f"{path}: unreadable or does not cover the held-out ids ({type(exc).__name__})") from None
        out.append(ModelOutputs([rows[i][side] for i in order], refs, np.array([v[0] for v in values], dtype=float),
                                np.array([v[1] for v in values])))
    return out[0], out[1]


def _entry_names(runs: list[Run]) -> list[str]:
    """Each entry's model name; an eval's candidates and repeated models add their candidate or folder name."""
    names = []
    for run in runs:
        name = model_label(str(_dict(run.spec.get("model")).get("base", "")))
        names.append(f"{name} · {run.label}" if run.label else name)
    if len(set(names)) < len(names):
        names = [f"{n} · {r.path.name}" if names.count(n) > 1 else n for n, r in zip(names, runs)]
    return names


def _check_reproduces(entry: Entry, pairs: list[dict], names: list[str]) -> None:
    """The outputs on disk must give the scores metrics.json reports, or the pairwise numbers would not
    belong to the tuned and base columns shown beside them."""
    for pair in pairs:
        for role in ("a", "b"):
            if pair[role] != entry.name:
                continue
            for side in ("base", "tuned"):
                for m in names:
                    if m in pair["_values"][side][role]:
                        recorded = entry.run.metrics[side][m]["value"]
                        value = pair["_values"][side][role][m]
                        if not math.isclose(recorded, value, rel_tol=VALUE_TOLERANCE, abs_tol=VALUE_TOLERANCE):
                            raise RunError(f"{entry.folder}: predictions.jsonl and scores/ give {side}.{m} "
                                           f"{value:.6g}, metrics.json says {recorded:.6g}; rescore the run")
            return


# -- statistics -------------------------------------------------------------------------------
def _same_tokenizer(a: Entry, b: Entry) -> bool:
    prints = [_dict(e.run.manifest.get("fingerprints")).get("tokenizer") for e in (a, b)]
    return None not in prints and prints[0] == prints[1]


def _pair(a: Entry, b: Entry, stats: dict, settings: MetricSettings, names: list[str]) -> dict:
    """b − a on tuned and on base outputs, paired on the same examples and bootstrap draws."""
    kept = [m for m in names if m != "perplexity" or _same_tokenizer(a, b)]
    out = {"a": a.name, "b": b.name}
    values = {}
    for side in ("tuned", "base"):
        paired = paired_comparison(getattr(a, side), getattr(b, side), settings,
                                   (stats[a.name][side], stats[b.name][side]))
        out[side] = {"delta": {m: paired["delta"][m] for m in kept},
                     "win_tie_loss": {m: paired["win_tie_loss"][m] for m in kept}}
        values[side] = {"a": {m: paired["a"][m]["value"] for m in kept},
                        "b": {m: paired["b"][m]["value"] for m in kept}}
    out["omitted"] = {m: PERPLEXITY_ACROSS_TOKENIZERS for m in names if m not in kept}
    out["_values"] = values
    return out


def separated(ci95: list[float]) -> bool:
    """A paired delta whose 95% CI excludes zero."""
    return not (ci95[0] <= 0 <= ci95[1])


def _ranking(models: list[dict], pairs: list[dict], metric: str) -> list[dict]:
    """Models by tuned `metric`, best first. `rank` is 1 + the number of models better with the paired CI of
    tuned − tuned clear of zero, so models the CIs do not separate share a rank; `not_separated_from` names
    them. Where a pair has no comparison on the metric (perplexity across tokenizers), it says so."""
    higher = HIGHER_IS_BETTER[metric]
    table = {(p["a"], p["b"]): p for p in pairs}

    def versus(x: str, y: str) -> str:
        """`better`, `worse`, `not separated` (x against y) or `not comparable`."""
        pair, sign = (table[(x, y)], -1) if (x, y) in table else (table[(y, x)], 1)
        delta = pair["tuned"]["delta"].get(metric)  # b − a
        if delta is None:
            return "not comparable"
        if not separated(delta["ci95"]):
            return "not separated"
        x_minus_y = sign * delta["value"]
        return "better" if (x_minus_y > 0) == higher else "worse"

    rows = []
    for m in models:
        others = [o["name"] for o in models if o["name"] != m["name"]]
        verdicts = {o: versus(m["name"], o) for o in others}
        rows.append({"name": m["name"], "value": m["tuned"][metric]["value"],
                     "rank": 1 + sum(v == "worse" for v in verdicts.values()),
                     "not_separated_from": [o for o, v in verdicts.items() if v == "not separated"],
                     "not_comparable_with": [o for o, v in verdicts.items() if v == "not comparable"]})
    return sorted(rows, key=lambda r: (r["rank"], -r["value"] if higher else r["value"]))


def _model_block(entry: Entry, names: list[str]) -> dict:
    run, m = entry.run, entry.run.metrics
    spec_model, prompt = _dict(run.spec.get("model")), _dict(run.spec.get("prompt"))
    return {
        "name": entry.name,
        "folder": str(entry.folder),
        "base_model": spec_model.get("base"),
        "prompt_template": prompt.get("template"),  # null: the model's chat template
        "base": {k: m["base"][k] for k in names},
        "tuned": {k: m["tuned"][k] for k in names},
        "delta": {k: m["delta"][k] for k in names},
        "win_tie_loss": {k: _dict(m.get("win_tie_loss")).get(k) for k in names},
        "constant_baseline": m.get("constant_baseline"),
        "constant_baseline_absent": m.get("constant_baseline_absent") if not m.get("constant_baseline") else None,
        "guards": _dict(m.get("guards")),
        "warnings": [str(w) for w in m.get("warnings") or []],
        "fingerprints": {k: v for k, v in _dict(run.manifest.get("fingerprints")).items()
                         if k in ("base_model", "tokenizer", "prompt", "generation", "adapter")},
        "cost": cost(run),
    }


# -- cost -------------------------------------------------------------------------------------
def cost(run: Run) -> dict:
    """What the manifest recorded about the model's size and the run's cost; null where nothing was recorded
    (runs from before a figure was recorded, training on CPU for peak GPU memory, an eval's adapters)."""
    manifest = run.manifest
    train = _dict(manifest.get("train"))
    tuned = _dict(_dict(manifest.get("scoring_engine")).get("tuned"))
    adapter = _adapter_folder(run)
    seconds, tokens = train.get("seconds"), train.get("train_tokens")
    gen_tokens, gen_s = tuned.get("generated_tokens"), tuned.get("generation_s")
    return {
        "device": manifest.get("device"),
        "world_size": manifest.get("world_size"),
        "base_parameters": train.get("base_parameters"),
        "adapter_parameters": _adapter_parameters(adapter),
        "adapter_bytes": _adapter_bytes(adapter),
        "train_seconds": seconds,
        "train_tokens": tokens,
        "train_tokens_per_s": _rate(tokens, seconds),
        "peak_gpu_memory_bytes": train.get("peak_gpu_memory_bytes"),
        "scoring_generated_tokens": gen_tokens,
        "scoring_seconds": gen_s,
        "scoring_tokens_per_s": _rate(gen_tokens, gen_s),
        "adapter_from": train.get("adapter_from"),  # a sweep's winner: the trial it copied (and its train cost)
    }


def _adapter_folder(run: Run) -> Path | None:
    """The run's adapter/, or the adapter an eval candidate scored (if still on this machine)."""
    if (run.path / ADAPTER_DIR).is_dir():
        return run.path / ADAPTER_DIR
    candidates = run.manifest.get("candidates") or []
    weights = Path(str(_dict(candidates[0]).get("weights", ""))) if len(candidates) == 1 else None
    if weights and _dict(candidates[0]).get("kind") != "merged" and (weights / "adapter_config.json").is_file():
        return weights
    return None


def _adapter_bytes(folder: Path | None) -> int | None:
    files = [p for p in folder.glob("adapter_model.*") if p.is_file()] if folder else []
    return sum(p.stat().st_size for p in files) if files else None


def _adapter_parameters(folder: Path | None) -> int | None:
    if folder is None or not (folder / "adapter_model.safetensors").is_file():
        return None
    return int(sum(math.prod(shape) for shape in adapter_tensor_shapes(folder, allow_pickle=False).values()))


def _rate(amount, seconds) -> float | None:
    ok = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (amount, seconds))
    return float(amount) / float(seconds) if ok and seconds > 0 else None


def _notes(entries: list[Entry], pairs: list[dict]) -> list[str]:
    notes = ["each model is scored with its own tokenizer, prompt and generation settings on the same held-out "
             "examples and references; the pairwise deltas compare what each model writes"]
    if any(p["omitted"] for p in pairs):
        notes.append("perplexity is per token of a model's own tokenizer: it is compared only between models "
                     "with the same tokenizer; read each model's own base → tuned perplexity instead")
    if any(e.run.manifest.get("train", {}).get("adapter_from") for e in entries):
        notes.append("a sweep winner's training cost is its winning trial's; the sweep's other trials are not counted")
    return notes


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


# -- writing ----------------------------------------------------------------------------------
def write_leaderboard(folders: list[Path], out_dir: Path, rank_by: str = "rougeL") -> tuple[dict, list[Path]]:
    """leaderboard.json, leaderboard_examples.jsonl, leaderboard.md and leaderboard.html (rendered before any
    is written, so a failure leaves no half leaderboard); returns leaderboard.json's content and the paths."""
    from harness.reporting.leaderboard_render import render_html, render_markdown

    board = build_leaderboard([Path(f) for f in folders], rank_by)
    html, markdown = render_html(board), render_markdown(board)
    out_dir = Path(out_dir)
    paths = [out_dir / LEADERBOARD_JSON, out_dir / EXAMPLES_JSONL, out_dir / "leaderboard.md",
             out_dir / "leaderboard.html"]
    atomic_write_json(paths[0], board.doc)
    atomic_write_text(paths[1], "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in board.examples))
    atomic_write_text(paths[2], markdown)
    atomic_write_text(paths[3], html)
    return board.doc, paths


def summary_lines(doc: dict) -> list[str]:
    """What the CLI prints: the ranking on the ranking metric, then every pair's tuned − tuned on it."""
    metric = doc["rank_by"]
    lines = [f"ranked by tuned {metric} on {doc['heldout']['examples']} held-out examples:"]
    tuned = {m["name"]: m["tuned"][metric] for m in doc["models"]}
    for row in doc["ranking"][metric]:
        low, high = tuned[row["name"]]["ci95"]
        close = ", ".join(row["not_separated_from"])
        tie = f" (CIs do not separate it from {close})" if close else ""
        lines.append(f"  {row['rank']}. {row['name']}: {row['value']:.2f} [{low:.2f}, {high:.2f}]{tie}")
    for pair in doc["pairs"]:
        delta = pair["tuned"]["delta"].get(metric)
        if delta:
            lines.append(f"  {pair['b']} - {pair['a']}: tuned {metric} {delta['value']:+.2f} "
                         f"(95% CI [{delta['ci95'][0]:+.2f}, {delta['ci95'][1]:+.2f}])")
    return lines


def folder_summary(folder: Path) -> list[str]:
    """What `run --models` and `sweep --models` print: each model's run folder, the ranking, the files."""
    doc = json.loads((Path(folder) / LEADERBOARD_JSON).read_text(encoding="utf-8"))
    lines = [f"comparison folder: {folder}"] + [f"  {m['name']}: {m['folder']}" for m in doc["models"]]
    return lines + summary_lines(doc) + [f"leaderboard: {folder / 'leaderboard.html'}  {folder / 'leaderboard.md'}"]

