"""The constant-answer floor: the medoid, its scores, its warning, and that its text stays out of results."""

import hashlib
import json

import numpy as np
import pytest
from rouge_score import rouge_scorer

from harness.data.prepared import Example
from harness.scoring.constant_baseline import (SAMPLE, SOURCE, constant_baseline, floor_warnings, medoid_sample,
                                               typical_reference)
from harness.scoring.heldout_scoring import guard_warnings
from harness.scoring.metrics import (SIMILARITY, MetricSettings, ModelOutputs, pairwise_rouge_l, score_single,
                                     sufficient_stats)
from harness.spec import MetricsSpec

# Token LCS by hand: A-B 3 of 4 (F1 0.75); A-D, B-D, C-D 2 of 4 (0.5); A-C, B-C 0. Mean against the
# others: A and B 0.417, C 0.167, D 0.5, so D -- neither first nor longest -- is the most typical.
HAND = ["red wool scarf knit", "red wool bottle keeps", "red wool scarf warm", "steel bottle keeps cold"]
HAND_F1 = np.array([[0, 0.5, 0.75, 0], [0.5, 0, 0.5, 0.5], [0.75, 0.5, 0, 0], [0, 0.5, 0, 0]]) * 100
REFERENCES = ["Soft cotton scarf in navy, warm and washable.", "A steel bottle that keeps drinks cold all day.",
              "Ceramic mug, a classic gift for coffee lovers.", "A desk lamp with warm, soft light for reading.",
              "Durable travel mug that keeps coffee hot."]
TUNED = ["A soft navy scarf.", "Steel bottle keeps drinks cold.", "A ceramic mug gift.", "Warm desk lamp.",
         "A travel mug."]


def _examples(texts: list[str], ids: list[str] | None = None) -> list[Example]:
    return [Example(i, f"title {i}", text, "demo") for i, text in zip(ids or [f"ex-{k}" for k in range(len(texts))],
                                                                      texts)]


def _outputs(predictions: list[str]) -> ModelOutputs:
    n = len(REFERENCES)
    return ModelOutputs(predictions, REFERENCES, np.full(n, 20.0), np.full(n, 10))


def test_the_medoid_is_the_hand_computed_one():
    settings = MetricSettings()
    np.testing.assert_allclose(pairwise_rouge_l(HAND, settings), HAND_F1)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)  # the library on its own agrees
    assert scorer.score(HAND[0], HAND[2])["rougeL"].fmeasure == pytest.approx(0.75)
    assert typical_reference(HAND, settings) == HAND[1]
    assert typical_reference([HAND[0], HAND[2]], settings) == HAND[0]  # equals: the first


def test_the_sample_is_the_first_train_references_by_id():
    train = _examples([f"text {k}" for k in range(SAMPLE + 10)], [f"id-{k:04d}" for k in range(SAMPLE + 10)])
    assert medoid_sample(list(reversed(train))) == [f"text {k}" for k in range(SAMPLE)]


def test_the_block_is_the_constant_text_scored_by_the_metric_code():
    settings = MetricSettings(bootstrap_replicates=200)
    train = _examples(HAND)
    tuned = _outputs(TUNED)
    block, absent = constant_baseline(train, tuned, sufficient_stats(tuned, settings), settings, list(SIMILARITY))
    assert absent is None
    text = HAND[1]
    direct = score_single(_outputs([text] * len(REFERENCES)), settings)
    tuned_alone = score_single(tuned, settings)
    assert block["text_sha256"] == hashlib.sha256(text.encode()).hexdigest() and block["chars"] == len(text)
    assert block["source"] == SOURCE
    assert set(block["tuned_minus_baseline"]) == set(SIMILARITY)
    for name in SIMILARITY:
        assert block[name] == direct[name]  # value, CI (the same seeded draws) and n
        delta = block["tuned_minus_baseline"][name]
        assert delta["value"] == pytest.approx(tuned_alone[name]["value"] - direct[name]["value"])
        assert delta["ci95"][0] <= delta["value"] <= delta["ci95"][1]
    for name in ("perplexity", "rep4", "loops", "distinct2"):
        assert name not in block


