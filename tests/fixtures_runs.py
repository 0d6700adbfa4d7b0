"""Synthetic run folders in the shape the `run` command leaves them, for report tests.

Everything that belongs to the base model (ids, titles, references, base outputs and base
metrics) comes from a fixed random stream, so runs made with different seeds are adapters
compared against one shared base; `base_shift` breaks that on purpose.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from harness.scoring.metrics import DEGENERATION, HIGHER_IS_BETTER, METRICS, SIMILARITY

VOCAB = ("soft", "cotton", "navy", "steel", "bottle", "keeps", "drinks", "cold", "lamp", "desk",
         "warm", "light", "durable", "classic", "fit", "washable", "ceramic", "mug", "gift", "travel")
BASE_VALUES = {"rouge1": 31.0, "rouge2": 11.0, "rougeL": 24.0, "rougeLsum": 26.0, "bleu": 6.5,
               "chrf": 33.0, "perplexity": 14.2, "rep4": 0.31, "loops": 0.25, "distinct2": 0.42}
# (delta, ci low, ci high): ROUGE gains and a perplexity drop that are significant, BLEU that is not;
# tuned loops significantly less, repeats itself no more or less (rep4), and is less diverse.
DEFAULT_DELTAS = {"rouge1": (4.1, 2.9, 5.3), "rouge2": (2.2, 1.1, 3.4), "rougeL": (3.6, 2.4, 4.9),
                  "rougeLsum": (3.3, 2.0, 4.5), "bleu": (0.4, -0.6, 1.5), "chrf": (2.8, 1.5, 4.0),
                  "perplexity": (-3.1, -3.9, -2.4), "rep4": (-0.012, -0.041, 0.018),
                  "loops": (-0.125, -0.208, -0.042), "distinct2": (-0.031, -0.055, -0.004)}


def _half_width(metric: str, width: float) -> float:
    """CI half widths in each metric's own scale (degenerate-output metrics are 0-1 shares)."""
    return width / 30 if metric in DEGENERATION else width


def _sentence(rng: np.random.Generator, words: int) -> str:
    return " ".join(rng.choice(VOCAB, size=words)).capitalize() + "."


def _guards(outputs: list[str], references: list[str], truncated: list[bool]) -> dict:
    words = np.array([len(o.split()) for o in outputs], dtype=float)
    ref_words = np.mean([len(r.split()) for r in references])
    return {"mean_tokens": float(words.mean() * 1.3), "mean_words": float(words.mean()),
            "length_ratio": float(words.mean() / ref_words),
            "empty_share": float(np.mean([not o.strip() for o in outputs])),
            "truncated_share": float(np.mean(truncated)), "prompt_repeat_share": 0.0}


