"""Metrics must reproduce the reference scorers exactly and bootstrap honestly."""

import json
import math
import time

import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer

from harness.errors import MetricError
from harness.scoring.metrics import (
    METRICS,
    MetricSettings,
    ModelOutputs,
    bootstrap_replicates,
    per_example_scores,
    score_outputs,
    score_single,
    split_sentences,
    sufficient_stats,
)

PAIRS = [
    ("Soft cotton t-shirt in navy blue.", "A soft cotton t-shirt, navy blue. Machine washable."),
    ("", "Stainless steel water bottle keeps drinks cold for 24 hours."),
    ("Lamp", "Desk lamp with adjustable arm and warm LED light."),
    (
        "Café crème mug — 350 ml, spülmaschinenfest.",
        "Café crème mug, 350 ml. Spülmaschinenfest!",
    ),
    ("Running shoes running shoes running shoes", "Lightweight running shoes for road running."),
    ("水筒 ステンレス 保温", "ステンレス製の水筒。保温・保冷に対応。"),
    (
        "Leather wallet with six card slots. Slim design fits any pocket!",
        "Leather wallet with six card slots. Slim design fits any pocket!",
    ),
    ("Completely unrelated words here", "Wireless mouse with ergonomic grip."),
    ("Yoga mat, non-slip, 6 mm thick.", "Non-slip yoga mat, 6 mm thick, with carry strap."),
    ("a b", "a b c"),
]
PREDS = [p for p, _ in PAIRS]
REFS = [r for _, r in PAIRS]
SETTINGS = MetricSettings(bootstrap_replicates=200)
OTHER_SEED = MetricSettings(bootstrap_replicates=200, bootstrap_seed=1)


def outputs(preds, refs, nll=None, tokens=None):
    n = len(refs)
    nll = np.linspace(5.0, 40.0, n) if nll is None else nll
    tokens = np.arange(10, 10 + n) if tokens is None else tokens
    return ModelOutputs(list(preds), list(refs), np.asarray(nll, float), np.asarray(tokens))


def random_corpus(rng, n, vocab=40, length=(0, 25)):
    words = [f"w{i}" for i in range(vocab)] + ["the", "a", "blue", "Café", "ß", "."]
    sent = lambda: " ".join(rng.choice(words, size=rng.integers(*length)))  # noqa: E731
    refs = [sent() or "w0" for _ in range(n)]
    return [sent() for _ in range(n)], refs


def noisy_copies(rng, refs, p_replace):
    """Predictions that keep each reference word with probability 1 - p_replace."""
    return [" ".join(w if rng.random() > p_replace else "zz" for w in r.split()) for r in refs]


def test_rouge_matches_rouge_score_averaged():
    scores = per_example_scores(outputs(PREDS, REFS), SETTINGS)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    raw = [scorer.score(r, p) for p, r in PAIRS]
    split = [scorer.score(split_sentences(r), split_sentences(p)) for p, r in PAIRS]
    for name in ("rouge1", "rouge2", "rougeL"):
        np.testing.assert_allclose(scores[name], [100 * s[name].fmeasure for s in raw], atol=1e-12)
    lsum = [100 * s["rougeLsum"].fmeasure for s in split]
    np.testing.assert_allclose(scores["rougeLsum"], lsum, atol=1e-12)
    single = score_single(outputs(PREDS, REFS), SETTINGS)
    assert single["rougeLsum"]["value"] == pytest.approx(np.mean(lsum), abs=1e-9)


def test_split_sentences_puts_one_sentence_per_line():
    assert split_sentences(" One. Two!  Three?\nFour 3.5 kg ") == "One.\nTwo!\nThree?\nFour 3.5 kg"


def test_corpus_bleu_and_chrf_equal_sacrebleu():
    rng = np.random.default_rng(1)
    corpora = [(PREDS[s], REFS[s]) for s in (slice(None), slice(1, 2), slice(-1, None), slice(4))]
    corpora += [random_corpus(rng, int(rng.integers(1, 30)), length=(0, 6)) for _ in range(40)]
    for preds, refs in corpora:
        single = score_single(outputs(preds, refs), MetricSettings(bootstrap_replicates=2))
        bleu = sacrebleu.corpus_bleu(preds, [refs]).score
        chrf = sacrebleu.corpus_chrf(preds, [refs]).score
        assert single["bleu"]["value"] == pytest.approx(bleu, abs=1e-9, rel=0)
        assert single["chrf"]["value"] == pytest.approx(chrf, abs=1e-9, rel=0)


