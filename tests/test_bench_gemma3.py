"""The bench's gemma3 part (a second real architecture, sliding-window attention): option parsing, and a CPU
smoke run of its training recipes, loss check and generation on the tiny Gemma 3 (numbers mean nothing here)."""

import json

import pytest

from harness.benchmarks.bench import DEFAULT_PARTS, gemma3_spec, parse_parts
from harness import models
from harness.cli import build_parser, main
from harness.errors import HarnessError
from harness.spec import TaskSpec
from tests.conftest import REPO


def test_gemma3_is_a_part_and_a_generation_model_named_on_request():
    assert parse_parts(None, "smollm2,tinyllama") == (DEFAULT_PARTS, {"smollm2", "tinyllama"})
    assert "gemma3" not in DEFAULT_PARTS  # the default bench is unchanged
    assert parse_parts("gemma3,generate", "gemma3") == ({"gemma3", "generate"}, {"gemma3"})
    with pytest.raises(HarnessError, match=r"bench --only: unknown \['gemma'\] \(known: smollm2, gemma3, tinyllama"):
        parse_parts("gemma", "smollm2")
    with pytest.raises(HarnessError, match=r"bench --gen-models: unknown \['qlora8b'\]"):
        parse_parts("generate", "gemma3,qlora8b")


def test_gemma3_base_defaults_to_the_embedded_model_with_the_alpaca_prompt():
    args = build_parser().parse_args(["bench", "amazon_desc", "--only", "gemma3"])
    assert args.gemma3_base == "embedded:gemma3-270m"
    spec = gemma3_spec(TaskSpec(name="t"), args.gemma3_base)
    assert spec.model.base == "embedded:gemma3-270m"
    assert models.resolve_prompt_template(spec)["template"] == "alpaca"  # the embedded model's declared preset
    named = gemma3_spec(TaskSpec(name="t"), args.gemma3_base)
    named.prompt.template = "llama2_inst"
    assert models.resolve_prompt_template(named)["template"] == "llama2_inst"  # a template the spec names stays


@pytest.mark.parametrize("flag, value, message", [("--only", "gemma3,gemma4", "--only: unknown ['gemma4']"),
                                                  ("--gen-models", "gemma3,phi", "--gen-models: unknown ['phi']")])
def test_bench_cli_rejects_unknown_names_in_one_line(tiny_model_dir, capsys, flag, value, message):
    assert main(["bench", "amazon_desc", "--quick", flag, value, "--set", f"model.base={tiny_model_dir}"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.slow
def test_bench_gemma3_part_trains_checks_losses_and_decodes(tmp_path, tiny_model_dir, tiny_gemma3_dir, capsys):
    out = tmp_path / "bench.json"
    code = main(["-q", "bench", str(REPO / "tasks" / "amazon_desc.yaml"), "--quick", "--only", "gemma3,generate",
                 "--gen-models", "gemma3", "--gemma3-base", str(tiny_gemma3_dir), "--recipes", "trl_tuned,harness",
                 "--examples", "48", "--max-length", "96", "--batch", "4,8", "--warmup", "1", "--loss-every", "1",
                 "--gen-examples", "5", "--loop-examples", "2", "--gen-rows", "4", "--work", str(tmp_path / "work"),
                 "--out", str(out), "--set", f"model.base={tiny_model_dir}", "--set", "model.random_weights=true",
                 "--set", "generation.max_new_tokens=4"])
    assert code == 0
    results = json.loads(out.read_text())
    label = tiny_gemma3_dir.name
    assert "failures" not in results
    assert [(r["model"], r["recipe"], r["batch"], r["train_seed"]) for r in results["training"]] == [
        (label, "trl_tuned", 4, 42), (label, "trl_tuned", 8, 42), (label, "harness", 4, 42), (label, "harness", 8, 42),
        (label, "harness", 4, 43), (label, "harness", 8, 43)]  # last two: the loss check's re-seeded reference
    checks = results["loss_check"]
    assert [(c["reference"], set(c["recipes"])) for c in checks] == [("harness", {"trl_tuned"})] * 2
    assert all(c["recipes"]["trl_tuned"]["verdict"] in ("within noise", "beyond noise") for c in checks)
    for batch in (4, 8):
        assert f"{label}: harness (batch {batch}) / trl_tuned (batch {batch}) tokens/s" in results["ratios"]
    assert list(results["generation"]) == [label]  # the Gemma 3 only: --gen-models gemma3
    scorers = results["generation"][label]["scorers"]
    assert scorers["static"]["tokens"] > 0 and scorers["static"]["rows"] == 4
    # Every scorer ran on the sliding-window model, the graphs engine too (its window masked), with static's texts.
    assert results["generation"][label]["failures"] == [] and scorers["graphs"]["engine"] == "graphs"
    assert results["generation"][label]["identical_outputs_share"]["graphs vs static"] == 1.0
    printed = capsys.readouterr().out
    assert f"loss check, {label}, batch 4: reference harness" in printed


def test_trl_baseline_trains_on_the_same_tokens_as_harness(tiny_arch):
    """The bench's trl_tuned baseline hands trl prompt strings that trl tokenizes itself: for a tokenizer that
    adds a BOS (the tiny Gemma 3, like Gemma's), the strings must not carry one too, or every trl example
    starts with two and packs into other batches (the loss check would compare different data)."""
    import tempfile
    from pathlib import Path

    from harness.benchmarks import bench_train
    from harness.data import records
    from harness.devices import pick_device
    from harness.spec import load_spec
    from harness.training.tokenization import tokenized_dataset
    from harness.training.train import build_trainer
    from tests.conftest import tiny_overrides

    folder, extra = tiny_arch
    spec = load_spec(str(REPO / "tasks" / "amazon_desc.yaml"), tiny_overrides(folder, *extra))
    models.resolve_prompt_template(spec)
    tokenizer = models.load_tokenizer(str(folder), spec.model, uses_chat_template=spec.prompt.template is None)
    device = pick_device()
    examples = records.prepare(spec).train[:6]
    ours = tokenized_dataset(spec, tokenizer, examples)["input_ids"]
    options = {**bench_train.recipe_overrides("trl_tuned", 4, device), "packing": False, "padding_free": False}
    trainer = build_trainer(spec, models.load_model(str(folder), spec.model, tokenizer, device), tokenizer,
                            bench_train._string_dataset(spec, tokenizer, examples), None, Path(tempfile.mkdtemp()), device,
                            plain_peft=True, **options)
    assert trainer.train_dataset["input_ids"] == ours
    if extra:  # the Gemma 3 tokenizer adds a BOS: exactly one leads each example
        assert all(ids[0] == tokenizer.bos_token_id != ids[1] for ids in ours)
