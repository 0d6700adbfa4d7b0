"""What every decoding engine shares: the statistics a `generate` call reports, the deterministic kernels
scoring runs under, whether the settings sample, and the output penalties (repetition and n-gram bans
counted over the generated tokens only).

Below both engines' modules (`generation`, which runs transformers' `generate`, and `graph_decoding`, our
own loop), so that neither imports the other for them.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

from harness.spec import GenerationSpec


@dataclass
class GenerationStats:
    """What one `generate` call did (recorded in the run manifest and by the bench)."""

    engine: str = ""
    batches: int = 0
    shapes: list[list[int]] = field(default_factory=list)  # [rows, prompt width] of each static shape used
    warmup_s: float = 0.0  # compiled: each shape's warm-up (compile and capture); graphs: each shape's capture
    candidates: int = 1  # sequences decoded per prompt: generation.mbr_samples under MBR, else 1
    engine_reason: str = ""  # why `auto` chose another engine than graphs ("" where it chose graphs, or was named)


# Attention kernels whose forward pass gives the same bits every call. Not cuDNN's (by elimination: the
# only other backend the default could pick for masked attention; not tested alone): on one H100, the static
# engine scoring the same 142 held-out prompts twice in one process gave 130 identical texts with PyTorch's
# default SDPA backends and 142 with the efficient kernel alone, or the math kernel alone
# (bench/diag_scoring_state.py --sdpa; reports/amazon_desc/RESULTS.md). Flash attention is left out too: its
# kernel does not take the padding masks scoring needs, so it was never used here.
DETERMINISTIC_SDPA = ("EFFICIENT_ATTENTION", "MATH")


@contextmanager
def deterministic_kernels():
    """Scoring with deterministic kernels: the same command gives the same outputs.

    bf16 greedy decoding flips a token on the last bit, so every kernel must give the same bits every call:
    PyTorch's deterministic algorithms, SDPA restricted to DETERMINISTIC_SDPA, and cuBLAS with the fixed
    `CUBLAS_WORKSPACE_CONFIG` that `harness.cli` sets before its first call."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with deterministic_algorithms(True), sdpa_kernel([getattr(SDPBackend, name) for name in DETERMINISTIC_SDPA]):
        yield


@contextmanager
def deterministic_algorithms(enabled: bool):
    """`torch.use_deterministic_algorithms(enabled)` (warn only) inside the block, the caller's setting after."""
    import torch

    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def sampled(gen: GenerationSpec) -> bool:
    """Whether decoding samples: `do_sample`, or MBR, whose candidates are sampled whatever do_sample says."""
    return gen.do_sample or gen.mbr_samples > 0


class OutputPenalties:
    """`repetition_penalty`, then `no_repeat_ngram_size`, over the generated tokens only, as fixed-shape tensor ops.

    The semantics of transformers' RepetitionPenaltyLogitsProcessor and NoRepeatNGramLogitsProcessor, but
    counted on the output only: those look at the whole sequence of a decoder-only model, the prompt and, in
    a batch, its left padding (the end-of-turn token), so they also punished repeating the product's own
    title and, in padded rows only, stopping: outputs depended on which prompts shared a batch.
    Hand-written rather than those processors over the output slice (what harness did before) for two
    reasons: the graphs engine replays fixed shapes, and transformers' n-gram ban walks every row's n-grams
    in Python with a host copy each step (both penalties at 512 rows: 154 ms a step against 43 ms here,
    2 CPU cores, bench/penalties_cost.py). The output buffer keeps its full `max_new_tokens` width and a device counter
    `n_valid` says how many columns are real; positions past it are masked, and every masked index points
    at a sink column past the vocabulary, so each scatter writes one value per index.
    tests/test_generation.py checks it against transformers' processors on the output, step by step."""

    def __init__(self, gen: GenerationSpec, device):
        import torch

        self.penalty, self.n = gen.repetition_penalty, gen.no_repeat_ngram_size
        width = gen.max_new_tokens
        self.columns = torch.arange(width, device=device)
        self.ngrams = self.n > 0 and width >= self.n
        if self.ngrams:
            self.window_ends = torch.arange(self.n, width + 1, device=device)  # window j covers columns j .. j+n-1
            self.prefix_offsets = torch.arange(1 - self.n, 0, device=device)  # the last n-1 columns before n_valid

    @property
    def active(self) -> bool:
        return self.penalty != 1.0 or self.ngrams

    def __call__(self, scores, out, n_valid) -> None:
        """Penalise `scores` [rows, vocab + 1] (float32, last column the sink) in place, given the first
        `n_valid` ([1] long tensor) columns of `out` [rows, max_new_tokens]."""
        import torch

        sink = scores.shape[1] - 1
        if self.penalty != 1.0:  # each distinct output token once: negative scores times, positive over, the penalty
            ids = out.masked_fill(self.columns >= n_valid, sink)
            picked = scores.gather(1, ids)
            scores.scatter_(1, ids, torch.where(picked < 0, picked * self.penalty, picked / self.penalty))
        if self.ngrams:  # a window whose first n-1 tokens equal the last n-1 generated bans its n-th
            windows = out.unfold(1, self.n, 1)
            prefix = out.gather(1, (n_valid + self.prefix_offsets).clamp(min=0).expand(out.shape[0], -1))
            matches = (windows[..., :-1] == prefix.unsqueeze(1)).all(dim=-1) & (self.window_ends <= n_valid)
            scores.scatter_(1, torch.where(matches, windows[..., -1], sink), float("-inf"))


class _OutputProcessor:
    """OutputPenalties as a transformers logits processor, for the engines that run `generate`: the sequence
    so far (prompt width `width`, then the output) in, the penalised scores out."""

    def __init__(self, gen: GenerationSpec, width: int, device):
        self.penalties, self.width, self.max_new_tokens = OutputPenalties(gen, device), width, gen.max_new_tokens

    def __call__(self, input_ids, scores):
        import torch

        out = input_ids[:, self.width:]
        n_valid = torch.tensor([out.shape[1]], device=out.device)
        out = torch.nn.functional.pad(out, (0, self.max_new_tokens - out.shape[1]))  # masked past n_valid
        sunk = torch.cat([scores, scores.new_zeros(scores.shape[0], 1)], dim=1)  # the sink column
        self.penalties(sunk, out, n_valid)
        return sunk[:, :-1]


def output_penalties(gen: GenerationSpec, width: int, device):
    """The spec's repetition penalties over the output (prompt width `width`) as logits processors."""
    from transformers import LogitsProcessorList

    processors = LogitsProcessorList()
    if gen.repetition_penalty != 1.0 or gen.no_repeat_ngram_size > 0:
        processors.append(_OutputProcessor(gen, width, device))
    return processors
