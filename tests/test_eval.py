"""`harness eval`: adapters made outside harness (plain PEFT, in this file), merged models, several
adapters compared, a test file with and without leaks, and where each prompt preset's answer ends."""

from __future__ import annotations

import gzip
import io
import json
import re
import shutil
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import pytest

from harness import devices, models
from harness.cli import main
from harness.errors import ModelError, SpecError
from harness.models import adapter_fit
from harness.spec import ModelSpec, PromptSpec, load_spec
from tests.conftest import DEMO_DATA, REPO, tiny_overrides

TASK = str(REPO / "tasks" / "amazon_desc.yaml")
INSTRUCTION = "Write a product description for the following product title."
# A user's notebook cell (Unsloth's Alpaca format), written out here rather than taken from harness.
NOTEBOOK_ALPACA = """Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.

### Instruction:
{}

### Input:
{}

### Response:
{}"""
N_TEST = 20  # rows of the demo data that form the test file; the rest is the training file


def demo_rows() -> list[dict]:
    rows = [json.loads(line) for line in DEMO_DATA.read_text(encoding="utf-8").splitlines()]
    return [r for r in rows if len(r["content"]) >= 40]


@contextmanager
def isolated(root: Path):
    """Module-scoped fixtures run before the per-test isolation: give them their own cache and folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HARNESS_SCORE_CACHE", str(root / "score-cache"))
        mp.setenv("HARNESS_DEVICE", "cpu")
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.chdir(root)  # reports/ lands here
        yield


# -- models and adapters made the way users make them ----------------------------------------
@pytest.fixture(scope="module")
def llama_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model as a Llama-2-style checkpoint: <s> and </s> special tokens, no chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("llama-style")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>"})
    tokenizer.chat_template = None
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.resize_token_embeddings(len(tokenizer))
    for config in (model.config, model.generation_config):
        config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def plain_peft_adapter(base: Path, out: Path, seed: int, targets=("q_proj", "v_proj"), r: int = 4,
                       steps: int = 4) -> Path:
    """What a notebook does: Alpaca text + EOS_TOKEN, LoRA with plain PEFT, a few AdamW steps, save."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), task_type="CAUSAL_LM"))
    texts = [NOTEBOOK_ALPACA.format(INSTRUCTION, row["title"], row["content"]) + tokenizer.eos_token
             for row in demo_rows()[N_TEST:N_TEST + 4 * steps]]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    for step in range(steps):
        batch = tokenizer(texts[4 * step:4 * step + 4], return_tensors="pt", padding=True, truncation=True,
                          max_length=96)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(llama_dir, tmp_path_factory) -> dict[str, Path]:
    """Two plain-PEFT adapters (different seeds and targets) and the first merged into a full model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("made-elsewhere")
    first = plain_peft_adapter(llama_dir, root / "alpaca-lora", seed=0)
    second = plain_peft_adapter(llama_dir, root / "alpaca-lora-qkvo", seed=1, r=8,
                                targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), first).merge_and_unload()
    merged.save_pretrained(root / "merged")
    AutoTokenizer.from_pretrained(first).save_pretrained(root / "merged")
    return {"first": first, "second": second, "merged": root / "merged"}


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> dict[str, Path]:
    """A training file, a gzip test file of other products, and a test file that leaks a training title."""
    root = tmp_path_factory.mktemp("eval-data")
    rows = demo_rows()
    lines = lambda rs: "".join(json.dumps(r) + "\n" for r in rs)  # noqa: E731
    (root / "trn.jsonl").write_text(lines(rows[N_TEST:]), encoding="utf-8")
    with gzip.open(root / "tst.json.gz", "wt", encoding="utf-8") as fh:
        fh.write(lines(rows[:N_TEST]))
    leaked = {**rows[N_TEST + 3], "uid": "LEAKED-ROW"}
    with gzip.open(root / "leaky.json.gz", "wt", encoding="utf-8") as fh:
        fh.write(lines(rows[:N_TEST] + [leaked]))
    return {"train": root / "trn.jsonl", "test": root / "tst.json.gz", "leaky": root / "leaky.json.gz"}


@pytest.fixture(scope="module")
def sets(llama_dir, data_files) -> list[str]:
    """`--set` arguments: the tiny Llama-style base, the Alpaca preset, the training file and the test file."""
    overrides = tiny_overrides(llama_dir, "prompt.template=alpaca", f"data.path={data_files['train']}",
                               f"data.heldout_path={data_files['test']}")
    return [x for o in overrides for x in ("--set", o)]


def run_eval(root: Path, adapter_dirs: list[Path], sets: list[str]) -> tuple[Path, str]:
    out = io.StringIO()
    with isolated(root), redirect_stdout(out):
        code = main(["eval", TASK, *[x for a in adapter_dirs for x in ("--adapter", str(a))],
                     "--runs-dir", str(root / "runs"), *sets])
    assert code == 0, out.getvalue()
    return Path(re.search(r"run folder: (.*)", out.getvalue()).group(1)), out.getvalue()


@pytest.fixture(scope="module")
def eval_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("evals")


@pytest.fixture(scope="module")
def single_eval(eval_root, adapters, sets) -> Path:
    return run_eval(eval_root, [adapters["first"]], sets)[0]


@pytest.fixture(scope="module")
def several_eval(eval_root, single_eval, adapters, sets) -> tuple[Path, str]:
    """The first adapter, the second, and the first merged: after `single_eval`, so the base cache is warm."""
    return run_eval(eval_root, [adapters["first"], adapters["second"], adapters["merged"]], sets)


def read(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


# -- prompt presets: the text, and where the answer ends --------------------------------------
def test_presets_are_the_notebook_formats_word_for_word(llama_dir):
    from harness.data.prompts import build_prompt

    tokenizer = models.load_tokenizer(str(llama_dir), ModelSpec(), uses_chat_template=False)
    alpaca = build_prompt(tokenizer, PromptSpec(instruction=INSTRUCTION, template="alpaca"), "Garlic Press")
    assert alpaca == NOTEBOOK_ALPACA.format(INSTRUCTION, "Garlic Press", "")
    llama2 = build_prompt(tokenizer, PromptSpec(instruction="Describe", template="llama2_inst"), "Mug")
    assert llama2 == "[INST] Describe\n\nMug [/INST]"
    with_system = build_prompt(tokenizer, PromptSpec(instruction="Describe", system="Be brief.",
                                                     template="llama2_inst"), "Mug")
    assert with_system == "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nDescribe\n\nMug [/INST]"
    assert build_prompt(tokenizer, PromptSpec(template="Title: {title}\nDescription:"), "Mug") == \
        "Title: Mug\nDescription:"


def test_presets_start_with_bos_only_where_the_tokenizer_adds_one(llama_dir):
    from tokenizers.processors import TemplateProcessing

    from harness.data.prompts import build_prompt, encode_prompt

    tokenizer = models.load_tokenizer(str(llama_dir), ModelSpec(), uses_chat_template=False)
    assert build_prompt(tokenizer, PromptSpec(template="alpaca"), "Mug").startswith("Below is")
    bos = tokenizer.bos_token_id  # a Llama tokenizer puts <s> before everything it encodes
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    prompt = build_prompt(tokenizer, PromptSpec(template="llama2_inst"), "Mug")
    assert prompt.startswith("<s>[INST] ")
    ids = encode_prompt(tokenizer, prompt)
    assert ids[0] == bos and ids.count(bos) == 1


def test_preset_answers_end_with_the_tokenizers_real_eos(llama_dir):
    from harness.data.prompts import build_prompt, completion_text, encode_example

    tokenizer = models.load_tokenizer(str(llama_dir), ModelSpec(), uses_chat_template=False)
    eos = tokenizer.convert_tokens_to_ids("</s>")
    assert tokenizer.eos_token == "</s>" and completion_text(tokenizer, "A mug.") == "A mug.</s>"
    prompt = build_prompt(tokenizer, PromptSpec(template="alpaca"), "Mug")
    encoded = encode_example(tokenizer, prompt, "A sturdy mug .", max_length=None)  # what training sees
    assert encoded.input_ids[-1] == eos and encoded.labels[-1] == eos
    model = models.load_model(str(llama_dir), ModelSpec(), tokenizer, devices.Device("cpu"))
    assert model.config.eos_token_id == model.generation_config.eos_token_id == eos


class _ScriptedModel:
    """A model whose next tokens are fixed: an answer, then the preset's EOS, then more text."""

    def __init__(self, tokens: list[int]):
        self.tokens = tokens
        self.stopped_at = None

    def eval(self):
        return self

    def generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id, **_):
        import torch

        self.stopped_at = eos_token_id
        tail = torch.tensor(self.tokens[:max_new_tokens]).expand(len(input_ids), -1)
        return torch.cat([input_ids, tail], dim=1)


