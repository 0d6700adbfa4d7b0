"""`run` end to end on the tiny model: every artifact of the run-folder contract."""

import json
import subprocess
import sys

import pytest

from harness.scoring.metrics import METRICS
from tests.conftest import REPO, run_tiny, tiny_overrides

pytestmark = pytest.mark.slow


def test_run_folder_contract(tiny_run):
    for name in ("spec.yaml", "manifest.json", "metrics.json", "predictions.jsonl", "report.md", "report.html",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "data/train.jsonl",
                 "data/heldout.jsonl", "train_log.jsonl"):
        assert (tiny_run / name).is_file(), name
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    for side in ("base", "tuned", "delta"):
        assert list(metrics[side]) == list(METRICS)
        for name in METRICS:
            entry = metrics[side][name]
            assert isinstance(entry["value"], float) and entry["ci95"][0] <= entry["ci95"][1]
    heldout = (tiny_run / "data" / "heldout.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in (tiny_run / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == len(heldout) == 8
    assert set(rows[0]) >= {"id", "title", "reference", "base", "tuned", "base_loops", "tuned_loops", "base_rep4",
                            "tuned_rep4"}
    for row in rows:
        for side in ("base", "tuned"):
            assert row["scores"][side]["loops"] == float(row[f"{side}_loops"])
            assert row["scores"][side]["rep4"] == row[f"{side}_rep4"]
    manifest = json.loads((tiny_run / "manifest.json").read_text())
    assert manifest["status"] == "completed"
    assert manifest["stages_done"] == ["prepare", "score_base", "train", "score_tuned", "metrics", "report"]
    assert manifest["packages"]["torch"] and manifest["device"].startswith("cpu")
    assert manifest["fast_path"] == {"quantize": False, "packing": False, "liger_kernels": False, "attention": "sdpa",
                                     "compile": "off", "fused_lora": False, "cuda_graphs": False}
    assert manifest["data_counts"]["heldout"] == 8 and manifest["train"]["steps"] == 4
    assert manifest["world_size"] == 1 and manifest["train"]["global_batch"] == 4  # batch 4 x 1 process x accum 1
    assert set(manifest["fingerprints"]) >= {"base_model", "tokenizer", "heldout_split", "generation", "adapter"}


def test_adapter_loads_with_plain_peft(tiny_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tiny_run / "adapter")
    assert any("lora_A" in name for name, _ in model.named_parameters())


def test_second_run_hits_the_base_cache_and_changes_miss_it(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HARNESS_SCORE_CACHE", str(tmp_path / "score-cache"))  # empty, whatever ran before
    first = run_tiny(tmp_path, tiny_model_dir)
    second = run_tiny(tmp_path, tiny_model_dir)
    third = run_tiny(tmp_path, tiny_model_dir, "generation.max_new_tokens=7")
    fourth = run_tiny(tmp_path, tiny_model_dir, "generation.no_repeat_ngram_size=3")
    manifests = [json.loads((r / "manifest.json").read_text()) for r in (first, second, third, fourth)]
    caches = [m["base_cache"] for m in manifests]
    assert [c["hit"] for c in caches] == [False, True, False, False]
    assert caches[0]["key"] == caches[1]["key"] != caches[2]["key"] != caches[3]["key"] != caches[0]["key"]
    generation = [m["fingerprints"]["generation"] for m in manifests]
    assert generation[0] == generation[1] and generation[3] not in (generation[0], generation[2])
    same = lambda r: (r / "scores" / "base_generations.jsonl").read_text()  # noqa: E731
    assert same(first) == same(second)


def test_cli_run_prints_summary_and_exit_codes(tmp_path, tiny_model_dir):
    args = [sys.executable, "-m", "harness", "run", str(REPO / "tasks" / "amazon_desc.yaml"),
            "--runs-dir", str(tmp_path / "runs")]
    overrides = [x for o in tiny_overrides(tiny_model_dir) for x in ("--set", o)]
    env = {"HARNESS_SCORE_CACHE": str(tmp_path / "cache"), "HARNESS_DEVICE": "cpu", "HF_HUB_OFFLINE": "1",
           "PATH": "/usr/bin:/bin"}
    done = subprocess.run(args + overrides, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "rougeL" in done.stdout and "run folder:" in done.stdout
    bad = subprocess.run(args + ["--set", "train.lrr=1"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"harness: error: {REPO / 'tasks' / 'amazon_desc.yaml'}: train.lrr: unknown key (did you mean 'lr'?)"]


def test_metrics_json_matches_the_written_schema(tiny_run):
    import jsonschema

    schema = json.loads((REPO / "docs" / "metrics.schema.json").read_text())
    jsonschema.validate(json.loads((tiny_run / "metrics.json").read_text()), schema)
    broken = json.loads((tiny_run / "metrics.json").read_text())
    del broken["delta"]["rougeL"]["ci95"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)
