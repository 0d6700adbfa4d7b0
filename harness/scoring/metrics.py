"""Corpus metrics with paired bootstrap confidence intervals.

Every metric is reduced to per-example sufficient statistics whose column sums determine
the corpus score. Any bootstrap resample is then a weighted sum (a count matrix times the
statistics), so thousands of replicates cost a few matrix products instead of re-running
the scorers, and base and tuned are resampled with the *same* example draws (paired).
The one exception is distinct-2, which counts each n-gram once across examples: its statistic
is an example x n-gram incidence, and a resample recounts the n-grams held by a drawn example
(centred on the full-sample value: `degeneration.DistinctNgrams.bootstrap` says why).

Corpus values reproduce the reference implementations: ROUGE is rouge-score's F-measure
averaged over examples (as rouge-score and HF `evaluate` report it), BLEU and chrF equal
sacrebleu's `corpus_bleu` / `corpus_chrf`, and perplexity is token-weighted. Degenerate
output (harness.scoring.degeneration, on a 0-1 scale): rep4 is the mean seq-rep-4, loops the share of
looping outputs, distinct2 the corpus distinct-2.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass

import numpy as np
from rouge_score import rouge_scorer, tokenizers
from sacrebleu.metrics import BLEU, CHRF

from harness.errors import MetricError
from harness.scoring import degeneration

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
DEGENERATION = ("rep4", "loops", "distinct2")
METRICS = (*ROUGE_TYPES, "bleu", "chrf", "perplexity", *DEGENERATION)
SIMILARITY = (*ROUGE_TYPES, "bleu", "chrf")  # overlap with the reference: length alone can move them
LOWER_IS_BETTER = ("perplexity", "rep4", "loops")
HIGHER_IS_BETTER = {name: name not in LOWER_IS_BETTER for name in METRICS}
# Means of per-example values: the corpus score is the column sum over the number of examples.
_MEANS = (*ROUGE_TYPES, "rep4", "loops")

# Sentence boundary: whitespace after terminal punctuation, or a line break. nltk's punkt
# model (what rouge-score's `split_summaries` uses) is not available offline, so rougeLsum
# gets its "\n"-separated sentences from this regex instead.
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|\s*\n\s*")
# sacrebleu's `my_log(0)`: the floor it uses for the log of a zero n-gram precision.
_LOG_ZERO = -9999999999.0


@dataclass
class ModelOutputs:
    """One model's generations on the held-out split, plus the reference likelihoods.

    `nll_sum[i]` is the summed token negative log-likelihood of reference i given its
    prompt and `n_tokens[i]` the number of description tokens it covers.
    """

    predictions: list[str]
    references: list[str]
    nll_sum: np.ndarray
    n_tokens: np.ndarray

    def __post_init__(self) -> None:
        self.nll_sum = np.asarray(self.nll_sum, dtype=np.float64)
        self.n_tokens = _as_token_counts(self.n_tokens)
        n = len(self.references)
        if n == 0:
            raise MetricError("no examples to score")
        lengths = {len(self.predictions), n, self.nll_sum.size, self.n_tokens.size}
        if len(lengths) != 1 or self.nll_sum.ndim != 1 or self.n_tokens.ndim != 1:
            raise MetricError(
                f"outputs disagree in length: {len(self.predictions)} predictions, "
                f"{n} references, {self.nll_sum.size} nll sums, {self.n_tokens.size} token counts"
            )
        if not all(isinstance(text, str) for text in (*self.predictions, *self.references)):
            raise MetricError("predictions and references must be strings")
        blank = [i for i, ref in enumerate(self.references) if not ref.strip()]
        if blank:
            raise MetricError(f"{len(blank)} empty reference(s), first at example {blank[0]}")
        if not np.all(np.isfinite(self.nll_sum)):
            raise MetricError("perplexity: non-finite reference negative log-likelihood")
        if np.any(self.n_tokens <= 0):
            raise MetricError("perplexity: every example needs at least one reference token")


@dataclass
class MetricSettings:
    """Knobs that change reported numbers; `settings_record` records all but tie_tolerance."""

    rouge_stemmer: bool = True
    bootstrap_replicates: int = 1000
    bootstrap_seed: int = 0
    tie_tolerance: float = 1e-9


def _as_token_counts(values) -> np.ndarray:
    """Token counts as int64, refusing fractional values rather than truncating them."""
    array = np.asarray(values)
    if array.size and not np.all(np.isfinite(array) & (array == np.round(array))):
        raise MetricError("perplexity: token counts must be whole numbers")
    return array.astype(np.int64)


def split_sentences(text: str) -> str:
    """Put one sentence per line, the input format rougeLsum expects."""
    return "\n".join(s for s in _SENTENCE_BREAK.split(text.strip()) if s)


def _bleu_metric() -> BLEU:
    """sacrebleu's corpus BLEU as `corpus_bleu` configures it (13a, exp smoothing)."""
    return BLEU()


