"""Results that leave harness: the model card, experiment trackers (train.report_to) and `export`.

One tiny run per architecture trains on a stand-in embedded model (the tiny model registered under
`embedded:` with a public id, in a cache folder of its own), with TensorBoard and MLflow on: the card,
what the trackers logged, the adapter's public base id and the merged export are all read back from it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import re
import shutil
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import yaml

from harness import models
from harness.cli import main
from harness.errors import ModelError
from harness.models import adapter_fit
from harness.models import base_files
from harness.spec import ModelSpec
from tests.conftest import REPO, tiny_overrides

TASK = str(REPO / "tasks" / "amazon_desc.yaml")
HAS = {name: importlib.util.find_spec(module) is not None
       for name, module in (("tensorboard", "tensorboard"), ("mlflow", "mlflow"))}
TRACKERS = [name for name, installed in HAS.items() if installed]
SMOLLM2 = base_files.EMBEDDED_MODELS["smollm2-135m-instruct"]


def needs(tracker: str):
    return pytest.mark.skipif(not HAS[tracker], reason=f"{tracker} is not installed (pip install 'harness[tracking]')")


@pytest.fixture(scope="module")
def stand_ins(tiny_model_dir, tiny_gemma3_dir, tmp_path_factory):
    """Both tiny models as embedded models (`embedded:tiny-llama`, `embedded:tiny-gemma3`) with public ids, in a
    cache of their own; the module's runs, exports and evals work in its folder."""
    root = tmp_path_factory.mktemp("travel")
    cache = root / "cache"
    entries = {}
    for name, folder in (("tiny-llama", tiny_model_dir), ("tiny-gemma3", tiny_gemma3_dir)):
        entry = dataclasses.replace(SMOLLM2, name=name, sha256=f"{name}-sha", hub_id=f"example-org/{name}",
                                    license="Apache-2.0", hub_license="apache-2.0")
        target = cache / "models" / f"{name}-bf16"
        shutil.copytree(folder, target)
        (target / base_files.CONVERTED_MARKER).write_text(json.dumps({"sha256": entry.sha256}), encoding="utf-8")
        entries[name] = entry
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(base_files, "EMBEDDED_MODELS", {**base_files.EMBEDDED_MODELS, **entries})
        mp.setenv("HARNESS_CACHE", str(cache))
        mp.setenv("HARNESS_SCORE_CACHE", str(root / "score-cache"))
        mp.setenv("HARNESS_DEVICE", "cpu")
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.chdir(root)  # reports/ lands here
        yield root, cache


def arch_name(arch) -> str:
    return "tiny-gemma3" if "prompt.template=alpaca" in arch[1] else "tiny-llama"