def test_scoring_and_generate_stop_where_the_preset_answer_ends(llama_dir):
    from harness.data.prompts import build_prompt
    from harness.scoring.generation import generate
    from harness.spec import GenerationSpec

    tokenizer = models.load_tokenizer(str(llama_dir), ModelSpec(), uses_chat_template=False)
    answer = tokenizer("sturdy steel", add_special_tokens=False)["input_ids"]
    after = tokenizer("Input", add_special_tokens=False)["input_ids"]
    model = _ScriptedModel(answer + [tokenizer.convert_tokens_to_ids("</s>")] + after * 5)
    prompt = build_prompt(tokenizer, PromptSpec(template="alpaca"), "Mug")
    [result] = generate(model, tokenizer, [prompt], GenerationSpec(max_new_tokens=8), devices.Device("cpu"))
    assert model.stopped_at == tokenizer.convert_tokens_to_ids("</s>")
    assert result.text == "sturdy steel" and result.n_tokens == len(answer) and not result.hit_max_new_tokens


def test_spec_names_presets_and_test_files(tmp_path, monkeypatch):
    with pytest.raises(SpecError, match=r"prompt.template: .*did you mean 'alpaca'"):
        load_spec(TASK, ["prompt.template=alpacca"])
    assert load_spec(TASK, ["prompt.template=llama2_inst"]).prompt.template == "llama2_inst"
    monkeypatch.chdir(tmp_path)
    spec = load_spec(TASK, ["data.heldout_path=tst.json.gz"])  # relative to the shell, like data.path
    assert spec.heldout_paths() == [tmp_path / "tst.json.gz"]
    assert load_spec(TASK).heldout_paths() == []
    with pytest.raises(SpecError, match="data.heldout_path"):
        load_spec(TASK, ["data.heldout_path=[]"])


