"""The probe on the real embedded models: each converted copy scores its recorded figure, and
SmolLM2 with its weights scrambled is refused (exit 4) through the CLI before any work."""

import json

import pytest

from harness import models
from harness.cli import main
from harness.models import base_files
from harness.spec import EMBEDDED_MODEL, ModelSpec
from tests.conftest import REPO
from tests.test_embedded_models import scrambled_copy

pytestmark = pytest.mark.real_model
GEMMA = base_files.EMBEDDED_MODELS["gemma3-270m"]


def converted(model: base_files.EmbeddedModel) -> bool:
    return base_files.conversion_record(base_files.converted_folder(model)).get("sha256") == model.sha256


@pytest.mark.skipif(not converted(GEMMA), reason="run `python -m harness fetch-model gemma3-270m` first")
def test_the_converted_gemma3_scores_its_recorded_probe_perplexity():
    folder = str(base_files.converted_folder(GEMMA))
    perplexity = base_files.probe_perplexity(folder)
    assert abs(perplexity / GEMMA.probe_perplexity - 1) <= GEMMA.probe_tolerance
    record = base_files.check_base_probe(ModelSpec(base="embedded:gemma3-270m"), folder)
    assert record["expected"] == GEMMA.probe_perplexity and not record["random_weights"]
    tokenizer = models.load_tokenizer(folder, ModelSpec(), uses_chat_template=False)
    assert tokenizer.eos_token == "<eos>" and not tokenizer.chat_template
    config = json.loads((base_files.converted_folder(GEMMA) / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["vocab_size"] == 262144


def test_smollm2_passes_and_scrambled_smollm2_is_refused_with_exit_4(tmp_path, monkeypatch, capsys):
    folder = base_files.resolve_base(EMBEDDED_MODEL)
    record = base_files.check_base_probe(ModelSpec(), folder)
    smollm2 = base_files.embedded_model(EMBEDDED_MODEL)
    assert record["perplexity"] < 50 and record["expected"] == smollm2.probe_perplexity
    scrambled = scrambled_copy(base_files.resolve_base(EMBEDDED_MODEL), tmp_path / "scrambled-smollm2")
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)
    code = main(["run", str(REPO / "tasks" / "amazon_desc.yaml"), "--runs-dir", str(tmp_path / "runs"),
                 "--set", f"model.base={scrambled}", "--set", "train.max_steps=1"])
    err = capsys.readouterr().err
    assert code == 4 and "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("harness: error")]
    assert "probe perplexity" in line and "broken or random weights" in line