def _chrf_metric() -> CHRF:
    """sacrebleu's chrF as `corpus_chrf` configures it (chrF2, char order 6)."""
    return CHRF()


def _sacrebleu_stats(metric: BLEU | CHRF, outputs: ModelOutputs) -> np.ndarray:
    """Per-sentence sacrebleu statistics, the rows its corpus score sums over."""
    rows = metric._extract_corpus_statistics(outputs.predictions, [outputs.references])
    return np.asarray(rows, dtype=np.float64)


def _rouge_stats(outputs: ModelOutputs, settings: MetricSettings) -> dict[str, np.ndarray]:
    """Per-example ROUGE F-measures x 100.

    Both texts are sentence-split for rougeLsum; rouge1/2/L are unaffected because the
    rouge-score tokenizer treats the inserted newlines as any other whitespace.
    """
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=settings.rouge_stemmer)
    scores = [
        scorer.score(split_sentences(ref), split_sentences(pred))
        for pred, ref in zip(outputs.predictions, outputs.references)
    ]
    return {
        name: np.array([[100.0 * s[name].fmeasure] for s in scores]) for name in ROUGE_TYPES
    }


class _TokenizeOnce:
    """rouge-score's own tokenizer (the same stemmer setting) that remembers each text's tokens: scoring
    every pair of n texts would otherwise tokenize and Porter-stem each one 2(n-1) times."""

    def __init__(self, use_stemmer: bool):
        self._tokenizer = tokenizers.DefaultTokenizer(use_stemmer)
        self._tokens: dict[str, list[str]] = {}

    def tokenize(self, text: str) -> list[str]:
        if text not in self._tokens:
            self._tokens[text] = self._tokenizer.tokenize(text)
        return self._tokens[text]


