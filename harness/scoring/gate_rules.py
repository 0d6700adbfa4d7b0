"""The regression gate's rules: pure statistics on two sides' outputs, unit-tested without a model.

Each rule of `spec.gate` becomes a `CheckResult`: non-inferiority of the paired delta against a margin,
an absolute floor, and the format guards. `harness check` (harness/recipes/check.py) gathers the outputs
and calls `evaluate`; harness/reporting/verdict.py renders what it returns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from harness.errors import CannotJudge
from harness.scoring.metrics import (HIGHER_IS_BETTER, MetricSettings, ModelOutputs, bootstrap_replicates,
                                     paired_comparison)
from harness.spec import GateSpec

Z_POWER = 1.96 + 0.84  # two-sided 5% test with 80% power


@dataclass
class CheckResult:
    """One rule's outcome, promptfoo-style. `score` is the number the rule tested."""

    name: str
    passed: bool
    score: float
    reason: str


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _require_finite(name: str, *values: float) -> None:
    """A NaN compares False both ways, so it could pass a rule by accident: refuse it instead."""
    if not all(math.isfinite(v) for v in values):
        raise CannotJudge(f"{name}: not a finite number ({', '.join(map(str, values))})")


def margin_check(metric: str, delta: float, ci95: list[float], margin: float, mde: float, n: int) -> CheckResult:
    """Non-inferiority on the paired delta (candidate - baseline): fail only when the whole 95%
    interval lies beyond the margin on the bad side, so noise alone does not fail a build."""
    low, high = ci95
    _require_finite(f"{metric}.margin", delta, low, high, margin, mde)
    if HIGHER_IS_BETTER[metric]:
        passed, bound = not high < -margin, f"fails only if the upper end is below -{_fmt(margin)}"
    else:
        passed, bound = not low > margin, f"fails only if the lower end is above +{_fmt(margin)}"
    reason = f"delta {delta:+.4g}, 95% CI [{low:+.4g}, {high:+.4g}]; {bound}"
    if not passed:
        reason = f"regression: {reason}"
    if mde > margin:
        reason += f"; underpowered: n={n} detects only changes of about {_fmt(mde)} (MDE) > margin {_fmt(margin)}"
    return CheckResult(f"{metric}.margin", passed, float(delta), reason)


def floor_check(metric: str, value: float, floor: float) -> CheckResult:
    """Absolute floor on the candidate's value (a ceiling for lower-is-better metrics)."""
    _require_finite(f"{metric}.floor", value, floor)
    if HIGHER_IS_BETTER[metric]:
        passed, words = value >= floor, ("at or above the floor" if value >= floor else "below the floor")
    else:
        passed, words = value <= floor, ("at or below the ceiling" if value <= floor else "above the ceiling")
    reason = f"candidate {metric} {_fmt(value)} {words} {_fmt(floor)}"
    return CheckResult(f"{metric}.floor", passed, float(value), reason)


def guard_check(name: str, share: float, limit: float) -> CheckResult:
    """A format guard on the candidate: a metric can hold up while outputs go empty, run on or loop."""
    _require_finite(f"guard.{name}", share, limit)
    passed = share <= limit
    return CheckResult(f"guard.{name}", passed, float(share),
                       f"{share:.0%} of candidate outputs ({'within' if passed else 'over'} the limit {limit:.0%})")


def evaluate(gate: GateSpec, baseline: ModelOutputs, candidate: ModelOutputs, shares: dict,
             settings: MetricSettings) -> tuple[list[CheckResult], list[str], dict]:
    """All rules of `gate` for candidate vs baseline; returns results, power warnings, metrics.

    Both sides are resampled with the same seeded draws (paired), so the spread of the delta
    replicates is what the test can resolve: MDE = (1.96 + 0.84) * std(delta replicates).
    """
    n = len(candidate.references)
    paired = paired_comparison(baseline, candidate, settings)
    reps_b, reps_c = bootstrap_replicates(baseline, settings), bootstrap_replicates(candidate, settings)
    results, warnings = [], []
    for rule in gate.rules:
        m = rule.metric
        mde = Z_POWER * float(np.std(reps_c[m] - reps_b[m]))
        results.append(margin_check(m, paired["delta"][m]["value"], paired["delta"][m]["ci95"], rule.margin, mde, n))
        if mde > rule.margin:
            warnings.append(f"{m}: the held-out set (n={n}) is too small to detect a regression of the margin "
                            f"{_fmt(rule.margin)}; minimum detectable effect about {_fmt(mde)}")
        if rule.floor is not None:
            results.append(floor_check(m, paired["b"][m]["value"], rule.floor))
    results.append(guard_check("empty_share", shares["empty_share"], gate.max_empty_share))
    results.append(guard_check("truncated_share", shares["truncated_share"], gate.max_truncated_share))
    if gate.max_loop_share is not None:
        results.append(guard_check("loop_share", shares["loop_share"], gate.max_loop_share))
    metrics = {m: {"baseline": paired["a"][m]["value"], "candidate": paired["b"][m]["value"],
                   "delta": paired["delta"][m]["value"], "delta_ci95": paired["delta"][m]["ci95"]}
               for m in dict.fromkeys(r.metric for r in gate.rules)}
    return results, warnings, metrics
