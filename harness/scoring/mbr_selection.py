"""Minimum Bayes risk (MBR) selection: of N sampled candidates for one prompt, the one the others agree with most.

Greedy decoding returns the model's most probable continuation, which for an under-determined target (a
description that a title only partly fixes) is generic and repetitive, while ROUGE-L and chrF reward the
expected overlap with the reference. MBR decoding picks the output with the highest expected utility under
the model's own distribution, estimated with the N samples themselves as pseudo-references: the candidate
with the highest mean utility against the other N-1, i.e. the sample medoid (Kumar & Byrne 2004, "Minimum
Bayes-Risk Decoding for Statistical Machine Translation"; Freitag et al. 2022, "High Quality Rather than High
Model Probability: Minimum Bayes Risk Decoding with Neural Metrics"; Bertsch et al. 2023, "It's MBR All the
Way Down"). Identical samples count once each, so a continuation the model draws often weighs more, as the
expectation says it should. The utility is the reported metric itself (harness.scoring.metrics), so
`mbr_utility: rougeL` optimises exactly the ROUGE-L that the report shows.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from harness.scoring.metrics import MetricSettings, pairwise_chrf, pairwise_rouge_l

# utility name -> n x n matrix whose [i, j] is candidate i's utility with candidate j as the reference.
# ROUGE-L with rouge-score's stemmer: the spec refuses mbr_utility rougeL with metrics.rouge_stemmer false.
UTILITIES: dict[str, Callable[[list[str]], np.ndarray]] = {
    "rougeL": lambda texts: pairwise_rouge_l(texts, MetricSettings(rouge_stemmer=True)),
    "chrf": pairwise_chrf,
}


def expected_utilities(candidates: list[str], utility: str) -> np.ndarray:
    """Each candidate's mean utility against the other candidates (the diagonal, itself, left out)."""
    if len(candidates) < 2:
        raise ValueError(f"MBR needs at least 2 candidates (got {len(candidates)})")
    return UTILITIES[utility](candidates).sum(axis=1) / (len(candidates) - 1)


def mbr_choice(candidates: list[str], utility: str) -> int:
    """Index of the candidate with the highest expected utility; on a tie, the lowest index."""
    return int(np.argmax(expected_utilities(candidates, utility)))  # argmax returns the first maximum