def pairwise_rouge_l(texts: list[str], settings: MetricSettings) -> np.ndarray:
    """n x n ROUGE-L F-measures x 100 between every two texts (0 on the diagonal), scored as `_rouge_stats`
    scores a prediction against its reference. The F-measure is symmetric, so each pair is scored once."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_TokenizeOnce(settings.rouge_stemmer))
    scores = np.zeros((len(texts), len(texts)))
    for i, j in itertools.combinations(range(len(texts)), 2):
        scores[i, j] = scores[j, i] = 100.0 * scorer.score(texts[i], texts[j])["rougeL"].fmeasure
    return scores


def pairwise_chrf(texts: list[str]) -> np.ndarray:
    """n x n sentence chrF between every two texts (0 on the diagonal): [i, j] scores text i as the hypothesis
    against text j as the reference, with the reported chrF's settings (`_chrf_metric`). Not symmetric: chrF2
    weighs recall twice as much as precision."""
    metric = _chrf_metric()
    scores = np.zeros((len(texts), len(texts)))
    for i, j in itertools.permutations(range(len(texts)), 2):
        scores[i, j] = metric.sentence_score(texts[i], [texts[j]]).score
    return scores


def sufficient_stats(outputs: ModelOutputs, settings: MetricSettings) -> dict:
    """Per-example statistics (n x k per metric) whose sums determine each corpus score;
    distinct2's is its n-gram incidence (`degeneration.DistinctNgrams`)."""
    stats = _rouge_stats(outputs, settings)
    stats["bleu"] = _sacrebleu_stats(_bleu_metric(), outputs)
    stats["chrf"] = _sacrebleu_stats(_chrf_metric(), outputs)
    stats["perplexity"] = np.column_stack([outputs.nll_sum, outputs.n_tokens.astype(np.float64)])
    stats["rep4"] = np.array([[degeneration.rep_n(p)] for p in outputs.predictions], dtype=np.float64)
    stats["loops"] = np.array([[degeneration.loops(p)] for p in outputs.predictions], dtype=np.float64)
    stats["distinct2"] = degeneration.DistinctNgrams.of(outputs.predictions)
    return stats


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Elementwise division that yields 0 where the denominator is 0."""
    out = np.zeros(np.broadcast(numerator, denominator).shape)
    return np.divide(numerator, denominator, out=out, where=denominator != 0)


def bleu_from_stats(sums: np.ndarray, effective_order: bool = False) -> np.ndarray:
    """sacrebleu's `BLEU.compute_bleu` with exp smoothing, vectorised over rows.

    Rows are [sys_len, ref_len, correct_1..N, total_1..N] (N = 4 by default). The loop
    mirrors sacrebleu's operation order so results match it to the last bit: stop at the
    first order with no n-grams, halve the smoothed precision for each zero-match order,
    floor log(0), and score 0 when nothing matches. `effective_order=True` averages only
    the orders reached, as `sentence_bleu` does.
    """
    rows, max_order = len(sums), (sums.shape[1] - 2) // 2
    sys_len, ref_len = sums[:, 0], sums[:, 1]
    correct, total = sums[:, 2 : 2 + max_order], sums[:, 2 + max_order :]
    short_bp = np.where(sys_len > 0, np.exp(1 - _divide(ref_len, sys_len)), 0.0)
    bp = np.where(sys_len < ref_len, short_bp, 1.0)
    log_sum, smooth = np.zeros(rows), np.ones(rows)
    orders = np.zeros(rows) if effective_order else np.full(rows, float(max_order))
    active = np.ones(rows, dtype=bool)
    for n in range(max_order):
        active &= total[:, n] > 0
        unmatched = correct[:, n] == 0
        smooth = np.where(active & unmatched, smooth * 2, smooth)
        smoothed = _divide(100.0, smooth * total[:, n])
        precision = np.where(unmatched, smoothed, _divide(100.0 * correct[:, n], total[:, n]))
        log_precision = np.log(np.where(active, precision, 1.0))
        log_sum += np.where(active, log_precision, 0.0 if effective_order else _LOG_ZERO)
        if effective_order:
            orders += active
    score = bp * np.exp(_divide(log_sum, orders))
    return np.where(correct.any(axis=1), score, 0.0)


def chrf_from_stats(sums: np.ndarray, beta: int = CHRF.BETA) -> np.ndarray:
    """sacrebleu's `CHRF._compute_f_score` (default, no eps smoothing), vectorised over rows.

    Rows hold [hyp, ref, match] counts per n-gram order. Precision and recall are averaged
    over the orders where both hypothesis and reference have n-grams, then combined into
    an F-beta score, exactly as sacrebleu >= 2.0 does.
    """
    factor = beta**2
    avg_prec, avg_rec, orders = (np.zeros(len(sums)) for _ in range(3))
    for n in range(sums.shape[1] // 3):
        hyp, ref, match = sums[:, 3 * n], sums[:, 3 * n + 1], sums[:, 3 * n + 2]
        usable = (hyp > 0) & (ref > 0)
        avg_prec += np.where(usable, _divide(match, hyp), 0.0)
        avg_rec += np.where(usable, _divide(match, ref), 0.0)
        orders += usable
    avg_prec, avg_rec = _divide(avg_prec, orders), _divide(avg_rec, orders)
    f_score = _divide((1 + factor) * avg_prec * avg_rec, (factor * avg_prec) + avg_rec)
    return 100 * f_score


def _corpus_from_sums(name: str, sums: np.ndarray, n_examples: np.ndarray) -> np.ndarray:
    """Corpus score of `name` for each row of summed statistics."""
    if name in _MEANS:
        return sums[:, 0] / n_examples
    if name == "bleu":
        return bleu_from_stats(sums)
    if name == "chrf":
        return chrf_from_stats(sums)
    with np.errstate(over="ignore"):
        return np.exp(sums[:, 0] / sums[:, 1])


def _weighted_scores(stats: dict, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Corpus scores for each row of example weights (B x n), one array of B per metric."""
    n_examples = weights.sum(axis=1)
    return {name: stats[name].bootstrap(weights) if name == "distinct2"
            else _corpus_from_sums(name, weights @ stats[name], n_examples) for name in METRICS}


