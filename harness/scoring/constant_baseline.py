"""The constant-answer floor: what answering every title with one fixed text scores on the held-out split.

On the real AmazonTitles records most references are author bios, editorial reviews and publisher notes
that a product title does not determine, and the answer below, given for every title, scored ROUGE-L 13.25
on the held-out split, above both the base model (11.48) and the tuned one (11.22): a publisher's blurb
that some records carry word for word (reports/amazon_desc/RESULTS.md). Like a classifier's
majority-class baseline it needs no model, so a similarity gain that does not clear it is no evidence
that the model learned anything about the products.

The fixed text is the train split's most typical reference (its ROUGE-L medoid): data-derived and
deterministic, never a hand-written template. It leaves this module only as a hash and a length, so no
record's text reaches metrics.json or a report.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np

from harness.scoring.metrics import (SIMILARITY, MetricSettings, ModelOutputs, paired_comparison,
                                     pairwise_rouge_l, sufficient_stats)

SAMPLE = 128  # train references the medoid is chosen among: every pair costs one ROUGE-L scoring
SOURCE = f"train medoid, first {SAMPLE} train references by id, ROUGE-L"
WARN_ON = ("rougeL", "chrf")  # the metrics `sweep` selects on; a tuned model must clear the floor on each


def typical_reference(references: list[str], settings: MetricSettings) -> str:
    """The medoid of two or more references: the one with the highest mean ROUGE-L F1 against the others
    (the first of equals)."""
    return _medoid(tuple(references), settings.rouge_stemmer)


@lru_cache(maxsize=8)  # sweep trials and an eval's candidates score against one train split
def _medoid(references: tuple[str, ...], rouge_stemmer: bool) -> str:
    scores = pairwise_rouge_l(list(references), MetricSettings(rouge_stemmer=rouge_stemmer))
    return references[int(np.argmax(scores.sum(axis=1) / (len(references) - 1)))]


def medoid_sample(train: list) -> list[str]:
    """The references the medoid is chosen among: the first SAMPLE train examples by id (as strings)."""
    return [e.content for e in sorted(train, key=lambda e: e.id)[:SAMPLE]]


def constant_baseline(train: list, tuned: ModelOutputs, tuned_stats: dict, settings: MetricSettings,
                      names: list[str]) -> tuple[dict | None, str | None]:
    """metrics.json's `constant_baseline` block (the constant answer's similarity scores and tuned minus
    them, paired, on the draws base and tuned were resampled with), or None and why there is none."""
    kept = [m for m in SIMILARITY if m in names]
    references = medoid_sample(train)
    if len(references) < 2:
        return None, f"the train split has {len(references)} reference(s); a most typical one needs at least 2"
    if not kept:
        return None, "metrics.names lists no similarity metric (rouge*, bleu, chrf)"
    text = typical_reference(references, settings)
    # ModelOutputs carries reference likelihoods, which belong to a model: the constant answer borrows
    # tuned's, and every metric but the similarity ones (perplexity, degenerate output) is left out.
    constant = ModelOutputs([text] * len(tuned.references), tuned.references, tuned.nll_sum, tuned.n_tokens)
    paired = paired_comparison(constant, tuned, settings, (sufficient_stats(constant, settings), tuned_stats))
    return {"text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(), "chars": len(text), "source": SOURCE,
            **{m: paired["a"][m] for m in kept},
            "tuned_minus_baseline": {m: paired["delta"][m] for m in kept}}, None


def floor_warnings(block: dict | None, tuned: dict) -> list[str]:
    """A warning per WARN_ON metric where the paired 95% CI of tuned minus the constant answer does not lie
    above zero; `tuned`: metrics.json's tuned block."""
    out = []
    for name in WARN_ON:
        delta = (block or {}).get("tuned_minus_baseline", {}).get(name)
        if delta is None or delta["ci95"][0] > 0:
            continue
        low, high = delta["ci95"]
        out.append(f"tuned does not beat answering every title with the most typical training reference on "
                   f"{name} ({tuned[name]['value']:.2f} vs {block[name]['value']:.2f}, delta CI "
                   f"[{low:+.2f}, {high:+.2f}]); a similarity score at this floor says nothing about the product")
    return out
