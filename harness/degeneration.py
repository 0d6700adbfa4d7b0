"""Degenerate output: repetition inside an output, loops at its end, diversity across outputs.

ROUGE does not notice a model that writes "It is very easy to use. It is very easy to use. ..."
until the token limit; these measures do. Definitions follow the text-degeneration literature:

- rep-n (Welleck et al., 2019, "Neural Text Generation with Unlikelihood Training", seq-rep-n):
  1 - |unique n-grams| / |n-grams| inside one output; 0 when it has no n-gram.
- distinct-n (Li et al., 2016, "A Diversity-Promoting Objective Function for Neural Conversation
  Models"): distinct n-grams over all n-grams, pooled across a model's outputs.
- loops (this harness): the output's tail is made of spans it already wrote: at least
  `LOOP_SHARE` of the n-grams that start in its last half already occurred earlier in it
  (needs at least `LOOP_MIN_TOKENS` tokens).

Tokens are lower-cased words and single punctuation marks (`\\w+|[^\\w\\s]`), so the counts do not
depend on any model's tokenizer.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable, Sequence

_TOKEN = re.compile(r"\w+|[^\w\s]")
REP_N = 4
DISTINCT_N = 2
LOOP_N = 4
LOOP_SHARE = 0.5
LOOP_MIN_TOKENS = 16


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.casefold())


def ngrams(toks: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]


def rep_n(text: str, n: int = REP_N) -> float:
    """seq-rep-n of one output: the share of its n-grams that repeat an n-gram it already has."""
    grams = ngrams(tokens(text), n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def loops(text: str, n: int = LOOP_N) -> bool:
    """True when the last half of the output mostly repeats n-grams written before it."""
    toks = tokens(text)
    if len(toks) < LOOP_MIN_TOKENS:
        return False
    grams = ngrams(toks, n)
    half = len(toks) // 2
    seen = set(grams[:half])
    tail = grams[half:]
    repeated = 0
    for gram in tail:
        repeated += gram in seen
        seen.add(gram)
    return repeated / len(tail) >= LOOP_SHARE


def distinct_counts(text: str, n: int = DISTINCT_N) -> Counter:
    """The n-gram counts of one output; distinct-n pools these over a set of outputs."""
    return Counter(ngrams(tokens(text), n))


def distinct_n(texts: Iterable[str], n: int = DISTINCT_N) -> float:
    """Corpus distinct-n: distinct n-grams / all n-grams over every output; 0 when there are none."""
    pooled: Counter = Counter()
    for text in texts:
        pooled.update(distinct_counts(text, n))
    total = sum(pooled.values())
    return len(pooled) / total if total else 0.0