def _check_finite(name: str, *arrays: np.ndarray) -> None:
    """Fail closed: a metric that is not a finite number is an error, never a result."""
    if not all(np.all(np.isfinite(a)) for a in arrays):
        raise MetricError(f"{name}: metric is not a finite number (NaN or infinite)")


def per_example_from_stats(stats: dict) -> dict[str, np.ndarray]:
    """Sentence-level scores from per-example statistics (sentence BLEU uses effective order;
    distinct-2 of one output counts that output's own bigrams)."""
    scores = {name: stats[name][:, 0] for name in _MEANS}
    scores["bleu"] = bleu_from_stats(stats["bleu"], effective_order=True)
    scores["chrf"] = chrf_from_stats(stats["chrf"])
    with np.errstate(over="ignore"):
        scores["perplexity"] = np.exp(stats["perplexity"][:, 0] / stats["perplexity"][:, 1])
    scores["distinct2"] = stats["distinct2"].per_output()
    scores = {name: scores[name] for name in METRICS}
    for name, values in scores.items():
        _check_finite(name, values)
    return scores


def per_example_scores(outputs: ModelOutputs, settings: MetricSettings) -> dict[str, np.ndarray]:
    """Score of every example on its own, per metric (for reports and regression gates)."""
    return per_example_from_stats(sufficient_stats(outputs, settings))


def resample_counts(n: int, settings: MetricSettings) -> np.ndarray:
    """B x n matrix: how often each example is drawn in each bootstrap replicate."""
    if settings.bootstrap_replicates < 1:
        raise MetricError("bootstrap_replicates must be at least 1")
    rng = np.random.default_rng(settings.bootstrap_seed)
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=settings.bootstrap_replicates)
    return counts.astype(np.float64)


def _summary(name: str, value: float, replicates: np.ndarray, n: int) -> dict:
    """Point value, percentile 95% interval and sample size as plain Python numbers."""
    _check_finite(name, np.array([value]), replicates)
    low, high = np.percentile(replicates, [2.5, 97.5])
    return {"value": float(value), "ci95": [float(low), float(high)], "n": int(n)}


def _point_and_replicates(stats: dict, counts: np.ndarray):
    """Full-sample corpus scores and bootstrap replicate scores for one model."""
    point = _weighted_scores(stats, np.ones((1, counts.shape[1])))
    return {name: value[0] for name, value in point.items()}, _weighted_scores(stats, counts)


def bootstrap_replicates(outputs: ModelOutputs, settings: MetricSettings) -> dict[str, np.ndarray]:
    """Replicate corpus scores for one model (B per metric), from the seeded draws."""
    counts = resample_counts(len(outputs.references), settings)
    return _weighted_scores(sufficient_stats(outputs, settings), counts)


def score_single(outputs: ModelOutputs, settings: MetricSettings) -> dict:
    """{metric: {"value", "ci95", "n"}} for one model on its own."""
    n = len(outputs.references)
    point, replicates = _point_and_replicates(
        sufficient_stats(outputs, settings), resample_counts(n, settings)
    )
    return {name: _summary(name, point[name], replicates[name], n) for name in METRICS}


def _win_tie_loss(name: str, a: np.ndarray, b: np.ndarray, tolerance: float) -> dict:
    """Per-example comparison; "win" means b is better than a by more than the tolerance."""
    gain = b - a if HIGHER_IS_BETTER[name] else a - b
    wins, losses = int(np.sum(gain > tolerance)), int(np.sum(gain < -tolerance))
    return {"win": wins, "tie": len(gain) - wins - losses, "loss": losses}


