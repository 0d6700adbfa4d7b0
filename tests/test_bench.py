"""The benchmark's CPU smoke test: every recipe and the generation comparison run end to end.

CPU numbers mean nothing (the bench needs --quick to run here); what is checked is that each
recipe trains on the same examples, that rates and ratios are computed from measured steps, and
that the output table and JSON carry them."""

import json
from pathlib import Path

import pytest

from harness.cli import main
from tests.conftest import REPO

pytestmark = pytest.mark.slow


FAKE_UNSLOTH = '''"""Stand-in with Unsloth's API on plain transformers + PEFT (CPU test of the bench's subprocess wiring)."""
import peft
import transformers


class FastLanguageModel:
    @staticmethod
    def from_pretrained(model_name, max_seq_length, dtype, load_in_4bit, load_in_16bit, use_gradient_checkpointing,
                        fix_tokenizer, use_exact_model_name):
        model = transformers.AutoModelForCausalLM.from_pretrained(model_name, dtype=dtype)
        return model, transformers.AutoTokenizer.from_pretrained(model_name)

    @staticmethod
    def get_peft_model(model, r, lora_alpha, lora_dropout, target_modules, bias, use_gradient_checkpointing,
                       random_state):
        return peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                                          target_modules=target_modules, bias=bias,
                                                          task_type="CAUSAL_LM"))
'''


def _site(tmp_path, source: str):
    (tmp_path / "site" / "unsloth").mkdir(parents=True)
    (tmp_path / "site" / "unsloth" / "__init__.py").write_text(source)
    return str(tmp_path / "site")


