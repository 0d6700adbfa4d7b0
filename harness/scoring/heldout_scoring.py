"""Scoring a run: base and tuned outputs on the held-out split, metrics, guards, predictions.

Generations are appended to `scores/<side>_generations.jsonl` as each batch finishes, so an
interrupted run resumes without regenerating them. Base-model scores are cached under a key
built from every fingerprint that determines them; any change misses the cache.

Under several processes each one generates and scores whole batches of the held-out examples
(harness.distributed), appending to its own part file that rank 0 then folds into the side's file;
rank 0 alone writes scores/ and keeps the base cache.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from harness import distributed, fingerprint, models
from harness.data.prompts import encode_example, encode_prompt, fit_prompts
from harness.distributed import main_only
from harness.errors import ModelError
from harness.io import atomic_write_json, atomic_write_text
from harness.models import base_files
from harness.scoring import degeneration
from harness.scoring.constant_baseline import constant_baseline, floor_warnings
from harness.scoring.decoding import GenerationStats
from harness.scoring.generation import (Generation, batch_rows, generate, left_pad, length_sorted_batches,
                                        plan_prompt_batches, resolve_engine)
from harness.scoring.likelihood import reference_nll
from harness.scoring.metrics import (MetricSettings, ModelOutputs, length_shift_warning, per_example_from_stats,
                                     score_outputs, settings_record, sufficient_stats)

log = logging.getLogger(__name__)
ADAPTER_TOLERANCE = 1e-4


def score_cache_dir() -> Path:
    """`$HARNESS_SCORE_CACHE`, else `<cache>/base_scores`: cached base-model predictions."""
    return Path(os.environ.get("HARNESS_SCORE_CACHE") or base_files.cache_dir() / "base_scores")


def metric_settings(spec) -> MetricSettings:
    return MetricSettings(rouge_stemmer=spec.metrics.rouge_stemmer,
                          bootstrap_replicates=spec.metrics.bootstrap_replicates,
                          bootstrap_seed=spec.metrics.bootstrap_seed)


def read_generations(path: Path) -> dict[str, dict]:
    """Rows already generated (by id); a torn last line from a kill is ignored."""
    rows = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            rows[row["id"]] = row
    return rows


def _drop_torn_tail(path: Path) -> None:
    """A kill mid-write leaves a last line without its newline: cut it, or the next row is glued to it."""
    if path.is_file():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(path, "r+b") as fh:
                fh.truncate(data.rfind(b"\n") + 1)


@main_only
def fold_rank_parts(path: Path) -> None:
    """Rows the processes of a several-process run appended to their part files join `path`."""
    parts = distributed.rank_parts(path)
    if not parts:
        return
    have = read_generations(path)
    _drop_torn_tail(path)
    with open(path, "a", encoding="utf-8") as sink:
        for part in parts:
            for row in read_generations(part).values():
                if row["id"] not in have:
                    sink.write(json.dumps(row, ensure_ascii=False) + "\n")
            sink.flush()
            part.unlink()  # after its rows are written: a kill in between leaves duplicates, read once by id


def generate_sharded(model, tokenizer, prompts: list[str], gen, device, on_done=None,
                     stats: GenerationStats | None = None) -> list[Generation]:
    """`generate` spread over the processes: each decodes whole batches of the one-process batch plan
    (`generation.plan_prompt_batches`), so every output is the one a single process gives on this device; all
    processes get all results. `stats` receives this process's share."""
    if distributed.world_size() == 1:
        return generate(model, tokenizer, prompts, gen, device, on_done=on_done, stats=stats)
    engine = resolve_engine(gen, device, model)
    plan = plan_prompt_batches([len(encode_prompt(tokenizer, p)) for p in prompts], gen, engine)
    mine = distributed.shard_batches(batch.indices for batch in plan)
    results = generate(model, tokenizer, [prompts[i] for i in mine], gen, device, stats=stats,
                       on_done=None if on_done is None else lambda j, result: on_done(mine[j], result))
    return distributed.unshard(mine, results, len(prompts))