def test_per_example_bleu_and_chrf_equal_sacrebleu_sentence_scores():
    preds, refs = random_corpus(np.random.default_rng(2), 60, vocab=12, length=(0, 8))
    preds, refs = PREDS + preds, REFS + refs
    scores = per_example_scores(outputs(preds, refs), SETTINGS)
    bleu = [sacrebleu.sentence_bleu(p, [r]).score for p, r in zip(preds, refs)]
    chrf = [sacrebleu.sentence_chrf(p, [r]).score for p, r in zip(preds, refs)]
    np.testing.assert_allclose(scores["bleu"], bleu, rtol=0, atol=1e-9)
    np.testing.assert_allclose(scores["chrf"], chrf, rtol=0, atol=1e-9)
    assert scores["bleu"][1] == 0.0 and scores["chrf"][1] == 0.0  # the empty prediction


def test_perplexity_is_token_weighted():
    out = outputs(["x", "y"], ["x", "z"], nll=[2.0, 3.0], tokens=[4, 2])
    assert score_single(out, SETTINGS)["perplexity"]["value"] == pytest.approx(math.exp(5 / 6))
    np.testing.assert_allclose(per_example_scores(out, SETTINGS)["perplexity"], np.exp([0.5, 1.5]))


def test_report_structure_is_json_ready():
    base = outputs(PREDS, REFS)
    tuned = outputs(REFS[:5] + PREDS[5:], REFS, nll=np.linspace(4.0, 30.0, len(REFS)))
    result = score_outputs(base, tuned, SETTINGS)
    keys = ["base", "tuned", "delta", "win_tie_loss", "higher_is_better", "settings"]
    assert list(result) == keys
    for block in ("base", "tuned", "delta"):
        assert list(result[block]) == list(METRICS)
        for entry in result[block].values():
            assert type(entry["value"]) is float and entry["n"] == len(REFS)
            assert all(type(x) is float for x in entry["ci95"])
    for name in METRICS:
        delta = result["tuned"][name]["value"] - result["base"][name]["value"]
        assert result["delta"][name]["value"] == pytest.approx(delta)
        assert sum(result["win_tie_loss"][name].values()) == len(REFS)
    assert result["higher_is_better"]["perplexity"] is False and result["higher_is_better"]["bleu"]
    assert result["win_tie_loss"]["perplexity"] == {"win": len(REFS), "tie": 0, "loss": 0}
    settings = result["settings"]
    assert settings["sacrebleu"]["bleu"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp")
    assert settings["sacrebleu"]["chrf"].startswith("nrefs:1|case:mixed|eff:yes|nc:6|nw:0")
    assert settings["bootstrap_replicates"] == 200 and settings["rouge"]["use_stemmer"] is True
    json.dumps(result, allow_nan=False)


def test_identical_models_have_zero_delta_and_all_ties():
    out = outputs(PREDS, REFS)
    result = score_outputs(out, out, SETTINGS)
    for name in METRICS:
        assert result["delta"][name]["value"] == 0.0
        assert result["delta"][name]["ci95"] == [0.0, 0.0]
        assert result["win_tie_loss"][name] == {"win": 0, "tie": len(REFS), "loss": 0}


def test_ci_contains_point_value_and_seed_is_reproducible():
    rng = np.random.default_rng(3)
    _, refs = random_corpus(rng, 200, length=(5, 25))
    base = outputs(noisy_copies(rng, refs, 0.5), refs, nll=rng.uniform(10, 60, 200))
    tuned = outputs(noisy_copies(rng, refs, 0.3), refs, nll=rng.uniform(5, 50, 200))
    first = score_outputs(base, tuned, SETTINGS)
    assert first == score_outputs(base, tuned, SETTINGS)
    assert first != score_outputs(base, tuned, OTHER_SEED)
    assert first["tuned"]["loops"] == {"value": 0.0, "ci95": [0.0, 0.0], "n": 200}  # nothing loops
    for block in ("base", "tuned", "delta"):
        for name, entry in first[block].items():
            low, high = entry["ci95"]
            assert low <= entry["value"] <= high and (low < high or entry == first["tuned"]["loops"]), name


def test_paired_delta_ci_is_narrower_than_unpaired():
    # Examples differ wildly in difficulty (near copies vs. noise), shared by both models;
    # the tuned model fixes a few. Pairing cancels the shared difficulty, independent draws
    # do not, so only the paired interval excludes zero.
    rng = np.random.default_rng(4)
    preds, refs = random_corpus(rng, 300, length=(5, 25))
    close, fixed = noisy_copies(rng, refs, 0.1), noisy_copies(rng, refs, 0.1)
    base_preds = [c if i % 2 else p for i, (p, c) in enumerate(zip(preds, close))]
    tuned_preds = [fixed[i] if i % 20 == 0 else p for i, p in enumerate(base_preds)]
    base, tuned = outputs(base_preds, refs), outputs(tuned_preds, refs)
    paired = score_outputs(base, tuned, SETTINGS)["delta"]
    reps_base = bootstrap_replicates(base, SETTINGS)
    reps_tuned = bootstrap_replicates(tuned, OTHER_SEED)
    for name in ("rouge1", "rougeL", "bleu", "chrf"):
        low, high = np.percentile(reps_tuned[name] - reps_base[name], [2.5, 97.5])
        paired_low, paired_high = paired[name]["ci95"]
        assert paired_high - paired_low < 0.5 * (high - low), name
        assert paired_low > 0 >= low, name


def test_mismatched_references_raise():
    base = outputs(PREDS, REFS)
    other = outputs(PREDS, REFS[:-1] + ["a different reference"])
    with pytest.raises(MetricError, match="same references"):
        score_outputs(base, other, SETTINGS)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"nll": [1.0, float("nan")]}, "perplexity"),
        ({"nll": [1.0, float("inf")]}, "perplexity"),
        ({"tokens": [3, 0]}, "perplexity"),
        ({"tokens": [3]}, "disagree in length"),
        ({"refs": ["ok", "  "]}, "empty reference"),
    ],
)
def test_invalid_outputs_raise(kwargs, message):
    refs = kwargs.pop("refs", ["ok", "fine"])
    with pytest.raises(MetricError, match=message):
        outputs(["ok", ""], refs, **kwargs)