# -- data.heldout_path -----------------------------------------------------------------------
def test_heldout_path_scores_the_test_file_and_keeps_leaks_visible(data_files):
    from harness.data.leakage import leakage_report
    from harness.data.records import prepare

    rows = demo_rows()
    base = [f"data.path={data_files['train']}", f"data.heldout_path={data_files['test']}", "data.max_heldout=null"]
    prepared = prepare(load_spec(TASK, base))
    assert {e.id for e in prepared.heldout} == {r["uid"] for r in rows[:N_TEST]}
    assert {e.source.split(":")[0] for e in prepared.train} == {"trn.jsonl"}
    assert {e.source.split(":")[0] for e in prepared.heldout} == {"tst.json.gz"}
    assert prepared.counts["train"] + prepared.counts["duplicate"] == len(rows) - N_TEST  # the demo repeats a few
    assert leakage_report(prepared.train, prepared.heldout)["exact"] == 0
    # A capped test set keeps the rows with the smallest title hash: a smaller cap is a subset of a larger.
    small = {e.id for e in prepare(load_spec(TASK, [*base, "data.max_heldout=5"])).heldout}
    large = {e.id for e in prepare(load_spec(TASK, [*base, "data.max_heldout=12"])).heldout}
    assert len(small) == 5 and len(large) == 12 and small < large
    leaky = prepare(load_spec(TASK, [*base, f"data.heldout_path={data_files['leaky']}"]))
    assert "LEAKED-ROW" in {e.id for e in leaky.heldout}  # not de-duplicated away against train
    assert leakage_report(leaky.train, leaky.heldout)["exact"] == 1


# -- checks before any work --------------------------------------------------------------------
def _changed_adapter(src: Path, dst: Path, config: dict | None = None, tensors=None, tokens=None) -> Path:
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    shutil.copytree(src, dst)
    if config:
        path = dst / "adapter_config.json"
        path.write_text(json.dumps({**read(path), **config}), encoding="utf-8")
    if tensors:
        weights = load_file(dst / "adapter_model.safetensors")
        save_file(tensors(weights), dst / "adapter_model.safetensors")
    if tokens:
        tokenizer = AutoTokenizer.from_pretrained(dst)
        tokenizer.add_tokens(tokens)
        tokenizer.save_pretrained(dst)
    return dst


