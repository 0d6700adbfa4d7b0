"""Degenerate output: rep-4, loops and distinct-2 equal hand counts, and bootstrap like every metric."""

from collections import Counter

import numpy as np
import pytest

from harness.scoring import degeneration
from harness.scoring.heldout_scoring import guard_warnings
from harness.scoring.metrics import (DEGENERATION, HIGHER_IS_BETTER, METRICS, MetricSettings, ModelOutputs,
                                     bootstrap_replicates, per_example_scores, resample_counts, score_outputs,
                                     score_single)
from harness.spec import METRIC_NAMES, MetricsSpec

SETTINGS = MetricSettings(bootstrap_replicates=300)
# Tokens "the cat sat ." x 3 (12): 9 4-grams, of which 4 are distinct (the period is 4 tokens).
CAT = "The cat sat. The cat sat. The cat sat."
# Tokens "it is very easy to use ." x 4 (28): 25 4-grams, 7 distinct (period 7).
EASY = "It is very easy to use. " * 4
# 11 tokens "a soft cotton shirt , navy blue , machine washable .": 8 4-grams, all distinct.
PLAIN = "A soft cotton shirt, navy blue, machine washable."


def test_tokens_are_casefolded_words_and_punctuation_marks():
    assert degeneration.tokens("Soft COTTON, 2-pack!") == ["soft", "cotton", ",", "2", "-", "pack", "!"]


@pytest.mark.parametrize("text, expected", [
    (CAT, 1 - 4 / 9),     # 5 of 9 4-grams repeat one already written
    (EASY, 1 - 7 / 25),   # 18 of 25
    (PLAIN, 0.0),
    ("a b c", 0.0),       # 3 tokens: no 4-gram at all
    ("", 0.0),
])
def test_rep4_equals_a_hand_count(text, expected):
    assert degeneration.rep_n(text) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("text, expected", [
    # 28 tokens, half = 14: the 11 4-grams starting at token 14 or later all occurred before: 11/11 >= 0.5.
    (EASY, True),
    # 16 tokens, the first half written twice: the 5 4-grams of the tail (abcd .. efgh) were all seen.
    ("a b c d e f g h a b c d e f g h", True),
    # 16 tokens, tail 4-grams abcd, bcdx, cdxy, dxyz, xyzw: 1 of 5 seen, 0.2 < 0.5.
    ("a b c d e f g h a b c d x y z w", False),
    (CAT, False),         # 12 tokens: shorter than LOOP_MIN_TOKENS (16), never judged a loop
    (PLAIN, False),
])
def test_loops_equals_a_hand_count(text, expected):
    assert degeneration.loops(text) is expected


def _corpus_distinct2(texts) -> float:
    return float(degeneration.DistinctNgrams.of(texts).resampled(np.ones(len(texts)))[0])


def test_distinct2_equals_a_hand_count():
    # Tokens: "the cat sat ." (4) + "the cat ran" (3) + "" (0) = 7. Bigrams: the-cat, cat-sat, sat-.,
    # the-cat, cat-ran: 4 distinct (casefolding makes "The cat" and "the cat" one bigram). 4 / 7.
    texts = ["The cat sat.", "the cat ran", ""]
    assert _corpus_distinct2(texts) == pytest.approx(4 / 7)
    # Each output alone: 3 distinct bigrams / 4 tokens, 2 / 3, and 0 for the empty one.
    np.testing.assert_allclose(degeneration.DistinctNgrams.of(texts).per_output(), [3 / 4, 2 / 3, 0.0])
    assert _corpus_distinct2(["", "one"]) == 0.0  # no bigram at all


def _brute_distinct2(texts, counts) -> float:
    """distinct-2 of the resampled corpus itself: every drawn output repeated as often as drawn."""
    drawn = [t for t, c in zip(texts, counts) for _ in range(int(c))]
    grams, n_tokens = Counter(), 0
    for text in drawn:
        toks = degeneration.tokens(text)
        n_tokens += len(toks)
        grams.update(degeneration.ngrams(toks, 2))
    return len(grams) / n_tokens if n_tokens else 0.0


TEXTS = [CAT, EASY, PLAIN, "", "the cat ran away", "A soft cotton shirt.", "navy blue , navy blue", "ok"]


def _outputs(predictions):
    n = len(predictions)
    return ModelOutputs(list(predictions), [f"reference {i}" for i in range(n)], np.full(n, 10.0), np.full(n, 5))


def test_distinct2_bootstrap_recounts_each_resample_and_its_ci_holds_the_point_value():
    out = _outputs(TEXTS)
    single = score_single(out, SETTINGS)["distinct2"]
    point = _brute_distinct2(TEXTS, np.ones(len(TEXTS)))
    assert single["value"] == pytest.approx(point)
    low, high = single["ci95"]
    assert low <= single["value"] <= high and low < high
    # Each replicate recounts the resampled corpus (repeated outputs repeated), then all are
    # shifted by one constant so that they average the full-sample value.
    counts = resample_counts(len(TEXTS), SETTINGS)
    brute = np.array([_brute_distinct2(TEXTS, row) for row in counts])
    np.testing.assert_allclose(degeneration.DistinctNgrams.of(TEXTS).resampled(counts), brute, rtol=0, atol=1e-12)
    replicates = bootstrap_replicates(out, SETTINGS)["distinct2"]
    np.testing.assert_allclose(replicates, brute - brute.mean() + point, rtol=0, atol=1e-12)