def paired_comparison(a: ModelOutputs, b: ModelOutputs, settings: MetricSettings,
                      stats: tuple[dict, dict] | None = None) -> dict:
    """Score a and b on the same bootstrap draws; delta = b - a per replicate.

    Returns {"a", "b", "delta": {metric: {"value", "ci95", "n"}}, "win_tie_loss"}.
    Pairing cancels the per-example difficulty both models share, so the delta interval
    reflects only how differently they do on the same examples. `stats`: a's and b's sufficient_stats,
    where the caller has them already.
    """
    if a.references != b.references:
        raise MetricError("the two outputs were not scored on the same references")
    n = len(a.references)
    counts = resample_counts(n, settings)
    stats_a, stats_b = stats or (sufficient_stats(a, settings), sufficient_stats(b, settings))
    point_a, reps_a = _point_and_replicates(stats_a, counts)
    point_b, reps_b = _point_and_replicates(stats_b, counts)
    per_a, per_b = per_example_from_stats(stats_a), per_example_from_stats(stats_b)
    return {
        "a": {m: _summary(m, point_a[m], reps_a[m], n) for m in METRICS},
        "b": {m: _summary(m, point_b[m], reps_b[m], n) for m in METRICS},
        "delta": {
            m: _summary(m, point_b[m] - point_a[m], reps_b[m] - reps_a[m], n) for m in METRICS
        },
        "win_tie_loss": {
            m: _win_tie_loss(m, per_a[m], per_b[m], settings.tie_tolerance) for m in METRICS
        },
    }


def _signature(metric: BLEU | CHRF) -> str:
    """sacrebleu's signature string; it needs one scored corpus to know nrefs (always 1 here)."""
    metric.corpus_score(["a"], [["a"]])
    return str(metric.get_signature())


def settings_record(settings: MetricSettings) -> dict:
    """What reproducing the numbers needs: bootstrap, rouge options, sacrebleu signatures."""
    return {
        "bootstrap_replicates": settings.bootstrap_replicates,
        "bootstrap_seed": settings.bootstrap_seed,
        "rouge": {
            "types": list(ROUGE_TYPES),
            "use_stemmer": settings.rouge_stemmer,
            "score": "fmeasure x 100, mean over examples",
            "rougeLsum_sentence_split": f"regex {_SENTENCE_BREAK.pattern}",
        },
        "sacrebleu": {"bleu": _signature(_bleu_metric()), "chrf": _signature(_chrf_metric())},
        "degeneration": degeneration.settings_record(),
    }


def score_outputs(base: ModelOutputs, tuned: ModelOutputs, settings: MetricSettings,
                  stats: tuple[dict, dict] | None = None) -> dict:
    """The evaluation report's metric block: base, tuned, paired delta and win/tie/loss."""
    paired = paired_comparison(base, tuned, settings, stats)
    return {
        "base": paired["a"],
        "tuned": paired["b"],
        "delta": paired["delta"],
        "win_tie_loss": paired["win_tie_loss"],
        "higher_is_better": dict(HIGHER_IS_BETTER),
        "settings": settings_record(settings),
    }


def length_shift_warning(delta: dict, base_ratio: float, tuned_ratio: float, limit: float) -> str | None:
    """A warning when similarity gains come with tuned outputs moving away from the references' length.

    chrF weights recall twice over precision and ROUGE/BLEU reward length in their own ways, so a tuned
    model that writes much longer (or shorter) outputs than before can gain by length alone, as on the
    real records (length ratio 0.90 -> 1.45, chrF +3.6). A shift toward the references' length (the demo:
    2.14 -> 0.89) is what fine-tuning should do, and is not flagged."""
    gains = [m for m in SIMILARITY if m in delta and delta[m]["value"] > 0]
    shift = tuned_ratio - base_ratio
    if not gains or abs(shift) <= limit:
        return None
    if base_ratio > 0 and tuned_ratio > 0 and abs(math.log(tuned_ratio)) <= abs(math.log(base_ratio)):
        return None  # closer to the references' length than before
    return (f"gains in {', '.join(gains)} come with outputs moving away from the reference length: length "
            f"ratio {base_ratio:.2f} → {tuned_ratio:.2f} (shift {shift:+.2f}, limit {limit}); read the outputs, "
            "not only the score")