def _wider_q_proj(weights: dict) -> dict:
    import torch

    key = next(k for k in weights if "layers.0.self_attn.q_proj.lora_A" in k)
    return {**weights, key: torch.zeros(weights[key].shape[0], 40)}


MISFITS = {
    "another base": ({"config": {"base_model_name_or_path": "meta-llama/Llama-2-7b-hf"}},
                     "adapter_config.json names base model 'meta-llama/Llama-2-7b-hf', not the spec's model.base"),
    "other shapes": ({"tensors": _wider_q_proj},
                     "has shape [4, 40], but model.layers.0.self_attn.q_proj maps 32 -> 32 features"),
    "missing module": ({"config": {"target_modules": ["q_proj", "v_proj", "c_attn"]}},
                       "target module 'c_attn' (adapter_config.json target_modules) is not in the base model"),
    "other tokenizer": ({"tokens": ["brandnewtoken"]},
                        "the tokenizer saved with it differs from the base model's in its vocabulary "
                        "(4145 vs 4144 tokens, 1 differ); set model.adapter_tokenizer: true"),
}


@pytest.mark.parametrize("case", MISFITS)
def test_a_misfit_fails_up_front_in_one_line(case, adapters, sets, tmp_path, capsys):
    change, message = MISFITS[case]
    bad = _changed_adapter(adapters["first"], tmp_path / "bad", **change)
    code = main(["eval", TASK, "--adapter", str(bad), "--runs-dir", str(tmp_path / "runs"), *sets])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"harness: error: {bad}: ") and message in err[0]
    [run_dir] = (tmp_path / "runs").iterdir()
    manifest = read(run_dir / "manifest.json")
    assert manifest["status"] == "failed" and manifest.get("stages_done", []) == []  # before prepare
    assert not (run_dir / "scores").exists()


def test_base_aliases_tokenizers_and_candidate_kinds(adapters, llama_dir, tiny_model_dir, tmp_path):
    from harness.recipes.eval import check_candidates, resolve_candidates

    spec = lambda *extra: load_spec(TASK, [f"model.base={llama_dir}", "prompt.template=alpaca", *extra])  # noqa: E731
    renamed = _changed_adapter(adapters["first"], tmp_path / "renamed",
                               config={"base_model_name_or_path": "someone/tiny-llama-bnb-4bit"})
    with pytest.raises(ModelError, match="model.base_aliases"):
        check_candidates(resolve_candidates([renamed]), spec(), str(llama_dir), None)
    tokenizer = models.load_tokenizer(str(llama_dir), ModelSpec(), False)
    assert check_candidates(resolve_candidates([renamed]), spec("model.base_aliases=[someone/tiny-llama]"),
                            str(llama_dir), tokenizer) is tokenizer
    # model.adapter_tokenizer: the adapter's tokenizer scores everything (base included).
    grown = _changed_adapter(adapters["first"], tmp_path / "grown", tokens=["brandnewtoken"])
    used = check_candidates(resolve_candidates([grown]), spec("model.adapter_tokenizer=true"), str(llama_dir),
                            tokenizer)
    assert "brandnewtoken" in used.get_vocab() and used.eos_token == "</s>"
    # A chat template saved with the adapter matters only when prompts use the chat template.
    chat_adapter = tmp_path / "chat-adapter"
    plain_peft_adapter(tiny_model_dir, chat_adapter, seed=0, steps=1)
    config = chat_adapter / "tokenizer_config.json"
    (chat_adapter / "chat_template.jinja").write_text("{{ messages[0]['content'] }}", encoding="utf-8")
    config.write_text(json.dumps({k: v for k, v in read(config).items() if k != "chat_template"}), encoding="utf-8")
    chat_tokenizer = models.load_tokenizer(str(tiny_model_dir), ModelSpec(), True)
    chat_spec = load_spec(TASK, [f"model.base={tiny_model_dir}"])
    with pytest.raises(ModelError, match="differs from the base model's in its chat template"):
        check_candidates(resolve_candidates([chat_adapter]), chat_spec, str(tiny_model_dir), chat_tokenizer)
    preset_spec = load_spec(TASK, [f"model.base={tiny_model_dir}", "prompt.template=alpaca"])
    assert check_candidates(resolve_candidates([chat_adapter]), preset_spec, str(tiny_model_dir),
                            chat_tokenizer) is chat_tokenizer
    # What --adapter may name: a PEFT folder, a run folder (its adapter/), a merged model; names stay unique.
    run_folder = tmp_path / "my-run"
    shutil.copytree(adapters["first"], run_folder / "adapter")
    (run_folder / "manifest.json").write_text("{}", encoding="utf-8")
    found = resolve_candidates([adapters["first"], run_folder, adapters["merged"], tmp_path / "renamed"])
    assert [(c.name, c.kind) for c in found] == [("alpaca-lora", "adapter"), ("my-run", "run"),
                                                 ("merged", "merged"), ("renamed", "adapter")]
    assert found[1].weights == run_folder / "adapter"
    with pytest.raises(ModelError, match="no such folder"):
        resolve_candidates([tmp_path / "nowhere"])