def cli(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(list(args))
    return code, out.getvalue()


def sets(arch, *extra: str) -> list[str]:
    overrides = [o for o in tiny_overrides(arch[0], *arch[1], *extra) if not o.startswith("model.base=")]
    return [x for o in [f"model.base=embedded:{arch_name(arch)}", *overrides] for x in ("--set", o)]


@pytest.fixture(scope="module")
def travelled(stand_ins, tiny_arch) -> Path:
    """A finished tiny run on the stand-in embedded model, every installed tracker on."""
    root, _ = stand_ins
    report_to = f"train.report_to=[{', '.join(TRACKERS)}]" if TRACKERS else "train.report_to=none"
    code, out = cli("run", TASK, "--runs-dir", str(root / "runs"), *sets(tiny_arch, report_to))
    assert code == 0, out
    return Path(re.search(r"run folder: (.*)", out).group(1))


def read(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


# -- the model card ----------------------------------------------------------------------------
@pytest.mark.slow
def test_the_adapter_card_says_what_the_run_found(travelled, stand_ins, tiny_arch):
    from huggingface_hub import ModelCard

    card_text = (travelled / "adapter" / "README.md").read_text(encoding="utf-8")
    assert "[More Information Needed]" not in card_text  # PEFT's empty template is gone
    meta = front_matter(card_text)
    public = f"example-org/{arch_name(tiny_arch)}"
    assert meta["base_model"] == public and meta["library_name"] == "peft" and meta["license"] == "apache-2.0"
    assert {"lora", "peft", "harness"} <= set(meta["tags"])
    metrics = read(travelled / "metrics.json")
    [result] = meta["model-index"][0]["results"]
    assert result["task"]["type"] == "text-generation" and result["dataset"]["split"] == "heldout"
    logged = {m["type"]: m["value"] for m in result["metrics"]}
    assert logged == {name: stat["value"] for name, stat in metrics["tuned"].items()}
    assert ModelCard(card_text).data.eval_results[0].metric_value == metrics["tuned"]["rouge1"]["value"]
    manifest = read(travelled / "manifest.json")
    body = card_text.split("---\n", 2)[2]
    for needle in (f"[{public}](https://huggingface.co/{public})", "license `Apache-2.0`",
                   f"An answer ends with `{manifest['prompt_format']['eos_token']}`",
                   manifest["fingerprints"]["heldout_split"], "`amazon_demo.jsonl`", "r 16, alpha 32",
                   f"{manifest['train']['seconds']} s", manifest["device"], "python -m harness run " + TASK,
                   "--set model.base=embedded:" + arch_name(tiny_arch), "| rougeL ↑ |", "| perplexity ↓ |"):
        assert needle in body, needle
    delta = metrics["delta"]["perplexity"]
    assert f"{delta['value']:+.2f} [{delta['ci95'][0]:+.2f}, {delta['ci95'][1]:+.2f}]" in body
    for warning in metrics["warnings"]:  # the guards that fired
        assert f"- {warning}" in body
    # an embedded model is the de-quantized GGUF, and the card says so
    assert "4-bit GGUF `SmolLM2-135M-Instruct.Q4_1.gguf`" in body
    # Counts and settings only: no held-out or training record text.
    rows = [json.loads(line) for line in (travelled / "predictions.jsonl").read_text().splitlines()]
    train = [json.loads(line) for line in (travelled / "data" / "train.jsonl").read_text().splitlines()[:20]]
    for text in [r["title"] for r in rows] + [r["reference"] for r in rows] + [t["title"] for t in train]:
        assert text not in card_text


@pytest.mark.slow
def test_the_adapter_names_the_public_base_and_no_cache_path(travelled, stand_ins, tiny_arch):
    _, cache = stand_ins
    config = read(travelled / "adapter" / "adapter_config.json")
    assert config["base_model_name_or_path"] == f"example-org/{arch_name(tiny_arch)}"
    for path in (travelled / "adapter").iterdir():
        assert str(cache).encode() not in path.read_bytes(), path.name


@pytest.mark.slow
def test_eval_matches_the_hub_id_to_the_embedded_base(travelled, stand_ins, tiny_arch):
    name = arch_name(tiny_arch)
    model_ref = base_files.resolve_base(f"embedded:{name}")
    adapter_fit.check_adapter_fits(travelled / "adapter", model_ref, ModelSpec(base=f"embedded:{name}"))
    # The same folder named by path: nothing says it is example-org/<name> unless an alias does.
    folder = str(tiny_arch[0])
    with pytest.raises(ModelError, match=f"names base model 'example-org/{name}'"):
        adapter_fit.check_adapter_fits(travelled / "adapter", folder, ModelSpec(base=folder))
    adapter_fit.check_adapter_fits(travelled / "adapter", folder,
                                   ModelSpec(base=folder, base_aliases=[f"example-org/{name}"]))


def test_the_smollm2_record_names_its_hub_id_and_license():
    assert models.public_model_id("embedded:smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert SMOLLM2.hub_license == "apache-2.0"
    assert models.public_model_id("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"
    assert models.public_model_id(str(REPO)) is None  # a local folder names nothing elsewhere


def test_eval_folders_write_a_card_per_candidate(tmp_path):
    from harness.reporting.model_card import write_model_cards
    from tests.fixtures_runs import make_run

    root = tmp_path / "eval"
    names = ("lora-a", "lora-b")
    for seed, name in enumerate(names, 1):
        folder = make_run(root / "candidates", name, seed=seed)
        manifest = read(folder / "manifest.json")
        manifest.update(recipe="eval", candidates=[{"name": name, "path": f"/elsewhere/{name}", "kind": "adapter",
                                                    "fingerprint": "ab" * 32}])
        (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    (root / "manifest.json").write_text(json.dumps({"recipe": "eval", "task": "demo"}), encoding="utf-8")
    (root / "metrics.json").write_text(json.dumps({"candidates": {n: {"folder": f"candidates/{n}"} for n in names},
                                                   "comparisons": []}), encoding="utf-8")
    written = write_model_cards(root)
    assert written == [root / "candidates" / n / "model_card.md" for n in names]
    for name, path in zip(names, written):
        text = path.read_text(encoding="utf-8")
        meta = front_matter(text)
        tuned = read(root / "candidates" / name / "metrics.json")["tuned"]
        logged = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
        assert logged == {m: s["value"] for m, s in tuned.items()}
        assert "scored by `harness eval`" in text and f"`{name}`" in text and "| candidate (95% CI) |" in text


# -- train.report_to ---------------------------------------------------------------------------
@needs("tensorboard")
@pytest.mark.slow
def test_tensorboard_has_loss_lr_tokens_per_second_and_the_heldout_metrics(travelled):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(travelled / "tensorboard"))
    board.Reload()
    tags = set(board.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "train/tokens_per_second", "eval/loss"} <= tags
    log = [json.loads(line) for line in (travelled / "train_log.jsonl").read_text().splitlines()]
    losses = {row["step"]: row["loss"] for row in log if "loss" in row}
    assert {e.step: pytest.approx(e.value, rel=1e-6) for e in board.Scalars("train/loss")} == losses
    assert all(e.value > 0 for e in board.Scalars("train/tokens_per_second"))
    metrics, steps = read(travelled / "metrics.json"), read(travelled / "manifest.json")["train"]["steps"]
    for side in ("base", "tuned", "delta"):
        for name, stat in metrics[side].items():
            [value] = board.Scalars(f"heldout/{side}/{name}")
            [low] = board.Scalars(f"heldout/{side}/{name}_ci95_low")
            [high] = board.Scalars(f"heldout/{side}/{name}_ci95_high")
            assert value.step == steps and value.value == pytest.approx(stat["value"], rel=1e-6, abs=1e-6)
            assert (low.value, high.value) == pytest.approx(stat["ci95"], rel=1e-6, abs=1e-6)


@needs("mlflow")
@pytest.mark.slow
def test_mlflow_has_loss_lr_tokens_per_second_and_the_heldout_metrics(travelled):
    from mlflow.tracking import MlflowClient

    record = read(travelled / "manifest.json")["tracking"]["mlflow"]
    assert record["tracking_uri"] == f"sqlite:///{travelled.resolve() / 'mlflow.db'}"
    client = MlflowClient(record["tracking_uri"])
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == travelled.name
    history = lambda key: {m.step: m.value for m in client.get_metric_history(record["run_id"], key)}  # noqa: E731
    log = [json.loads(line) for line in (travelled / "train_log.jsonl").read_text().splitlines()]
    assert history("loss") == pytest.approx({row["step"]: row["loss"] for row in log if "loss" in row})
    assert history("learning_rate") and history("eval_loss") and min(history("tokens_per_second").values()) > 0
    assert history("tokens_per_second") == pytest.approx(
        {row["step"]: row["tokens_per_second"] for row in log if "tokens_per_second" in row})
    metrics = read(travelled / "metrics.json")
    logged = run.data.metrics
    for side in ("base", "tuned", "delta"):
        for name, stat in metrics[side].items():
            assert logged[f"heldout/{side}/{name}"] == pytest.approx(stat["value"])
            assert [logged[f"heldout/{side}/{name}_ci95_low"], logged[f"heldout/{side}/{name}_ci95_high"]] == \
                pytest.approx(stat["ci95"])


def test_a_missing_tracker_package_is_one_line_before_anything_runs(tmp_path, monkeypatch, capsys, tiny_model_dir):
    from harness.training import tracking

    real = importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    overrides = [x for o in tiny_overrides(tiny_model_dir, "train.report_to=[tensorboard, mlflow]") for x in ("--set", o)]
    code = main(["run", TASK, "--runs-dir", str(tmp_path / "runs"), *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["harness: error: train.report_to: mlflow needs the mlflow package, which is not "
                                 "installed (pip install 'harness[tracking]')"]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # no run folder


def test_report_to_names_are_checked(capsys):
    assert main(["validate", TASK, "--set", "train.report_to=tensorbord"]) == 2
    assert "train.report_to: unknown tracker 'tensorbord' (did you mean 'tensorboard'?)" in capsys.readouterr().err
    assert main(["validate", TASK, "--set", "train.report_to=[mlflow, mlflow]"]) == 2
    assert "train.report_to[1]: 'mlflow' is listed twice" in capsys.readouterr().err


# -- export --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(travelled, stand_ins) -> Path:
    root, _ = stand_ins
    out = root / f"export-{travelled.name}"
    code, stdout = cli("export", str(travelled), "--out", str(out), "--dtype", "fp32")
    assert code == 0 and f"exported: {out} (fp32" in stdout
    return out


@pytest.mark.slow
def test_plain_transformers_decodes_the_runs_tuned_predictions(exported, travelled):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness.data.prompts import build_prompt
    from harness.runfolder import load_run_spec

    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md"} <= \
        {p.name for p in exported.iterdir()}
    spec = load_run_spec(travelled)
    tokenizer = AutoTokenizer.from_pretrained(exported)
    model = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)
    eos = read(travelled / "manifest.json")["prompt_format"]["eos_token"]
    assert tokenizer.eos_token == eos and model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids(eos)
    assert model.generation_config.max_new_tokens == spec.generation.max_new_tokens
    assert (tokenizer.chat_template is not None) == (spec.prompt.template is None)
    gen = spec.generation  # the tiny run's decoding: greedy, no_repeat_ngram_size 4 (the task's), penalty 1.0
    rows = [json.loads(line) for line in (travelled / "predictions.jsonl").read_text().splitlines()]
    for row in rows:
        ids = tokenizer(build_prompt(tokenizer, spec.prompt, row["title"]), add_special_tokens=False,
                        return_tensors="pt")
        out = model.generate(**ids, do_sample=False, max_new_tokens=gen.max_new_tokens,
                             no_repeat_ngram_size=gen.no_repeat_ngram_size, repetition_penalty=gen.repetition_penalty)
        new = out[0, ids["input_ids"].shape[1]:].tolist()
        new = new[:new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new
        assert tokenizer.decode(new, skip_special_tokens=True).strip() == row["tuned"]
    card = front_matter((exported / "README.md").read_text(encoding="utf-8"))
    assert card["library_name"] == "transformers" and card["base_model_relation"] == "finetune"


@pytest.mark.slow
def test_eval_scores_the_export_as_a_merged_model(exported, travelled, stand_ins, tiny_arch):
    root, _ = stand_ins
    code, out = cli("eval", TASK, "--adapter", str(exported), "--runs-dir", str(root / "evals"), *sets(tiny_arch))
    assert code == 0, out
    folder = Path(re.search(r"run folder: (.*)", out).group(1))
    [candidate] = read(folder / "manifest.json")["candidates"]
    assert candidate["kind"] == "merged"
    ours = [json.loads(line)["tuned"] for line in (folder / "predictions.jsonl").read_text().splitlines()]
    assert ours == [json.loads(line)["tuned"] for line in (travelled / "predictions.jsonl").read_text().splitlines()]
    card = (folder / "model_card.md").read_text(encoding="utf-8")
    logged = {m["type"]: m["value"] for m in front_matter(card)["model-index"][0]["results"][0]["metrics"]}
    assert logged == {m: s["value"] for m, s in read(folder / "metrics.json")["tuned"].items()}
    assert "python -m harness eval " + TASK in card and f"--adapter {exported}" in card


@pytest.mark.slow
def test_export_refuses_qlora_runs_and_used_folders(travelled, tmp_path, capsys):
    qlora = tmp_path / "qlora-run"
    shutil.copytree(travelled, qlora, ignore=shutil.ignore_patterns("checkpoints", "scores", "mlflow.db"))
    manifest = read(qlora / "manifest.json")
    manifest["fast_path"]["quantize"] = True
    (qlora / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    capsys.readouterr()
    assert main(["export", str(qlora), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a QLoRA run" in err[0] and "--dequantize" in err[0]
    assert main(["export", str(qlora), "--out", str(tmp_path / "out"), "--dequantize"]) == 2  # CPU here
    assert "needs a CUDA device and bitsandbytes" in capsys.readouterr().err
    assert main(["export", str(travelled), "--out", str(tmp_path / "out"), "--dequantize"]) == 2
    assert "is no QLoRA run" in capsys.readouterr().err
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("mine", encoding="utf-8")
    assert main(["export", str(travelled), "--out", str(tmp_path / "used")]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert (tmp_path / "used" / "keep.txt").read_text(encoding="utf-8") == "mine"
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_resumed_run_writes_its_card(travelled, tmp_path):
    """A run stopped before its report stage gets the card when `--resume` finishes it."""
    run = tmp_path / travelled.name
    shutil.copytree(travelled, run, ignore=shutil.ignore_patterns("checkpoints"))
    (run / "adapter" / "README.md").unlink()
    manifest = read(run / "manifest.json")
    manifest.update(status="interrupted", stages_done=[s for s in manifest["stages_done"] if s != "report"])
    (run / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    assert main(["-q", "run", "--resume", str(run)]) == 0
    logged = {m["type"]: m["value"] for m in
              front_matter((run / "adapter" / "README.md").read_text(encoding="utf-8"))["model-index"][0]["results"][0]["metrics"]}
    assert logged == {m: s["value"] for m, s in read(run / "metrics.json")["tuned"].items()}
    assert read(run / "manifest.json")["stages_done"][-1] == "report"


def test_the_adapter_config_is_written_in_one_order(tmp_path):
    """PEFT saves target_modules from a set (its order follows the hash seed): harness rewrites them sorted,
    so one training gives one adapter fingerprint; a local base model keeps its path."""
    from harness.training.train import write_portable_adapter_config

    config = {"target_modules": ["v_proj", "q_proj", "o_proj"], "base_model_name_or_path": str(tmp_path / "base")}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    write_portable_adapter_config(tmp_path, str(tmp_path / "base"))
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written == {**config, "target_modules": ["o_proj", "q_proj", "v_proj"]}
