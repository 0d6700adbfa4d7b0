"""The bench's loss check: each recipe's largest loss gap to the reference, against the noise band
that re-seeded runs of the reference measure in the same bench run (harness/benchmarks/bench.py, "Loss check").

Pure functions over the bench's training rows: no training here."""

import math

import pytest

from harness.benchmarks.loss_check import loss_check, loss_check_lines

SEED = 42


def row(recipe: str, losses: dict, seed: int = SEED, batch: int = 16, model: str = "smollm2") -> dict:
    return {"model": model, "recipe": recipe, "batch": batch, "train_seed": seed,
            "losses": {str(k): v for k, v in losses.items()}}


REFERENCE = {10: 3.00, 20: 2.50, 30: 2.20}


def test_a_gap_inside_the_band_is_noise_and_one_outside_is_not():
    rows = [row("harness_eager", REFERENCE),
            row("harness", {10: 3.02, 20: 2.47, 30: 2.21}),   # largest gap 0.03 at step 20
            row("unsloth", {10: 3.00, 20: 2.40, 30: 2.21}),   # largest gap 0.10 at step 20
            row("harness_eager", {10: 2.99, 20: 2.54, 30: 2.18}, seed=43)]  # band: 0.04 at step 20
    [check] = loss_check(rows, "harness_eager", SEED)
    assert check["noise_seeds"] == [43] and check["steps"] == ["10", "20", "30"]
    assert check["noise_band"] == pytest.approx(0.04) and check["noise_band_step"] == "20"
    assert check["recipes"]["harness"] == {"largest_gap": pytest.approx(0.03), "step": "20",
                                           "verdict": "within noise"}
    assert check["recipes"]["unsloth"]["largest_gap"] == pytest.approx(0.10)
    assert check["recipes"]["unsloth"]["verdict"] == "beyond noise"
    assert "harness_eager" not in check["recipes"]  # the reference is not judged against itself
    lines = loss_check_lines([check])
    assert "noise band 0.0400 (step 20)" in lines[1] and "seed 43" in lines[1] and "chance 1/2" in lines[1]
    assert lines[2:] == ["  harness: largest |loss - reference| 0.0300 (step 20): within noise",
                         "  unsloth: largest |loss - reference| 0.1000 (step 20): beyond noise"]


def test_the_band_is_the_widest_noise_run_at_the_steps_every_run_logged():
    rows = [row("harness_eager", {**REFERENCE, 40: 2.0}),
            row("harness", {10: 3.05, 20: 2.50, 30: 2.20}),  # logged no step 40: step 40 is not compared
            row("harness_eager", {10: 3.01, 20: 2.50, 30: 2.20, 40: 2.9}, seed=43),
            row("harness_eager", {10: 3.00, 20: 2.56, 30: 2.20, 40: 2.0}, seed=44)]
    [check] = loss_check(rows, "harness_eager", SEED)
    assert check["steps"] == ["10", "20", "30"] and check["noise_seeds"] == [43, 44]
    assert check["noise_band"] == pytest.approx(0.06) and check["noise_band_step"] == "20"
    assert check["recipes"]["harness"]["verdict"] == "within noise"


def test_each_model_and_batch_is_checked_apart_and_the_seed_recipe_never():
    rows = [row("seed", {10: 9.0}, batch=8),
            row("harness", REFERENCE), row("harness", {10: 3.01, 20: 2.5, 30: 2.2}, seed=43),
            row("unsloth", {10: 3.3, 20: 2.5, 30: 2.2}),
            row("harness", REFERENCE, batch=32), row("harness", {10: 3.2, 20: 2.5, 30: 2.2}, batch=32, seed=43),
            row("unsloth", {10: 3.1, 20: 2.5, 30: 2.2}, batch=32)]
    checks = loss_check(rows, "harness", SEED)
    assert [(c["batch"], c["recipes"]["unsloth"]["verdict"]) for c in checks] == \
        [(16, "beyond noise"), (32, "within noise")]


@pytest.mark.parametrize("rows, why", [
    ([row("harness", REFERENCE), row("unsloth", REFERENCE)], "no re-seeded reference run (--noise-seeds 0)"),
    ([row("harness", REFERENCE, seed=43), row("unsloth", REFERENCE)], "no reference run"),
    ([row("harness", REFERENCE), row("harness", {}, seed=43), row("unsloth", REFERENCE)],
     "a reference run logged no loss"),
    ([row("harness", {10: 3.0}), row("harness", {10: 3.0}, seed=43), row("unsloth", {20: 2.5})],
     "no step logged by every run (lower --loss-every)"),
    ([row("harness", REFERENCE), row("harness", {10: math.nan, 20: 2.5, 30: 2.2}, seed=43),
      row("unsloth", REFERENCE)], "a reference run's loss is not finite (step 10)"),
])
def test_a_check_that_cannot_be_made_says_why_and_never_passes(rows, why):
    [check] = loss_check(rows, "harness", SEED)
    assert check["noise_band"] is None
    assert check["recipes"]["unsloth"] == {"largest_gap": None, "step": None, "verdict": f"not judged: {why}"}
    assert loss_check_lines([check])[-1] == f"  unsloth: not judged: {why}"


def test_a_recipe_with_a_non_finite_or_no_loss_is_not_judged():
    rows = [row("harness_eager", REFERENCE), row("harness_eager", {10: 3.01, 20: 2.5, 30: 2.2}, seed=43),
            row("harness", {10: math.inf, 20: 2.5, 30: 2.2}), row("unsloth", {})]
    recipes = loss_check(rows, "harness_eager", SEED)[0]["recipes"]
    assert recipes["harness"] == {"largest_gap": None, "step": "10", "verdict": "not judged: a loss is not finite"}
    assert recipes["unsloth"]["verdict"] == "not judged: no loss logged"
