"""The benchmark's CPU smoke test: every recipe and the generation comparison run end to end.

CPU numbers mean nothing (the bench needs --quick to run here); what is checked is that each
recipe trains on the same examples, that rates and ratios are computed from measured steps, and
that the output table and JSON carry them."""

import json

import pytest

from harness.cli import main
from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_bench_quick_runs_every_recipe_and_generation(tmp_path, tiny_model_dir):
    out = tmp_path / "bench.json"
    code = main(["-q", "bench", str(REPO / "tasks" / "amazon_desc.yaml"), "--quick", "--only", "smollm2,generate",
                 "--examples", "200", "--max-length", "128", "--batch", "4,8", "--seed-steps", "6", "--gen-examples", "6",
                 "--loop-examples", "3", "--work", str(tmp_path / "work"), "--out", str(out),
                 "--set", f"model.base={tiny_model_dir}", "--set", "generation.max_new_tokens=4",
                 "--set", "generation.static_batch_size=4"])
    assert code == 0
    results = json.loads(out.read_text())
    assert [(r["recipe"], r["batch"]) for r in results["training"]] == \
        [("seed", 8), ("trl_tuned", 16), ("harness", 4), ("harness", 8)] and "failures" not in results
    rows = {r["recipe"]: r for r in results["training"]}  # harness: the batch-8 row
    assert rows["seed"]["optimizer_steps"] == 6  # stopped by --seed-steps
    assert rows["harness"]["tokens"] == rows["trl_tuned"]["tokens"] > rows["seed"]["tokens"] > 0
    assert all(r["tokens_per_s"] > 0 and r["mfu_palm"] is None for r in rows.values())  # no peak FLOPs on CPU
    ratio = results["ratios"][f"{tiny_model_dir.name}: harness (batch 8) / seed tokens/s"]
    assert f"{tiny_model_dir.name}: harness (batch 4) / trl_tuned tokens/s" in results["ratios"]
    assert ratio == pytest.approx(rows["harness"]["tokens_per_s"] / rows["seed"]["tokens_per_s"])
    assert list(results["generation"]) == [tiny_model_dir.name]  # no 1.1B-architecture generation on CPU
    gen = results["generation"][tiny_model_dir.name]
    scorers = gen["scorers"]
    assert list(scorers) == ["loop", "dynamic", "static", "fast_cold", "fast"] and gen["failures"] == []
    assert scorers["loop"]["examples"] == 3 and scorers["loop"]["rows"] == 1
    assert scorers["fast"]["examples"] == 6 and scorers["fast"]["engine"] == "static"  # CPU: the fast path uncompiled
    assert scorers["fast"]["rows"] == scorers["dynamic"]["rows"] == 4
    assert all(r["tokens"] > 0 and r["tokens_per_s"] == pytest.approx(r["tokens"] / r["seconds"])
               for r in scorers.values())
    assert gen["ratios"]["fast / loop"] == pytest.approx(scorers["fast"]["tokens_per_s"] / scorers["loop"]["tokens_per_s"])
    warm, cold = scorers["fast"], scorers["fast_cold"]
    compile_s = max(cold["seconds"] - warm["seconds"], 0.0)
    assert gen["amortised_tokens_per_s"] == pytest.approx(
        1000 / 6 * warm["tokens"] / (1000 / 6 * warm["seconds"] + compile_s))
    assert gen["identical_outputs_share"]["fast vs static"] == 1.0  # same engine, same batches
    bound = gen["bandwidth_bound"]
    assert bound["weight_bytes"] > 0 and bound["weights_only_tokens_per_s"] is None  # no HBM figure for a CPU
    assert f"{tiny_model_dir.name} generation: fast / dynamic tokens/s" in results["ratios"]
    assert results["device"].startswith("cpu")


def test_bench_refuses_cpu_without_quick(tiny_model_dir, capsys):
    assert main(["bench", "amazon_desc", "--set", f"model.base={tiny_model_dir}"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, message", [("--recipes", "seed,fast", "unknown ['fast']"),
                                                  ("--batch", "16,x", "expected positive integers")])
def test_bench_rejects_bad_recipe_and_batch_lists(tiny_model_dir, capsys, flag, value, message):
    assert main(["bench", "amazon_desc", "--quick", flag, value, "--set", f"model.base={tiny_model_dir}"]) == 2
    assert message in capsys.readouterr().err
