"""The bench's loss check: is each recipe's loss curve unchanged beyond noise? (harness/benchmarks/bench.py,
"Loss check", says how the noise band is measured.)
"""

from __future__ import annotations

import math

# The loss check's reference, the first of these asked: plain (uncaptured, uncompiled) harness numerics first.
LOSS_REFERENCES = ("harness_nographs", "harness_eager", "harness", "trl_tuned", "harness_sdpa")


def run_name(row: dict, seed: int) -> str:
    return row["recipe"] if row["train_seed"] == seed else f"{row['recipe']} (seed {row['train_seed']})"


def loss_lines(rows: list[dict], seed: int) -> list[str]:
    """Training loss of each run at the steps all logged, per model and batch (same steps, same data)."""
    lines = []
    for model, batch in dict.fromkeys((r["model"], r["batch"]) for r in rows if r["recipe"] != "seed"):
        mine = [r for r in rows if (r["model"], r["batch"]) == (model, batch) and r["recipe"] != "seed"
                and r["losses"]]
        steps = sorted(set.intersection(*(set(r["losses"]) for r in mine)), key=int) if mine else []
        if steps:
            lines += ["", f"{model}, batch {batch}: training loss at step " + ", ".join(steps)]
            lines += [f"  {run_name(r, seed)}: " + ", ".join(f"{r['losses'][k]:.4f}" for k in steps) for r in mine]
    return lines


def _worst(gaps: list[tuple[float, str]]) -> tuple[float, str]:
    """The largest (gap, step); a non-finite gap (a NaN or infinite loss) comes first, so it cannot pass unseen."""
    return max(gaps, key=lambda g: (not math.isfinite(g[0]), g[0] if math.isfinite(g[0]) else 0.0))


def _largest_gap(losses: dict[str, float], reference: dict[str, float], steps: list[str]) -> tuple[float, str]:
    """max |loss - reference loss| over `steps`, and the step where it is."""
    return _worst([(abs(losses[k] - reference[k]), k) for k in steps])


def loss_check(rows: list[dict], reference: str, seed: int) -> list[dict]:
    """Per model and batch: is each recipe's loss curve unchanged beyond noise? (module doc, "Loss check")

    `rows` are the bench's training rows; those of `reference` with another train_seed than `seed` are
    its re-seeded noise runs. Compared at the steps every run of the model and batch logged. A check
    that cannot be made says why in `verdict`, never "within noise"."""
    checks = []
    for model, batch in dict.fromkeys((r["model"], r["batch"]) for r in rows if r["recipe"] != "seed"):
        group = [r for r in rows if (r["model"], r["batch"]) == (model, batch) and r["recipe"] != "seed"]
        ref = next((r for r in group if r["recipe"] == reference and r["train_seed"] == seed), None)
        noise = [r for r in group if r["recipe"] == reference and r["train_seed"] != seed]
        others = [r for r in group if r["train_seed"] == seed and r is not ref]
        references = [ref, *noise] if ref else []
        logged = [r for r in references + others if r["losses"]]
        steps = sorted(set.intersection(*(set(r["losses"]) for r in logged)), key=int) if logged else []
        check = {"model": model, "batch": batch, "reference": reference, "train_seed": seed,
                 "noise_seeds": [r["train_seed"] for r in noise], "steps": steps, "noise_band": None, "recipes": {}}
        why_not = ("no reference run" if ref is None else
                   "no re-seeded reference run (--noise-seeds 0)" if not noise else
                   "a reference run logged no loss" if any(not r["losses"] for r in references) else
                   "no step logged by every run (lower --loss-every)" if not steps else None)
        if why_not is None:
            band, band_step = _worst([_largest_gap(r["losses"], ref["losses"], steps) for r in noise])
            if math.isfinite(band):
                check.update(noise_band=band, noise_band_step=band_step)
            else:
                why_not = f"a reference run's loss is not finite (step {band_step})"
        for r in others:
            gap, step = _largest_gap(r["losses"], ref["losses"], steps) if why_not is None and r["losses"] \
                else (None, None)
            verdict = (f"not judged: {why_not}" if why_not else "not judged: no loss logged" if gap is None else
                       "not judged: a loss is not finite" if not math.isfinite(gap) else
                       "within noise" if gap <= check["noise_band"] else "beyond noise")
            check["recipes"][r["recipe"]] = {"largest_gap": gap if gap is not None and math.isfinite(gap) else None,
                                             "step": step, "verdict": verdict}
        checks.append(check)
    return checks


def loss_check_lines(checks: list[dict]) -> list[str]:
    lines = []
    for c in checks:
        ref = f"{c['reference']} (seed {c['train_seed']})"
        if c["noise_band"] is None:
            lines += ["", f"loss check, {c['model']}, batch {c['batch']}: reference {ref}"]
        else:
            k = len(c["noise_seeds"])
            lines += ["", f"loss check, {c['model']}, batch {c['batch']}: reference {ref}; noise band "
                          f"{c['noise_band']:.4f} (step {c['noise_band_step']}) = largest |loss - reference| of "
                          f"{c['reference']} re-seeded (seed {', '.join(map(str, c['noise_seeds']))}, same batches) "
                          f"at steps {', '.join(c['steps'])}; a recipe that changes only the randomness lands "
                          f"beyond it with chance 1/{k + 1}"]
        for name, e in c["recipes"].items():
            gap = "" if e["largest_gap"] is None else f"largest |loss - reference| {e['largest_gap']:.4f} " \
                                                       f"(step {e['step']}): "
            lines.append(f"  {name}: {gap}{e['verdict']}")
    return lines