def test_no_examples_raise():
    with pytest.raises(MetricError, match="no examples"):
        outputs([], [])


def test_overflowing_perplexity_fails_closed():
    out = outputs(["a", "b"], ["a", "b"], nll=[1e6, 2.0], tokens=[1, 1])
    with pytest.raises(MetricError, match="perplexity.*finite"):
        score_single(out, SETTINGS)


def test_stats_are_integers_for_sacrebleu_metrics():
    stats = sufficient_stats(outputs(PREDS, REFS), SETTINGS)
    assert stats["bleu"].shape == (len(REFS), 10) and stats["chrf"].shape == (len(REFS), 18)
    assert np.all(stats["bleu"] == np.round(stats["bleu"]))


def test_thousand_by_thousand_bootstrap_is_fast_and_silent(capsys):
    rng = np.random.default_rng(5)
    _, refs = random_corpus(rng, 1000, vocab=300, length=(5, 30))
    tokens = rng.integers(5, 40, 1000)
    base = outputs(noisy_copies(rng, refs, 0.6), refs, nll=rng.uniform(10, 80, 1000), tokens=tokens)
    tuned = outputs(noisy_copies(rng, refs, 0.4), refs, nll=rng.uniform(5, 70, 1000), tokens=tokens)
    start = time.perf_counter()
    result = score_outputs(base, tuned, MetricSettings(bootstrap_replicates=1000))
    assert time.perf_counter() - start < 20
    assert result["delta"]["bleu"]["ci95"][0] > 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
