"""MBR decoding (issue 12): the selection rule on fixed strings, its utilities equal to the reported metrics,
and the spec's checks. Decoding with MBR on the tiny model is in test_generation.py."""

from __future__ import annotations

import typing

import numpy as np
import pytest
import sacrebleu

from harness.errors import SpecError
from harness.fingerprint import generation_record, settings_fingerprints
from harness.scoring.mbr_selection import UTILITIES, expected_utilities, mbr_choice
from harness.scoring.metrics import MetricSettings, ModelOutputs, pairwise_chrf, per_example_scores
from harness.spec import GenerationSpec, load_spec
from tests.conftest import REPO

TASK = str(REPO / "tasks" / "amazon_desc.yaml")
# One clear ROUGE-L medoid: candidate 0 shares "red cotton shirt" with 1 and "red ... shirt for men" with 3.
SHIRTS = ["red cotton shirt for men", "red cotton shirt", "blue wool hat", "red shirt for men"]
# ROUGE-L F-measures by hand (LCS / lengths): 0-1 3 of 5|3 words, 0-3 4 of 5|4, 1-3 2 of 3|4; 2 shares nothing.
F01, F03, F13 = 2 * 3 / (5 + 3), 2 * 4 / (5 + 4), 2 * 2 / (3 + 4)
# ROUGE-L ties 1 and 2 (stemmed: kids = kid), chrF's character n-grams prefer 2 ("rainboots" ~ "rainboots").
BOOTS = ["kids rain boots", "boots for kids", "rainboots for kids", "kid rainboots"]


def test_rouge_l_selection_is_the_hand_computed_medoid():
    expected = 100 * np.array([(F01 + F03) / 3, (F01 + F13) / 3, 0.0, (F03 + F13) / 3])
    np.testing.assert_allclose(expected_utilities(SHIRTS, "rougeL"), expected)
    assert mbr_choice(SHIRTS, "rougeL") == 0
    assert mbr_choice(SHIRTS[::-1], "rougeL") == 3  # the same candidate wherever it stands


def test_a_tie_goes_to_the_lowest_index_and_the_utility_decides_the_choice():
    # kid-rain-boot | boot-for-kid: 1 of 3|3; 0-2 likewise; 0-3, 1-3, 2-3: 1 of 3|2; 1-2: 2 of 3|3
    third, fifth, two_thirds = 1 / 3, 2 * 1 / (3 + 2), 2 / 3
    expected = 100 * np.array([2 * third + fifth, third + two_thirds + fifth, third + two_thirds + fifth,
                               3 * fifth]) / 3
    utilities = expected_utilities(BOOTS, "rougeL")
    np.testing.assert_allclose(utilities, expected)
    assert utilities[1] == utilities[2] and mbr_choice(BOOTS, "rougeL") == 1
    assert mbr_choice(BOOTS, "chrf") == 2
    assert mbr_choice(["unrelated", "a b", "a b"], "rougeL") == 1  # duplicates agree with each other


@pytest.mark.parametrize("candidates", [SHIRTS, BOOTS])
def test_chrf_utility_is_sacrebleus_sentence_chrf_and_the_reported_per_example_chrf(candidates):
    n = len(candidates)
    by_sacrebleu = [[sacrebleu.sentence_chrf(candidates[i], [candidates[j]]).score if i != j else 0.0
                     for j in range(n)] for i in range(n)]
    matrix = pairwise_chrf(candidates)
    np.testing.assert_allclose(matrix, by_sacrebleu)
    assert not np.allclose(matrix, matrix.T)  # chrF2 is not symmetric: hypothesis and reference matter
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    reported = per_example_scores(ModelOutputs([candidates[i] for i, _ in pairs], [candidates[j] for _, j in pairs],
                                               np.ones(len(pairs)), np.ones(len(pairs))), MetricSettings())["chrf"]
    np.testing.assert_allclose([matrix[i, j] for i, j in pairs], reported)
    np.testing.assert_allclose(expected_utilities(candidates, "chrf"), np.sum(by_sacrebleu, axis=1) / (n - 1))


def test_the_spec_offers_exactly_the_selection_modules_utilities():
    hints = typing.get_type_hints(GenerationSpec)
    assert set(typing.get_args(hints["mbr_utility"])) == set(UTILITIES)


@pytest.mark.parametrize("overrides, message", [
    (["generation.mbr_samples=1"], r"generation.mbr_samples: must be 0 \(off\) or >= 2"),
    (["generation.mbr_samples=-3"], r"generation.mbr_samples: must be 0 \(off\) or >= 2"),
    (["generation.mbr_samples=32"], "generation.mbr_samples: must be <= generation.batch_size and static_batch_size"),
    (["generation.mbr_samples=4", "generation.engine=graphs"], "generation.engine: graphs decodes greedily only"),
    (["generation.mbr_samples=4", "metrics.rouge_stemmer=false"],
     "generation.mbr_utility: rougeL scores candidates with rouge-score's stemmer"),
    (["generation.mbr_utility=bleu"], r"generation.mbr_utility: 'bleu' is not allowed \(allowed: 'rougeL', 'chrf'\)"),
])
def test_bad_mbr_settings_fail_at_load_in_one_line(overrides, message):
    with pytest.raises(SpecError, match=message) as caught:
        load_spec(TASK, overrides)
    assert "\n" not in str(caught.value)


def test_mbr_settings_that_load():
    spec = load_spec(TASK, ["generation.mbr_samples=8", "generation.mbr_utility=chrf", "metrics.rouge_stemmer=false"])
    assert (spec.generation.mbr_samples, spec.generation.mbr_utility) == (8, "chrf")


def test_mbr_keys_enter_the_generation_fingerprint_only_when_mbr_is_on():
    """With MBR off its keys change no output: a spec from before MBR keeps its fingerprint (and cached base
    scores), and so does one that only names another utility; turning MBR on, or changing its utility, misses."""
    def fingerprint(*overrides):
        return settings_fingerprints(load_spec(TASK, list(overrides)), {})["generation"]

    assert not any(key.startswith("mbr_") for key in generation_record(GenerationSpec()))
    assert fingerprint() == fingerprint("generation.mbr_utility=chrf")
    on = fingerprint("generation.mbr_samples=4")
    assert len({fingerprint(), on, fingerprint("generation.mbr_samples=8"),
                fingerprint("generation.mbr_samples=4", "generation.mbr_utility=chrf")}) == 4