def test_distinct2_bootstrap_in_chunks_equals_one_pass(monkeypatch):
    weights = resample_counts(len(TEXTS), SETTINGS)
    stats = degeneration.DistinctNgrams.of(TEXTS)
    whole = stats.resampled(weights)
    monkeypatch.setattr(degeneration, "_CHUNK_CELLS", 7)  # a few replicates per chunk
    np.testing.assert_array_equal(stats.resampled(weights), whole)


def test_degeneration_metrics_are_paired_like_every_metric():
    tuned = [EASY if i % 2 else t for i, t in enumerate(TEXTS)]  # the tuned model loops on half the examples
    result = score_outputs(_outputs(TEXTS), _outputs(tuned), SETTINGS)
    assert result["base"]["loops"]["value"] == pytest.approx(1 / 8)  # only EASY loops
    assert result["tuned"]["loops"]["value"] == pytest.approx(4 / 8)
    assert result["delta"]["loops"]["value"] == pytest.approx(3 / 8)
    per_base = per_example_scores(_outputs(TEXTS), SETTINGS)
    assert result["base"]["rep4"]["value"] == pytest.approx(np.mean([degeneration.rep_n(t) for t in TEXTS]))
    assert per_base["rep4"][0] == pytest.approx(1 - 4 / 9) and per_base["loops"].tolist()[:3] == [0, 1, 0]
    # Lower is better for rep4 and loops: three examples started looping, one (EASY) already did.
    assert result["win_tie_loss"]["loops"] == {"win": 0, "tie": 5, "loss": 3}
    assert {m: result["higher_is_better"][m] for m in DEGENERATION} == {"rep4": False, "loops": False,
                                                                          "distinct2": True}
    for name in DEGENERATION:
        for side in ("base", "tuned", "delta"):
            low, high = result[side][name]["ci95"]
            assert low <= result[side][name]["value"] <= high, (name, side)
    assert result["delta"]["distinct2"]["value"] < 0  # repeating one text makes the corpus less diverse
    assert "Welleck" in result["settings"]["degeneration"]["rep4"]


def test_spec_metric_names_are_the_scored_metrics():
    assert METRIC_NAMES == METRICS and not HIGHER_IS_BETTER["loops"]


GUARD = {"length_ratio": 1.0, "empty_share": 0.0, "truncated_share": 0.0, "prompt_repeat_share": 0.0}


def test_loop_warning_above_the_threshold():
    metrics = {"base": {}, "tuned": {}, "delta": {}}
    guards = {"base": {**GUARD, "loop_share": 0.2}, "tuned": {**GUARD, "loop_share": 0.7}}
    warnings = guard_warnings(metrics, guards, MetricsSpec(loop_warning=0.2))
    assert len(warnings) == 1 and warnings[0].startswith("tuned: 70% of outputs loop") and "limit 20%" in warnings[0]
    assert guard_warnings(metrics, guards, MetricsSpec(loop_warning=0.7)) == []


def _value(v: float) -> dict:
    return {"value": v}


def test_a_chrf_gain_from_longer_templated_outputs_is_flagged():
    """The real-records case: tuned chrF up 3.6 while outputs got 1.6x longer and distinct-2 fell 39%."""
    metrics = {"base": {"distinct2": _value(0.64)}, "tuned": {"distinct2": _value(0.39)},
               "delta": {"rougeL": _value(-0.59), "chrf": _value(3.57)}}
    guards = {"base": {**GUARD, "length_ratio": 0.90, "loop_share": 0.0},
              "tuned": {**GUARD, "length_ratio": 1.45, "loop_share": 0.0}}
    length, diversity = guard_warnings(metrics, guards, MetricsSpec())
    assert length.startswith("gains in chrf come with outputs moving away from the reference length: length "
                             "ratio 0.90 → 1.45 (shift +0.55")
    assert diversity.startswith("tuned outputs are less diverse: distinct-2 0.64 -> 0.39 (-39%, limit -25%)")
    assert guard_warnings(metrics, guards, MetricsSpec(length_shift_warning=0.6, diversity_drop_warning=0.4)) == []
    metrics["delta"]["chrf"] = _value(-1.0)  # no gain: a length shift alone explains no score
    assert len(guard_warnings(metrics, guards, MetricsSpec())) == 1


def test_a_gain_while_outputs_move_toward_the_reference_length_is_not_flagged():
    """The demo: base outputs run 2.1x the reference, tuned 0.9x, and ROUGE-L rises: what tuning is for."""
    metrics = {"base": {}, "tuned": {}, "delta": {"rougeL": _value(7.75), "chrf": _value(0.26)}}
    toward = {"base": {**GUARD, "length_ratio": 2.14, "loop_share": 0.0},
              "tuned": {**GUARD, "length_ratio": 0.89, "loop_share": 0.0}}
    assert guard_warnings(metrics, toward, MetricsSpec()) == []
    toward["tuned"]["length_ratio"] = 0.40  # past the reference length by more than base missed it: flagged
    (warning,) = guard_warnings(metrics, toward, MetricsSpec())
    assert "length ratio 2.14 → 0.40" in warning