def make_run(tmp_path: Path, name: str = "run-a", n: int = 24, *, seed: int = 1, words: int = 14,
             title_words: int = 3, texts: list[dict] | None = None, deltas: dict | None = None, base_shift: float = 0.0,
             warnings: tuple[str, ...] = (), guards: dict | None = None, train_log: bool = True,
             optional: bool = True, task: str = "demo", constant: bool = True) -> Path:
    """Write a complete run folder `tmp_path/name` and return it.

    `texts` overrides fields (texts, scores) of the first examples, `deltas` maps a
    metric to (delta, ci low, ci high), `guards` is merged into the computed guard block,
    `optional=False` leaves out the manifest's optional fingerprints and base_cache, `constant=False`
    the constant-answer block (as in runs scored before metrics.json carried it).
    """
    run = Path(tmp_path) / name
    run.mkdir(parents=True)
    shared, own = np.random.default_rng(0), np.random.default_rng(seed)
    shared_loops, own_loops = np.random.default_rng(100), np.random.default_rng(100 + seed)
    rows = []
    for i in range(n):
        row = {"id": f"ex-{i:04d}", "title": f"Item {i} " + _sentence(shared, title_words),
               "reference": _sentence(shared, words), "base": _sentence(shared, max(1, words - 2)),
               "tuned": _sentence(own, words + int(own.integers(-3, 4)))}
        base_scores = {m: float(shared.uniform(5, 45)) for m in METRICS if m not in DEGENERATION}
        tuned_scores = {m: v + float(own.normal(2.0, 8.0)) for m, v in base_scores.items()}
        row.update(scores={"base": base_scores, "tuned": tuned_scores},
                   base_truncated=bool(shared.random() < 0.05), tuned_truncated=bool(own.random() < 0.05))
        for side, rng in (("base", shared_loops), ("tuned", own_loops)):
            looping = bool(rng.random() < 0.25)
            rep4 = float(rng.uniform(0.5, 0.9) if looping else rng.uniform(0.0, 0.2))
            row[f"{side}_loops"], row[f"{side}_rep4"] = looping, rep4
            row["scores"][side].update(rep4=rep4, loops=float(looping), distinct2=float(rng.uniform(0.3, 1.0)))
        row.update((texts or [])[i] if i < len(texts or []) else {})
        rows.append(row)

    deltas = {**DEFAULT_DELTAS, **(deltas or {})}
    base = {m: v + base_shift for m, v in BASE_VALUES.items()}
    metrics = {
        "base": {m: {"value": v, "ci95": [v - _half_width(m, 1.5), v + _half_width(m, 1.5)], "n": n}
                 for m, v in base.items()},
        "tuned": {m: {"value": base[m] + d, "ci95": [base[m] + d - _half_width(m, 1.4),
                                                     base[m] + d + _half_width(m, 1.4)], "n": n}
                  for m, (d, _, _) in deltas.items()},
        "delta": {m: {"value": d, "ci95": [lo, hi], "n": n} for m, (d, lo, hi) in deltas.items()},
        "win_tie_loss": {m: {"win": n // 2, "tie": n // 6, "loss": n - n // 2 - n // 6} for m in METRICS},
        "higher_is_better": dict(HIGHER_IS_BETTER),
        "settings": {"bootstrap_replicates": 1000, "bootstrap_seed": 0,
                     "sacrebleu": {"bleu": "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.5.1"}},
        "guards": {side: _guards([r[side] for r in rows], [r["reference"] for r in rows],
                                 [r[f"{side}_truncated"] for r in rows]) for side in ("base", "tuned")},
        "warnings": list(warnings),
    }
    if constant:  # one point below base on every similarity metric
        floor = {m: base[m] - 1.0 for m in SIMILARITY}
        metrics["constant_baseline"] = {
            "text_sha256": "9f" * 32, "chars": 180, "source": "train medoid, first 128 train references by id, ROUGE-L",
            **{m: {"value": v, "ci95": [v - 1.2, v + 1.2], "n": n} for m, v in floor.items()},
            "tuned_minus_baseline": {m: {"value": metrics["tuned"][m]["value"] - v,
                                         "ci95": [metrics["tuned"][m]["value"] - v - 1.1,
                                                  metrics["tuned"][m]["value"] - v + 1.1], "n": n}
                                     for m, v in floor.items()}}
    for side in ("base", "tuned"):
        metrics["guards"][side]["loop_share"] = float(np.mean([r[f"{side}_loops"] for r in rows]))
    for side, values in (guards or {}).items():
        metrics["guards"][side].update(values)

    manifest = {
        "run_id": name, "task": task, "status": "completed", "started_at": "2025-01-02T03:04:05+00:00",
        "device": "cuda:0 (NVIDIA H100)", "timings_s": {"prepare": 1.2, "score_base": 30.5, "train": 310.0},
        "data_counts": {"train": 400, "heldout": n}, "python": "3.11.9", "platform": "Linux-x86_64",
        "packages": {"torch": "2.5.1", "transformers": "4.47.0", "bitsandbytes": None},
        "git_commit": "0123456789abcdef0123456789abcdef01234567",
        "train": {"steps": 120, "train_tokens": 51234, "seconds": 305.2},
    }
    if optional:
        manifest["fingerprints"] = {"data": "ab" * 32, "base_model": "cd" * 32}
        manifest["base_cache"] = {"hit": True, "key": "ef" * 8}

    spec = {"name": task, "data": {"path": "tasks/data/amazon_demo.jsonl", "heldout_fraction": 0.1},
            "prompt": {"template": "Write a product description for: {title}"},
            "model": {"base": "HuggingFaceTB/SmolLM2-135M-Instruct"},
            "lora": {"r": 8 * seed, "alpha": 16, "dropout": 0.05}, "train": {"epochs": 1, "lr": 2e-4},
            "generation": {"max_new_tokens": 128}, "metrics": {"bootstrap_replicates": 1000},
            "gate": {"metric": "rougeL", "min_delta": 0.0}}

    (run / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    (run / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    (run / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    (run / "predictions.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    if train_log:
        lines = [{"step": s, "epoch": s / 120, "loss": 2.5 * np.exp(-s / (40 + 20 * seed)) + 0.8,
                  "learning_rate": 2e-4} for s in range(10, 121, 10)]
        lines += [{"step": s, "epoch": s / 120, "eval_loss": 2.4 * np.exp(-s / (50 + 20 * seed)) + 0.9}
                  for s in (40, 80, 120)]
        lines.append({"step": 120, "epoch": 1.0, "train_runtime": 305.2, "train_loss": 1.3})
        (run / "train_log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    return run


def make_scored_run(root: Path, name: str, *, references: list[str], tuned: list[str], base: list[str] | None = None,
                    nll: dict | None = None, model: str = "embedded:smollm2-135m-instruct", tokenizer: str = "tok-a",
                    task: str = "demo", ids: list[str] | None = None, replicates: int = 200,
                    manifest: dict | None = None) -> Path:
    """A completed run folder whose metrics.json, predictions.jsonl and scores/ are computed by the harness's
    own scorers from the texts given (so every number is checkable by hand), as `compare` reads them.

    `nll`: {"base": (nll_sum list, n_tokens list), "tuned": ...} (default: 1 nat per token, 4 tokens each);
    `tokenizer` is the recorded tokenizer fingerprint (perplexity compares only between equal ones)."""
    from dataclasses import asdict

    from harness import fingerprint
    from harness.scoring.heldout_scoring import guards
    from harness.scoring.metrics import MetricSettings, ModelOutputs, per_example_scores, score_outputs
    from harness.spec import MetricsSpec, TaskSpec, spec_to_dict

    n = len(references)
    ids = ids or [f"ex-{i:04d}" for i in range(n)]
    base = base or ["plain words here"] * n
    nll = nll or {side: ([4.0] * n, [4] * n) for side in ("base", "tuned")}
    settings = MetricSettings(bootstrap_replicates=replicates)
    outputs = {side: ModelOutputs(texts, list(references), np.array(nll[side][0], dtype=float),
                                  np.array(nll[side][1]))
               for side, texts in (("base", base), ("tuned", tuned))}
    metrics = score_outputs(outputs["base"], outputs["tuned"], settings)
    titles = [f"Item {i}" for i in range(n)]
    gens = {side: [{"n_tokens": len(t.split()), "hit_max_new_tokens": False} for t in outputs[side].predictions]
            for side in outputs}
    metrics["guards"] = {side: guards(outputs[side].predictions, list(references), titles, gens[side], "Write")
                         for side in outputs}
    metrics["constant_baseline"], metrics["warnings"] = None, []
    metrics["constant_baseline_absent"] = "not computed by this fixture"
    scores = {side: per_example_scores(outputs[side], settings) for side in outputs}

    run = Path(root) / name
    (run / "scores").mkdir(parents=True)
    spec = TaskSpec(name=task, metrics=MetricsSpec(bootstrap_replicates=replicates))
    spec.model.base = model
    spec_dict = spec_to_dict(spec)
    from harness.scoring.metrics import settings_record

    prints = {"heldout_split": fingerprint.hash_json([[i, t, r] for i, t, r in zip(ids, titles, references)]),
              "tokenizer": tokenizer, "base_model": fingerprint.hash_json(model),
              "metrics": fingerprint.hash_json(settings_record(settings)),
              "prompt": fingerprint.hash_json(asdict(spec.prompt))}
    metrics["fingerprints"] = prints
    record = {"run_id": name, "task": task, "status": "completed", "device": "cpu (test)", "world_size": 1,
              "fingerprints": prints, "train": {"steps": 4, "train_tokens": 1000, "seconds": 2.0},
              **(manifest or {})}
    rows = [{"id": ids[i], "title": titles[i], "reference": references[i], "base": base[i], "tuned": tuned[i],
             "scores": {side: {m: float(scores[side][m][i]) for m in METRICS} for side in outputs},
             "base_truncated": False, "tuned_truncated": False} for i in range(n)]
    (run / "manifest.json").write_text(json.dumps(record), encoding="utf-8")
    (run / "spec.yaml").write_text(yaml.safe_dump(spec_dict, sort_keys=False), encoding="utf-8")
    (run / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    (run / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    for side in outputs:
        (run / "scores" / f"{side}_nll.json").write_text(json.dumps(
            {"ids": ids, "nll_sum": list(nll[side][0]), "n_tokens": list(nll[side][1])}), encoding="utf-8")
    return run