def test_bench_quick_runs_every_recipe_and_generation(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "bench.json"
    code = main(["-q", "bench", str(REPO / "tasks" / "amazon_desc.yaml"), "--quick", "--only", "smollm2,generate",
                 "--recipes", "seed,trl_tuned,harness,unsloth", "--examples", "80", "--max-length", "128",
                 "--batch", "8", "--seed-steps", "6", "--warmup", "2", "--loss-every", "1", "--gen-examples", "6",
                 "--loop-examples", "3", "--work", str(tmp_path / "work"), "--out", str(out),
                 "--unsloth-site", _site(tmp_path, FAKE_UNSLOTH),
                 "--set", f"model.base={tiny_model_dir}", "--set", "model.random_weights=true",
                 "--set", "generation.max_new_tokens=4",
                 "--gen-rows", "4,2"])
    assert code == 0
    results = json.loads(out.read_text())
    probe = results["base_probe"][Path(tiny_model_dir).name]
    assert probe["random_weights"] and probe["perplexity"] > 1000  # measured, declared
    assert [(r["recipe"], r["batch"], r["train_seed"]) for r in results["training"]] == \
        [("seed", 8, 42), ("trl_tuned", 8, 42), ("harness", 8, 42), ("unsloth", 8, 42),
         ("harness", 8, 43)] and "failures" not in results  # last: the loss check's re-seeded reference
    *primary, noise = results["training"]
    rows = {r["recipe"]: r for r in primary}
    assert rows["seed"]["optimizer_steps"] == 6  # stopped by --seed-steps
    # Tokens are counted from the batches: harness and unsloth train the very same token ids.
    assert rows["harness"]["tokens"] == rows["unsloth"]["tokens"] > rows["seed"]["tokens"] > 0
    assert rows["harness"]["tokens"] == pytest.approx(rows["trl_tuned"]["tokens"], rel=0.1)  # trl tokenizes itself
    for r in rows.values():
        assert r["warmup_steps"] == 2 and 0 < r["timed_tokens"] < r["tokens"] and r["job_s"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["timed_tokens"] / (r["step_time_s"] * (r["optimizer_steps"] - 2)))
        assert r["mfu_palm"] is None  # no peak FLOPs on CPU
    label = tiny_model_dir.name
    assert set(rows["harness"]["losses"]) == set(rows["unsloth"]["losses"]) == set(noise["losses"]) >= {"1", "2"}
    # The noise run trains the same batches in the same order: its first loss, before LoRA (initialised
    # to zero) changes anything, is the reference's; then its other LoRA init and dropout masks show.
    assert noise["losses"]["1"] == rows["harness"]["losses"]["1"] and noise["losses"] != rows["harness"]["losses"]
    [check] = results["loss_check"]
    assert (check["reference"], check["noise_seeds"]) == ("harness", [43])
    assert set(check["recipes"]) == {"trl_tuned", "unsloth"}
    gaps = {k: abs(noise["losses"][k] - rows["harness"]["losses"][k]) for k in check["steps"]}
    assert check["noise_band"] == max(gaps.values()) > 0
    for name, entry in check["recipes"].items():
        gap = max(abs(rows[name]["losses"][k] - rows["harness"]["losses"][k]) for k in check["steps"])
        assert entry["largest_gap"] == gap
        assert entry["verdict"] == ("within noise" if gap <= check["noise_band"] else "beyond noise")
    ratio = results["ratios"][f"{label}: harness (batch 8) / unsloth (batch 8) tokens/s"]
    assert ratio == pytest.approx(rows["harness"]["tokens_per_s"] / rows["unsloth"]["tokens_per_s"])
    assert f"{label}: harness (batch 8) / trl_tuned (batch 8) tokens/s" in results["ratios"]
    assert results["unsloth_versions"]["trl"]  # the subprocess reports its own packages
    # one generation comparison per --gen-rows value; no 1.1B-architecture generation on CPU
    assert list(results["generation"]) == [f"{label}, 4 rows", f"{label}, 2 rows"]
    gen, narrow = results["generation"][f"{label}, 4 rows"], results["generation"][f"{label}, 2 rows"]
    assert narrow["scorers"]["loop"] == gen["scorers"]["loop"]  # the one-at-a-time loop is measured once
    assert narrow["scorers"]["graphs"]["rows"] == narrow["scorers"]["static"]["rows"] == 2
    scorers = gen["scorers"]
    assert list(scorers) == ["loop", "dynamic", "static", "fast_cold", "fast", "graphs"] and gen["failures"] == []
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
    # graphs: our own loop over the static batches (uncaptured on CPU): the static engine's texts, capture 0 s
    graphs = gen["graphs"]
    assert scorers["graphs"]["engine"] == "graphs" and scorers["graphs"]["rows"] == 4
    assert gen["identical_outputs_share"]["graphs vs static"] == gen["identical_outputs_share"]["graphs vs loop"] == 1.0
    assert graphs["capture_s"] == 0.0 and graphs["tokens_per_s_without_capture"] == pytest.approx(
        scorers["graphs"]["tokens_per_s"])
    assert graphs["amortised_tokens_per_s"] == pytest.approx(scorers["graphs"]["tokens_per_s"])
    assert gen["ratios"]["graphs (capture included) / static"] == pytest.approx(
        scorers["graphs"]["tokens_per_s"] / scorers["static"]["tokens_per_s"])
    assert gen["ratios"]["graphs / fast, both amortised"] == pytest.approx(
        graphs["amortised_tokens_per_s"] / gen["amortised_tokens_per_s"])
    bound = gen["bandwidth_bound"]
    assert bound["weight_bytes"] > 0 and bound["weights_only_tokens_per_s"] is None  # no HBM figure for a CPU
    assert bound["rows"] == 4 and bound["graphs_share_of_with_kv_bound"] is None
    assert f"{label}, 4 rows generation: fast / dynamic tokens/s" in results["ratios"]
    assert f"{label}, 2 rows generation: graphs, capture amortised over 1,000 / loop tokens/s" in results["ratios"]
    assert results["device"].startswith("cpu")
    printed = capsys.readouterr().out
    assert "unsloth process: " in printed and f"{label}, batch 8: training loss at step 1, 2, 3" in printed
    assert f"loss check, {label}, batch 8: reference harness (seed 42); noise band" in printed
    assert f"  unsloth: largest |loss - reference| {check['recipes']['unsloth']['largest_gap']:.4f}" in printed
    assert "| graphs (own loop, CUDA graphs) | graphs | 4 | 6 |" in printed and "graphs: capture c = 0.00 s" in printed


def test_bench_says_in_one_line_why_unsloth_cannot_run(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "bench.json"
    site = _site(tmp_path, "raise NotImplementedError('Unsloth cannot find any torch accelerator')\n")
    code = main(["-q", "bench", "amazon_desc", "--quick", "--only", "smollm2", "--recipes", "unsloth",
                 "--batch", "8,16", "--work", str(tmp_path / "work"), "--out", str(out), "--unsloth-site", site,
                 "--set", f"model.base={tiny_model_dir}", "--set", "model.random_weights=true"])
    assert code == 0
    expected = "unsloth: not run (NotImplementedError: Unsloth cannot find any torch accelerator)"
    assert json.loads(out.read_text())["skipped"] == [expected]  # asked once, not once per batch
    assert capsys.readouterr().out.count(expected) == 1


def test_bench_refuses_cpu_without_quick(tiny_model_dir, capsys):
    assert main(["bench", "amazon_desc", "--set", f"model.base={tiny_model_dir}"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, message", [("--recipes", "seed,fast", "unknown ['fast']"),
                                                  ("--batch", "16,x", "expected positive integers"),
                                                  ("--gen-rows", "256,0", "--gen-rows: expected positive integers"),
                                                  ("--gen-models", "smollm2,phi", "--gen-models: unknown ['phi']")])
def test_bench_rejects_bad_recipe_and_batch_lists(tiny_model_dir, capsys, flag, value, message):
    assert main(["bench", "amazon_desc", "--quick", flag, value, "--set", f"model.base={tiny_model_dir}"]) == 2
    assert message in capsys.readouterr().err
