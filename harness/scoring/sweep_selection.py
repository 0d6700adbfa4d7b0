"""The sweep's selection rule: what a trial is ranked by on the validation slice, and which trials are feasible.

Pure functions of a trial's validation scores (`sweepfolder.validation_scores`), shared by the sweep recipe,
which chooses, and the sweep report, which shows why.
"""

from __future__ import annotations

from harness.scoring.metrics import HIGHER_IS_BETTER
from harness.spec import SweepSpec


def paired_gains(scores: dict, metrics: list[str]) -> dict[str, float]:
    """Each metric's worst plausible gain of tuned over base: the lower bound of the paired 95% CI of
    tuned − base, sign-flipped where lower is better (perplexity: −upper bound). Above 0: tuned beat
    base on that metric with the CI clear of zero; a bare point estimate would reward a lucky slice."""
    gains = {}
    for metric in metrics:
        low, high = scores["delta_ci95"][metric]
        gains[metric] = low if HIGHER_IS_BETTER[metric] else -high
    return gains


def trial_value(scores: dict, select: str | list[str]) -> float:
    """What a trial is ranked by: one metric's tuned value (sweep.select a name), or the worst paired gain
    over the listed metrics (sweep.select a list), so no listed metric may be traded for another."""
    if isinstance(select, str):
        return scores["tuned"][select]
    return min(paired_gains(scores, select).values())


def maximizes(select: str | list[str]) -> bool:
    return not isinstance(select, str) or HIGHER_IS_BETTER[select]


def select_label(select: str | list[str]) -> str:
    """The rule's value in words: the metric's name, or "worst paired gain (rougeL, chrf)"."""
    return select if isinstance(select, str) else f"worst paired gain ({', '.join(select)})"


def loop_constraints(guards: dict, sweep: SweepSpec) -> dict[str, float]:
    """Optuna constraints (feasible when every value <= 0): tuned outputs must loop no more often than
    sweep.max_loop_share, nor than the base model's outputs on the same slice."""
    tuned = guards["tuned"]["loop_share"]
    return {"loop_share_over_max": tuned - sweep.max_loop_share,
            "loop_share_over_base": tuned - guards["base"]["loop_share"]}