def reference_nll_sharded(model, examples, batch_size: int, device, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """`reference_nll` spread over the processes by whole batches; all processes get every value."""
    mine = distributed.shard_batches(length_sorted_batches([len(e.input_ids) for e in examples], batch_size))
    nll, counts = reference_nll(model, [examples[i] for i in mine], batch_size, device, pad_id)
    pairs = distributed.unshard(mine, list(zip(nll.tolist(), counts.tolist())), len(examples))
    return np.array([p[0] for p in pairs], dtype=np.float64), np.array([p[1] for p in pairs], dtype=np.int64)


def assert_adapter_applied(model, tokenizer, prompts: list[str], device) -> float:
    """Fail when the adapter leaves the logits unchanged (an untrained or unapplied adapter)."""
    import torch

    ids, mask = left_pad([encode_prompt(tokenizer, p) for p in prompts], tokenizer.pad_token_id)
    ids, mask = ids.to(device.torch_device), mask.to(device.torch_device)
    with torch.inference_mode():
        tuned = model(input_ids=ids, attention_mask=mask).logits.float()
        with model.disable_adapter():
            base = model(input_ids=ids, attention_mask=mask).logits.float()
    diff = (tuned - base).abs().max().item()
    if not diff > ADAPTER_TOLERANCE:
        raise ModelError(f"the adapter does not change the model (max logit change {diff:.2e} <= "
                         f"{ADAPTER_TOLERANCE:.0e} on probe prompts); refusing to report base numbers twice")
    return diff


def guards(predictions: list[str], references: list[str], titles: list[str], generations: list[dict],
           instruction: str) -> dict:
    """Length and format checks: a metric gain that comes from a format change should be visible.

    `loop_share` is also the `loops` metric's value; it is here for the gate's share limit and the
    loop warning, which judge one model's outputs without a bootstrap."""
    words = np.array([len(p.split()) for p in predictions], dtype=float)
    ref_words = np.array([len(r.split()) for r in references], dtype=float)
    norm = lambda s: " ".join(s.casefold().split())  # noqa: E731
    repeats = [norm(instruction) in norm(p) or (norm(p) != "" and norm(p) == norm(t))
               for p, t in zip(predictions, titles)]
    return {
        "mean_tokens": float(np.mean([g["n_tokens"] for g in generations])),
        "mean_words": float(words.mean()),
        "length_ratio": float(words.mean() / ref_words.mean()),
        "empty_share": float(np.mean([p.strip() == "" for p in predictions])),
        "truncated_share": float(np.mean([g["hit_max_new_tokens"] for g in generations])),
        "prompt_repeat_share": float(np.mean(repeats)),
        "loop_share": float(np.mean([degeneration.loops(p) for p in predictions])),
    }


def guard_warnings(metrics: dict, guard: dict, limits) -> list[str]:
    """Warnings that a score moved for a reason other than better text (`limits`: the spec's MetricsSpec).

    Two come from the real records: a tuned model that writes longer outputs gains chrF by length alone
    (`metrics.length_shift_warning`), and one that writes the same review template for every title still
    gains on a corpus of reviews; distinct-2 falling says the second. A third: tuned that does not clear
    answering every title with one fixed text (`constant_baseline.floor_warnings`)."""
    out = []
    length = length_shift_warning(metrics["delta"], guard["base"]["length_ratio"], guard["tuned"]["length_ratio"],
                                  limits.length_shift_warning)
    if length:
        out.append(length)
    if "distinct2" in metrics["base"] and "distinct2" in metrics["tuned"]:
        base, tuned = metrics["base"]["distinct2"]["value"], metrics["tuned"]["distinct2"]["value"]
        if base > 0 and (base - tuned) / base > limits.diversity_drop_warning:
            out.append(f"tuned outputs are less diverse: distinct-2 {base:.2f} -> {tuned:.2f} "
                       f"({(tuned - base) / base:+.0%}, limit -{limits.diversity_drop_warning:.0%}); generic or "
                       "templated text can still gain on similarity metrics: read the outputs")
    for side in ("base", "tuned"):
        if guard[side]["empty_share"] > 0.05:
            out.append(f"{side}: {guard[side]['empty_share']:.0%} of outputs are empty")
        if guard[side]["truncated_share"] > 0.5:
            out.append(f"{side}: {guard[side]['truncated_share']:.0%} of outputs hit max_new_tokens")
        if guard[side]["prompt_repeat_share"] > 0.1:
            out.append(f"{side}: {guard[side]['prompt_repeat_share']:.0%} of outputs repeat the prompt")
        if guard[side]["loop_share"] > limits.loop_warning:
            out.append(f"{side}: {guard[side]['loop_share']:.0%} of outputs loop (their second half repeats "
                       f"what they already wrote; limit {limits.loop_warning:.0%}); try "
                       "generation.no_repeat_ngram_size or generation.repetition_penalty")
    return out + floor_warnings(metrics.get("constant_baseline"), metrics["tuned"])


class ScoringSession:
    """Everything one run scores, sharing prompts, encodings and fingerprints across sides. `train`: the
    examples the adapter learned from, whose most typical reference is the constant-answer floor."""

    def __init__(self, spec, tokenizer, heldout, run_dir: Path, device, model_ref: str, manifest, *, train: list):
        self.spec, self.tokenizer, self.heldout, self.train = spec, tokenizer, heldout, train
        self.run_dir, self.device, self.model_ref, self.manifest = Path(run_dir), device, model_ref, manifest
        self.scores_dir = self.run_dir / "scores"
        self.scores_dir.mkdir(exist_ok=True)
        # Cut like training's (never skipped: the split, and the rows base and tuned are scored on, stay whole).
        fitted = fit_prompts(tokenizer, spec.prompt, [e.title for e in heldout], spec.train.max_length)
        self.prompts = [f.text for f in fitted]
        self.cut_prompts = [f.text for f in fitted if f.truncated]
        self.encoded = [encode_example(tokenizer, p, e.content, None) for p, e in zip(self.prompts, heldout)]
        self.settings = metric_settings(spec)
        resolve_engine(spec.generation, device)  # a forced engine this device cannot run fails before any work

    # -- fingerprints and the base cache ---------------------------------------------------
    def fingerprints(self) -> dict[str, str]:
        if "fingerprints" not in self.manifest.data:
            prints = {"base_model": fingerprint.model_fingerprint(self.model_ref),
                      "tokenizer": fingerprint.tokenizer_fingerprint(self.tokenizer),
                      "heldout_split": fingerprint.split_fingerprint(self.heldout),
                      **fingerprint.settings_fingerprints(self.spec, settings_record(self.settings),
                                                          self.cut_prompts)}
            self.manifest.update(fingerprints=prints)
        return self.manifest.data["fingerprints"]

    def base_cache_key(self) -> str:
        prints = self.fingerprints()
        parts = {k: prints[k] for k in ("base_model", "tokenizer", "heldout_split", "prompt", "generation")}
        # Numerics differ between bf16 on CUDA and fp32 on CPU: never share a cache across them.
        return fingerprint.hash_json({**parts, "device": self.device.kind, "dtype": str(self.device.dtype)})[:32]

    BASE_FILES = ("base_generations.jsonl", "base_nll.json")

    def score_base(self) -> None:
        key = self.base_cache_key()
        if self._base_from_cache(key):
            return
        model = models.load_model(self.model_ref, self.spec.model, self.tokenizer, self.device)
        self._score_side("base", model)
        self._store_base(key)

    @main_only
    def _base_from_cache(self, key: str) -> bool:
        cached = score_cache_dir() / key
        files = self.BASE_FILES
        if not (all((cached / f).is_file() for f in files)
                and len(read_generations(cached / files[0])) == len(self.heldout)):
            return False
        for f in files:
            shutil.copyfile(cached / f, self.scores_dir / f)
        log.info("base cache hit: reusing base-model predictions and perplexities (%s)", key)
        self.manifest.update(base_cache={"hit": True, "key": key})
        return True

    @main_only
    def _store_base(self, key: str) -> None:
        cached = score_cache_dir() / key
        files = self.BASE_FILES
        tmp = cached.with_name(f".{key}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for f in files:
            shutil.copyfile(self.scores_dir / f, tmp / f)
        shutil.rmtree(cached, ignore_errors=True)
        tmp.rename(cached)
        log.info("base cache miss: stored base scores under %s", key)
        self.manifest.update(base_cache={"hit": False, "key": key})

    def score_tuned(self, adapter_dir: Path) -> None:
        model = models.load_model(self.model_ref, self.spec.model, self.tokenizer, self.device)
        model = models.load_adapter(model, adapter_dir, self.spec.model.allow_pickle)
        change = assert_adapter_applied(model, self.tokenizer, self.prompts[:4], self.device)
        prints = dict(self.fingerprints(), adapter=fingerprint.hash_folder(adapter_dir))
        self.manifest.update(fingerprints=prints, adapter_logit_change=change)
        # Unmerged LoRA doubles generation time on CPU (many small extra matmuls); merging is exact
        # up to float rounding. A 4-bit base cannot be merged and is scored unmerged.
        if not getattr(model, "is_loaded_in_4bit", False):
            model = model.merge_and_unload()
        self._score_side("tuned", model)

    def score_merged(self, model_dir: Path) -> None:
        """A merged model (adapter folded into the weights, made elsewhere) as the tuned side."""
        prints = dict(self.fingerprints(), adapter=fingerprint.hash_folder(model_dir))
        if prints["adapter"] == prints["base_model"]:
            raise ModelError(f"{model_dir}: this is the base model itself; refusing to report base numbers twice")
        model = models.load_model(str(model_dir), self.spec.model, self.tokenizer, self.device)
        self.manifest.update(fingerprints=prints)
        self._score_side("tuned", model)

    def outputs(self, side: str) -> ModelOutputs:
        """One side's scored outputs, e.g. to compare candidates of an `eval` with each other."""
        return self._side(side)[0]

    # -- one side ---------------------------------------------------------------------------
    def _score_side(self, side: str, model) -> None:
        gens_path = self.scores_dir / f"{side}_generations.jsonl"
        fold_rank_parts(gens_path)  # what an interrupted several-process run left
        done = read_generations(gens_path)
        todo = [i for i, e in enumerate(self.heldout) if e.id not in done]
        if done:
            log.info("%s: %d generations already written, %d to go", side, len(done), len(todo))
        if todo:
            part = distributed.part_path(gens_path)
            _drop_torn_tail(part)
            with open(part, "a", encoding="utf-8") as sink:
                def persist(j: int, result: Generation) -> None:
                    row = {"id": self.heldout[todo[j]].id, "text": result.text, "n_tokens": result.n_tokens,
                           "hit_max_new_tokens": result.hit_max_new_tokens}
                    sink.write(json.dumps(row, ensure_ascii=False) + "\n")
                    sink.flush()

                stats = GenerationStats()
                started = time.perf_counter()
                results = generate_sharded(model, self.tokenizer, [self.prompts[i] for i in todo],
                                           self.spec.generation, self.device, on_done=persist, stats=stats)
                seconds = time.perf_counter() - started
            fold_rank_parts(gens_path)
            # What `compare` shows as scoring throughput: the outputs generated by this call (all processes'),
            # and its wall time (warm-up and compilation included).
            throughput = {"generated_outputs": len(todo), "generated_tokens": int(sum(r.n_tokens for r in results)),
                          "generation_s": round(seconds, 3)}
            self.manifest.update(scoring_engine={**self.manifest.data.get("scoring_engine", {}),
                                                 side: {**asdict(stats), "seed": self.spec.generation.seed,
                                                        **throughput}})
        nll_path = self.scores_dir / f"{side}_nll.json"
        if not nll_path.is_file():
            # Only description positions reach the LM head (in chunks), so the engine's batches fit here too.
            rows = batch_rows(self.spec.generation, resolve_engine(self.spec.generation, self.device, model))
            nll, counts = reference_nll_sharded(model, self.encoded, rows, self.device, self.tokenizer.pad_token_id)
            main_only(atomic_write_json)(nll_path, {"ids": [e.id for e in self.heldout], "nll_sum": nll.tolist(),
                                                    "n_tokens": counts.tolist()})

    def _side(self, side: str) -> tuple[ModelOutputs, list[dict]]:
        rows = read_generations(self.scores_dir / f"{side}_generations.jsonl")
        nll = json.loads((self.scores_dir / f"{side}_nll.json").read_text())
        if nll["ids"] != [e.id for e in self.heldout] or len(rows) != len(self.heldout):
            raise ModelError(f"{self.scores_dir}: {side} scores do not cover the held-out split; "
                             "delete the scores folder and resume")
        gens = [rows[e.id] for e in self.heldout]
        outputs = ModelOutputs([g["text"] for g in gens], [e.content for e in self.heldout],
                               np.array(nll["nll_sum"]), np.array(nll["n_tokens"]))
        return outputs, gens

    def write_results(self, metrics_path: Path) -> None:
        """The metrics (with CIs, guards and warnings) to `metrics_path` and `predictions.jsonl` (each example
        with its scores), from one read of the scores on disk and one scoring of each side."""
        sides = {side: self._side(side) for side in ("base", "tuned")}
        stats = tuple(sufficient_stats(outputs, self.settings) for outputs, _ in sides.values())
        atomic_write_json(metrics_path, self._metrics(sides, stats))
        self._write_predictions(sides, [per_example_from_stats(s) for s in stats])

    def _metrics(self, sides: dict, stats: tuple[dict, dict]) -> dict:
        (base, base_gens), (tuned, tuned_gens) = sides["base"], sides["tuned"]
        result = score_outputs(base, tuned, self.settings, stats)
        names = self.spec.metrics.names
        for section in ("base", "tuned", "delta", "win_tie_loss", "higher_is_better"):
            result[section] = {k: v for k, v in result[section].items() if k in names}
        titles = [e.title for e in self.heldout]
        refs = [e.content for e in self.heldout]
        result["guards"] = {side: guards(out.predictions, refs, titles, gens, self.spec.prompt.instruction)
                            for side, out, gens in (("base", base, base_gens), ("tuned", tuned, tuned_gens))}
        result["constant_baseline"], absent = constant_baseline(self.train, tuned, stats[1], self.settings, names)
        if absent:
            result["constant_baseline_absent"] = absent
        result["warnings"] = guard_warnings(result, result["guards"], self.spec.metrics)
        result["fingerprints"] = self.manifest.data.get("fingerprints", {})
        return result

    def _write_predictions(self, sides: dict, per_example: list[dict]) -> None:
        (base, base_gens), (tuned, tuned_gens) = sides["base"], sides["tuned"]
        base_scores, tuned_scores = per_example
        names = self.spec.metrics.names
        lines = []
        for i, e in enumerate(self.heldout):
            lines.append(json.dumps({
                "id": e.id, "title": e.title, "reference": e.content,
                "base": base.predictions[i], "tuned": tuned.predictions[i],
                "scores": {"base": {m: float(base_scores[m][i]) for m in names},
                           "tuned": {m: float(tuned_scores[m][i]) for m in names}},
                "base_truncated": base_gens[i]["hit_max_new_tokens"],
                "tuned_truncated": tuned_gens[i]["hit_max_new_tokens"],
                "base_loops": bool(base_scores["loops"][i]), "tuned_loops": bool(tuned_scores["loops"][i]),
                "base_rep4": float(base_scores["rep4"][i]), "tuned_rep4": float(tuned_scores["rep4"][i]),
            }, ensure_ascii=False))
        atomic_write_text(self.run_dir / "predictions.jsonl", "\n".join(lines) + "\n")