def test_no_floor_from_too_few_references_or_no_similarity_metric():
    settings = MetricSettings(bootstrap_replicates=50)
    tuned = _outputs(TUNED)
    stats = sufficient_stats(tuned, settings)
    for train in ([], _examples(HAND[:1])):
        block, absent = constant_baseline(train, tuned, stats, settings, list(SIMILARITY))
        assert block is None and f"has {len(train)} reference(s)" in absent
    block, absent = constant_baseline(_examples(HAND), tuned, stats, settings, ["perplexity", "loops"])
    assert block is None and "no similarity metric" in absent


def _figures(tuned: float, floor: float, ci: list[float]) -> dict:
    stat = {"value": 0.0, "ci95": [-1.0, 1.0], "n": 50}
    metrics = {side: {m: dict(stat) for m in ("rougeL", "chrf")} for side in ("base", "tuned", "delta")}
    metrics["tuned"]["rougeL"] = {"value": tuned, "ci95": [tuned - 1, tuned + 1], "n": 50}
    metrics["constant_baseline"] = {"rougeL": {"value": floor, "ci95": [floor - 1, floor + 1], "n": 50},
                                    "chrf": dict(stat),
                                    "tuned_minus_baseline": {"rougeL": {"value": tuned - floor, "ci95": ci, "n": 50},
                                                             "chrf": {"value": 3.0, "ci95": [1.0, 5.0], "n": 50}}}
    return metrics


def test_the_warning_fires_when_tuned_does_not_clear_the_floor():
    guard = {"length_ratio": 1.0, "empty_share": 0.0, "truncated_share": 0.0, "prompt_repeat_share": 0.0,
             "loop_share": 0.0}
    limits = MetricsSpec()
    below = guard_warnings(_figures(11.22, 11.74, [-0.9, 0.3]), {"base": guard, "tuned": guard}, limits)
    assert below == ["tuned does not beat answering every title with the most typical training reference on "
                     "rougeL (11.22 vs 11.74, delta CI [-0.90, +0.30]); a similarity score at this floor says "
                     "nothing about the product"]
    assert guard_warnings(_figures(14.0, 11.74, [1.1, 3.4]), {"base": guard, "tuned": guard}, limits) == []
    assert floor_warnings(_figures(11.0, 11.0, [0.0, 0.5])["constant_baseline"], _figures(11.0, 11.0, [0, 0])["tuned"])
    assert floor_warnings(None, {}) == []


@pytest.mark.slow
def test_a_run_records_the_floor_but_never_its_text(tiny_run):
    metrics = json.loads((tiny_run / "metrics.json").read_text(encoding="utf-8"))
    train = [Example.from_dict(json.loads(line))
             for line in (tiny_run / "data" / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    text = typical_reference(medoid_sample(train), MetricSettings())
    block = metrics["constant_baseline"]
    assert block["text_sha256"] == hashlib.sha256(text.encode()).hexdigest() and block["chars"] == len(text)
    assert set(block["tuned_minus_baseline"]) == set(SIMILARITY) and "perplexity" not in block
    heldout = [json.loads(line)["content"] for line in (tiny_run / "data" / "heldout.jsonl").read_text().splitlines()]
    assert text not in heldout
    for name in ("metrics.json", "report.md", "report.html"):
        assert text not in (tiny_run / name).read_text(encoding="utf-8"), name
    assert block["text_sha256"][:12] in (tiny_run / "report.md").read_text(encoding="utf-8")


@pytest.mark.slow
def test_the_schema_holds_the_floor_to_a_hash_or_a_reason(tiny_run):
    import jsonschema

    from tests.conftest import REPO

    schema = json.loads((REPO / "docs" / "metrics.schema.json").read_text(encoding="utf-8"))
    metrics = json.loads((tiny_run / "metrics.json").read_text(encoding="utf-8"))
    jsonschema.validate(metrics, schema)
    for broken in ({**metrics["constant_baseline"], "text": "the constant answer itself"},  # no text, ever
                   {**metrics["constant_baseline"], "perplexity": metrics["constant_baseline"]["rougeL"]}, None):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**metrics, "constant_baseline": broken}, schema)
    jsonschema.validate({**metrics, "constant_baseline": None, "constant_baseline_absent": "too few"}, schema)