def test_pickle_adapters_only_when_allowed(adapters, llama_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    shutil.copytree(adapters["first"], pickled)
    torch.save(load_file(pickled / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    (pickled / "adapter_model.safetensors").unlink()
    with pytest.raises(ModelError, match="only pickle weights"):
        adapter_fit.check_adapter_fits(pickled, str(llama_dir), ModelSpec(base=str(llama_dir)))
    adapter_fit.check_adapter_fits(pickled, str(llama_dir), ModelSpec(base=str(llama_dir), allow_pickle=True))


def test_merged_model_of_another_size_fails_up_front(adapters, tiny_model_dir, llama_dir):
    with pytest.raises(ModelError, match="vocab_size 4144, but the base model .* has 4142"):
        adapter_fit.check_merged_fits(adapters["merged"], str(tiny_model_dir), ModelSpec(base=str(tiny_model_dir)))
    adapter_fit.check_merged_fits(adapters["merged"], str(llama_dir), ModelSpec(base=str(llama_dir)))


# -- end to end ---------------------------------------------------------------------------------
slow = pytest.mark.slow


@slow
def test_one_adapter_made_elsewhere_gives_a_run_shaped_folder(single_eval, adapters, data_files):
    import jsonschema

    from harness import fingerprint
    from harness.reporting.loading import load_run
    from harness.scoring.metrics import METRICS

    for name in ("spec.yaml", "manifest.json", "metrics.json", "predictions.jsonl", "report.html", "report.md",
                 "data/heldout.jsonl", "scores/base_nll.json", "scores/tuned_generations.jsonl"):
        assert (single_eval / name).is_file(), name
    metrics = read(single_eval / "metrics.json")
    jsonschema.validate(metrics, read(REPO / "docs" / "metrics.schema.json"))
    assert list(metrics["tuned"]) == list(METRICS) and "candidates" not in metrics
    assert metrics["tuned"]["perplexity"]["value"] != metrics["base"]["perplexity"]["value"]
    manifest = read(single_eval / "manifest.json")
    assert manifest["recipe"] == "eval" and manifest["status"] == "completed"
    assert manifest["stages_done"] == ["prepare", "score_base", "score_tuned", "metrics", "report"]
    [candidate] = manifest["candidates"]
    assert candidate["path"] == str(adapters["first"]) and candidate["kind"] == "adapter"
    assert candidate["fingerprint"] == manifest["fingerprints"]["adapter"] == fingerprint.hash_folder(adapters["first"])
    assert manifest["adapter_logit_change"] > 1e-4
    # Scored on the test file: every held-out id is one of its rows.
    test_ids = {r["uid"] for r in demo_rows()[:N_TEST]}
    rows = [json.loads(line) for line in (single_eval / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and {r["id"] for r in rows} <= test_ids and {"base", "tuned"} <= set(rows[0])
    assert load_run(single_eval).metrics == metrics  # `report` reads it like a run


@slow
def test_several_candidates_each_against_base_and_each_other(several_eval, single_eval):
    import jsonschema

    run_dir, stdout = several_eval
    schema = read(REPO / "docs" / "metrics.schema.json")
    metrics = read(run_dir / "metrics.json")
    jsonschema.validate(metrics, schema)
    names = ["alpaca-lora", "alpaca-lora-qkvo", "merged"]
    assert list(metrics["candidates"]) == names
    assert [(c["a"], c["b"]) for c in metrics["comparisons"]] == [(names[0], names[1]), (names[0], names[2]),
                                                                 (names[1], names[2])]
    for name in names:  # each candidate has a run-shaped folder
        sub = read(run_dir / "candidates" / name / "metrics.json")
        jsonschema.validate(sub, schema)
        assert sub["base"] == metrics["base"] and sub["tuned"] == metrics["candidates"][name]["tuned"]
    ppl = lambda n: metrics["candidates"][n]["tuned"]["perplexity"]["value"]  # noqa: E731
    between = metrics["comparisons"][0]["delta"]["perplexity"]
    assert between["value"] == pytest.approx(ppl(names[1]) - ppl(names[0]))
    assert between["ci95"][0] <= between["value"] <= between["ci95"][1] and between["ci95"][0] < between["ci95"][1]
    # The merged model is its adapter folded in: the same outputs, so nothing between them.
    same = metrics["comparisons"][1]
    assert same["delta"]["perplexity"]["value"] == pytest.approx(0.0, abs=1e-6)
    assert same["win_tie_loss"]["rougeL"]["tie"] == 8
    rows = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert all(r["candidates"]["merged"]["text"] == r["candidates"]["alpaca-lora"]["text"] for r in rows)
    manifest = read(run_dir / "manifest.json")
    assert manifest["base_cache"] == read(single_eval / "manifest.json")["base_cache"] | {"hit": True}
    assert [c["kind"] for c in manifest["candidates"]] == ["adapter", "adapter", "merged"]
    assert "alpaca-lora-qkvo - alpaca-lora: rougeL" in stdout and "merged: rougeL" in stdout
    html = (run_dir / "report.html").read_text(encoding="utf-8")
    md = (run_dir / "report.md").read_text(encoding="utf-8")
    assert 'id="pairwise"' in html and "alpaca-lora-qkvo − alpaca-lora" in html
    assert "## Adapters against each other" in md and "| alpaca-lora-qkvo − alpaca-lora: Δ (95% CI) |" in md


@slow
def test_a_leaking_test_file_fails_before_scoring(adapters, sets, data_files, tmp_path, capsys):
    code = main(["eval", TASK, "--adapter", str(adapters["first"]), "--runs-dir", str(tmp_path / "runs"), *sets,
                 "--set", f"data.heldout_path={data_files['leaky']}", "--set", "data.max_heldout=null"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "1 held-out title(s) also appear in train" in err[0]
    [run_dir] = (tmp_path / "runs").iterdir()
    assert read(run_dir / "manifest.json")["stages_done"] == ["prepare"]
    assert not (run_dir / "scores" / "base_generations.jsonl").exists()


@slow
def test_check_and_report_accept_eval_folders(single_eval, several_eval, sets, tmp_path, capsys):
    run_dir, _ = several_eval
    gate_sets = [*sets, "--set", "gate.subset=6", "--set", "gate.max_truncated_share=1.0"]
    baseline = tmp_path / "baseline.json"
    assert main(["baseline", str(single_eval), "--out", str(baseline)]) == 0
    check = lambda cand, base, out, *extra: main(["check", TASK, "--candidate", str(cand), "--baseline",  # noqa: E731
                                                  str(base), "--out", str(tmp_path / out), *gate_sets, *extra])
    assert check(run_dir / "candidates" / "alpaca-lora-qkvo", baseline, "qkvo") in (0, 1)
    verdict = read(tmp_path / "qkvo" / "verdict.json")
    assert verdict["verdict"] in ("pass", "regression") and verdict["n"] == 6
    assert verdict["sources"]["candidate"].startswith("cached scores of")
    assert check(run_dir / "candidates" / "merged", single_eval, "merged") == 0  # the same model both sides
    assert read(tmp_path / "merged" / "verdict.json")["sources"]["baseline"].startswith("cached scores of")

    assert check(run_dir, baseline, "all") == 2
    assert f"{run_dir / 'candidates' / 'merged'}" in read(tmp_path / "all" / "verdict.json")["reason"]
    assert check(run_dir / "candidates" / "merged", single_eval, "stale", "--set", "generation.max_new_tokens=7") == 2
    assert "scores adapters only, not the merged model" in read(tmp_path / "stale" / "verdict.json")["reason"]

    assert main(["baseline", str(run_dir / "candidates" / "merged"), "--out", str(tmp_path / "merged.json")]) == 0
    predictions = lambda doc: [e["prediction"] for e in read(doc)["examples"]]  # noqa: E731
    assert len(predictions(tmp_path / "merged.json")) == 8
    assert predictions(tmp_path / "merged.json") == predictions(baseline)  # the adapter, folded in

    capsys.readouterr()
    assert main(["report", str(run_dir), str(single_eval), "--out", str(tmp_path / "side-by-side")]) == 0
    md = (tmp_path / "side-by-side" / "report.md").read_text(encoding="utf-8")
    assert "4 adapters: alpaca-lora, alpaca-lora-qkvo, merged, " in md
    assert "## Adapters against each other" in md


def test_model_names_match_across_owners_and_packaging():
    key = adapter_fit.model_name_key
    assert key("unsloth/Mistral-7B-v0.3-bnb-4bit") == key("mistralai/Mistral-7B-v0.3") == "mistral-7b-v0.3"
    assert key("embedded:smollm2-135m-instruct") == key("HuggingFaceTB/SmolLM2-135M-Instruct") \
        == key("/root/.cache/harness/models/smollm2-135m-instruct-bf16")
    assert key("meta-llama/Llama-2-7b-hf") != key("meta-llama/Llama-2-7b-chat-hf")


def test_tensor_rules_for_other_peft_layouts(llama_dir):
    modules = adapter_fit._meta_modules(str(llama_dir), False)
    misfit = lambda key, shape: adapter_fit._tensor_misfit(f"base_model.model.{key}", shape, modules)  # noqa: E731
    assert "no module 'model.layers.30.self_attn.q_proj'" in misfit("model.layers.30.self_attn.q_proj.lora_A.weight",
                                                                    (4, 32))  # from a deeper model
    assert "has shape [4142, 32], [4144, 32] in the base model" in misfit("lm_head.weight", (4142, 32))
    assert misfit("lm_head.weight", (4144, 32)) is None  # modules_to_save of the right size
    assert misfit("model.embed_tokens.lora_embedding_A", (4, 4144)) is None
    assert "maps 4144 -> 32" in misfit("model.embed_tokens.lora_embedding_B", (48, 4))
    assert misfit("model.embed_tokens.token_adapter.trainable_tokens_delta", (2, 32)) is None


def test_report_reads_an_eval_folder_as_candidates_and_their_comparisons(tmp_path):
    from harness.errors import RunError
    from harness.reporting.report import write_reports
    from tests.fixtures_runs import make_run

    root = tmp_path / "eval"
    for seed, name in enumerate(("lora-a", "lora-b"), 1):
        make_run(root / "candidates", name, seed=seed)
    delta = {"rougeL": {"value": 1.5, "ci95": [0.5, 2.5], "n": 24},
             "perplexity": {"value": 0.3, "ci95": [-0.2, 0.8], "n": 24}}
    doc = {"candidates": {n: {"folder": f"candidates/{n}"} for n in ("lora-a", "lora-b")},
           "comparisons": [{"a": "lora-a", "b": "lora-b", "delta": delta,
                            "win_tie_loss": {"rougeL": {"win": 12, "tie": 4, "loss": 8}}}]}
    (root / "metrics.json").write_text(json.dumps(doc), encoding="utf-8")
    html_path, md_path = write_reports([root], tmp_path / "out")
    md = md_path.read_text(encoding="utf-8")
    assert "2 adapters: lora-a, lora-b" in md and "| lora-b − lora-a: Δ (95% CI) | W / T / L |" in md
    assert "| rougeL ↑ | **+1.50** [+0.50, +2.50] sig. better | 12 / 4 / 8 |" in md
    assert "| perplexity ↓ | +0.30 [-0.20, +0.80] n.s. | — |" in md
    assert 'data-pair-metric="rougeL"' in html_path.read_text(encoding="utf-8")
    del delta["rougeL"]["ci95"]
    (root / "metrics.json").write_text(json.dumps(doc), encoding="utf-8")
    with pytest.raises(RunError, match=r"comparisons\[0\]\.delta\.rougeL needs a numeric value and ci95"):
        write_reports([root], tmp_path / "out")
