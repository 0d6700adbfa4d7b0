"""`compare` and `run --models` / `sweep --models`: fine-tunes of different base models on one held-out split.

The hand-checked numbers come from run folders whose texts make every per-example ROUGE-L 0 or 100
(fixtures_runs.make_scored_run scores them with the harness's own scorers); the workflow tests run the
tiny Llama (ChatML) and the tiny Gemma 3 (alpaca prompt, another vocabulary) on the same examples.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, TINY_OVERRIDES
from fixtures_runs import make_scored_run
from harness.cli import main
from harness.reporting.leaderboard import build_leaderboard, write_leaderboard

TASK = str(REPO / "tasks" / "amazon_desc.yaml")
REFS = [f"red cotton shirt number {i} for summer" for i in range(10)]
WRONG = "zzz qqq"


def _right(n_right: int) -> list[str]:
    """Tuned outputs equal to the reference on the first `n_right` examples (ROUGE-L 100), else disjoint (0)."""
    return [r if i < n_right else WRONG for i, r in enumerate(REFS)]


def test_pairwise_delta_is_the_mean_per_example_difference(tmp_path):
    a = make_scored_run(tmp_path, "a", references=REFS, tuned=_right(6))
    b = make_scored_run(tmp_path, "b", references=REFS, tuned=_right(8), model="embedded:gemma3-270m",
                        tokenizer="tok-b", manifest={"train": {"seconds": 8.0, "train_tokens": 4000,
                                                               "base_parameters": 268_000_000}})
    doc, paths = write_leaderboard([a, b], tmp_path / "out")
    assert [p.name for p in paths] == ["leaderboard.json", "leaderboard_examples.jsonl", "leaderboard.md",
                                       "leaderboard.html"]
    (pair,) = doc["pairs"]
    assert (pair["a"], pair["b"]) == ("smollm2-135m-instruct", "gemma3-270m")
    delta = pair["tuned"]["delta"]["rougeL"]
    rows = [json.loads(line) for line in paths[1].read_text().splitlines()]
    per_example = [r["gemma3-270m"]["tuned"]["rougeL"] - r["smollm2-135m-instruct"]["tuned"]["rougeL"] for r in rows]
    assert per_example == [0.0] * 6 + [100.0, 100.0, 0.0, 0.0]
    assert delta["value"] == pytest.approx(np.mean(per_example)) == pytest.approx(20.0)
    low, high = delta["ci95"]
    assert 0.0 <= low <= 20.0 <= high <= 50.0  # b never loses an example: no replicate below 0
    assert pair["tuned"]["win_tie_loss"]["rougeL"] == {"win": 2, "tie": 8, "loss": 0}
    assert pair["base"]["delta"]["rougeL"] == {"value": 0.0, "ci95": [0.0, 0.0], "n": 10}  # one base text
    # different tokenizers: perplexity is not compared, and says why
    assert "perplexity" not in pair["tuned"]["delta"] and "tokenizer" in pair["omitted"]["perplexity"]
    # the CI holds 0: the models share rank 1, each named as not separated from the other
    ranking = doc["ranking"]["rougeL"]
    assert [(r["name"], r["rank"]) for r in ranking] == [("gemma3-270m", 1), ("smollm2-135m-instruct", 1)]
    assert ranking[0]["not_separated_from"] == ["smollm2-135m-instruct"]
    cost = {m["name"]: m["cost"] for m in doc["models"]}
    assert cost["gemma3-270m"]["train_tokens_per_s"] == 500.0 and cost["gemma3-270m"]["base_parameters"] == 268e6
    assert cost["smollm2-135m-instruct"]["base_parameters"] is None  # not recorded: shown as missing
    assert cost["smollm2-135m-instruct"]["peak_gpu_memory_bytes"] is None
    md = paths[2].read_text()
    assert "not recorded" in md and "| 1 | gemma3-270m |" in md and len(md.encode()) < 60_000


def test_separated_models_rank_apart_and_same_tokenizer_compares_perplexity(tmp_path):
    nll_a = {"base": ([8.0] * 10, [4] * 10), "tuned": ([6.0] * 10, [4] * 10)}
    nll_b = {"base": ([8.0] * 10, [4] * 10), "tuned": ([4.0] * 10, [4] * 10)}
    a = make_scored_run(tmp_path, "a", references=REFS, tuned=_right(0), nll=nll_a)
    b = make_scored_run(tmp_path, "b", references=REFS, tuned=_right(10), nll=nll_b, model="/models/other")
    doc = build_leaderboard([a, b]).doc
    (pair,) = doc["pairs"]
    assert pair["tuned"]["delta"]["rougeL"]["value"] == 100.0 and pair["tuned"]["delta"]["rougeL"]["ci95"] == [100, 100]
    ppl = pair["tuned"]["delta"]["perplexity"]  # same tokenizer fingerprint: exp(4/4) - exp(6/4)
    assert ppl["value"] == pytest.approx(math.e - math.exp(1.5)) and not pair["omitted"]
    ranking = doc["ranking"]["rougeL"]
    assert [(r["name"], r["rank"], r["not_separated_from"]) for r in ranking] == \
        [("other", 1, []), ("smollm2-135m-instruct", 2, [])]
    assert [r["name"] for r in doc["ranking"]["perplexity"]] == ["other", "smollm2-135m-instruct"]


@pytest.mark.parametrize("change, message", [
    ({"ids": [f"other-{i}" for i in range(10)]},
     "different held-out splits (held-out ids: 10 only in the first, 10 only in the second)"),
    ({"references": REFS[:9] + ["another reference"]}, "different held-out splits (same ids, 1 reference(s) differ)"),
    ({"task": "other_task"}, "different tasks ('other_task' vs 'demo')"),
    ({"replicates": 300}, "different metric settings (metrics.bootstrap_replicates: 300 vs 200)"),
])
def test_refuses_runs_that_are_not_comparable(tmp_path, capsys, change, message):
    a = make_scored_run(tmp_path, "a", references=REFS, tuned=_right(5))
    kwargs = {"references": REFS, "tuned": _right(5), **change}
    b = make_scored_run(tmp_path, "b", **kwargs)
    out = tmp_path / "out"
    assert main(["compare", str(a), str(b), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err and str(b) in err
    assert not out.exists()  # nothing half-written


def test_refuses_edited_outputs_and_bad_arguments(tmp_path, capsys):
    a = make_scored_run(tmp_path, "a", references=REFS, tuned=_right(5))
    b = make_scored_run(tmp_path, "b", references=REFS, tuned=_right(7))
    rows = (b / "predictions.jsonl").read_text().splitlines()
    row = json.loads(rows[0])
    row["tuned"] = WRONG  # the scores on disk no longer give metrics.json's numbers
    (b / "predictions.jsonl").write_text("\n".join([json.dumps(row), *rows[1:]]) + "\n")
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "o")]) == 2
    assert f"{b}: predictions.jsonl and scores/ give tuned.rouge1" in capsys.readouterr().err
    assert main(["compare", str(a), "--out", str(tmp_path / "o")]) == 2
    assert "holds one model" in capsys.readouterr().err
    assert main(["compare", str(a), str(a)]) == 2
    assert "given twice" in capsys.readouterr().err
    c = make_scored_run(tmp_path, "c", references=REFS, tuned=_right(6))
    assert main(["compare", str(a), str(c), "--rank-by", "rougeX", "--out", str(tmp_path / "o")]) == 2
    assert "--rank-by rougeX" in capsys.readouterr().err


@pytest.mark.parametrize("setting, message", [
    ("model@nope.prompt.template=alpaca", "no model of --models is named like that"),
    ("model@tiny-gemma3.data.max_heldout=4", "data and metrics are shared by every model"),
    ("model.base=/x", "leave out model.base"),
    ("model@tiny-gemma3.prompt.templat=alpaca", "did you mean 'template'"),
])
def test_run_models_refuses_bad_per_model_settings_before_any_work(tmp_path, capsys, tiny_model_dir,
                                                                   tiny_gemma3_dir, setting, message):
    gemma = tmp_path / "tiny-gemma3"
    gemma.symlink_to(tiny_gemma3_dir)
    rc = main(["run", TASK, "--models", f"{tiny_model_dir},{gemma}", "--runs-dir", str(tmp_path / "runs"),
               "--set", setting])
    assert rc == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# -- run --models on the tiny Llama and the tiny Gemma 3: interrupted in the second model, resumed ------------
@pytest.fixture(scope="session")
def models_folder(tmp_path_factory, tiny_model_dir, tiny_gemma3_dir):
    """`run --models` interrupted while training its second model (Ctrl-C), then `run --resume`d:
    (the comparison folder, the first model's manifest as it was before the resume)."""
    import os

    from harness.recipes import run as run_recipe

    root = tmp_path_factory.mktemp("models")
    llama, gemma = root / "tiny-llama", root / "tiny-gemma3"
    llama.symlink_to(tiny_model_dir)
    gemma.symlink_to(tiny_gemma3_dir)
    args = [a for o in TINY_OVERRIDES for a in ("--set", o)]
    real_train = run_recipe.train_stage

    def interrupted_train(spec, *rest, **kw):
        if spec.model.base == str(gemma):
            raise KeyboardInterrupt
        return real_train(spec, *rest, **kw)

    cwd, env = os.getcwd(), dict(os.environ)
    os.chdir(root)  # the runs' reports/ land here
    os.environ.update(HARNESS_DEVICE="cpu", HARNESS_SCORE_CACHE=str(root / "cache"))
    try:
        run_recipe.train_stage = interrupted_train
        try:
            rc = main(["run", TASK, "--models", f"{llama},{gemma}", "--runs-dir", str(root / "runs"), *args,
                       "--set", "model@tiny-gemma3.prompt.template=alpaca"])
        finally:
            run_recipe.train_stage = real_train
        assert rc == 130
        (folder,) = (root / "runs").iterdir()
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["status"] == "interrupted" and not (folder / "leaderboard.json").exists()
        first = json.loads(next((folder / "models").glob("tiny-llama-*")).joinpath("manifest.json").read_text())
        assert main(["run", "--resume", str(folder)]) == 0
    finally:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
    return folder, first


def test_run_models_resume_finishes_what_is_missing(models_folder):
    folder, first_before = models_folder
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["stages_done"].count("prepare") == 1
    records = {r["name"]: r for r in manifest["models"]}
    assert records["tiny-gemma3"]["overrides"] == ["prompt.template=alpaca"]
    first = json.loads(next((folder / "models").glob("tiny-llama-*")).joinpath("manifest.json").read_text())
    assert first == first_before  # the finished model was not touched
    second = json.loads((Path(records["tiny-gemma3"]["run_dir"]) / "manifest.json").read_text())
    assert second["status"] == "completed" and "resumed_at" in second
    # the data was prepared once: both models scored the comparison folder's split
    data = (folder / "data" / "heldout.jsonl").read_text()
    for record in records.values():
        assert (Path(record["run_dir"]) / "data" / "heldout.jsonl").read_text() == data
    doc = json.loads((folder / "leaderboard.json").read_text())
    assert [m["name"] for m in doc["models"]] == ["tiny-llama", "tiny-gemma3"]
    assert [m["prompt_template"] for m in doc["models"]] == [None, "alpaca"]
    for m in doc["models"]:  # what the runs now record about their cost
        assert m["cost"]["base_parameters"] > 0 and m["cost"]["adapter_bytes"] > 0
        assert m["cost"]["scoring_tokens_per_s"] > 0 and m["cost"]["peak_gpu_memory_bytes"] is None  # CPU
    (pair,) = doc["pairs"]
    assert "perplexity" in pair["omitted"]  # two vocabularies
    assert (folder / "leaderboard.html").is_file() and (folder / "leaderboard.md").is_file()


def test_compare_reads_the_models_runs_again(models_folder, tmp_path, capsys):
    folder, _ = models_folder
    runs = [r["run_dir"] for r in json.loads((folder / "manifest.json").read_text())["models"]]
    assert main(["compare", *runs, "--out", str(tmp_path / "again"), "--rank-by", "chrf"]) == 0
    printed = capsys.readouterr().out
    assert "ranked by tuned chrf on 8 held-out examples" in printed
    again = json.loads((tmp_path / "again" / "leaderboard.json").read_text())
    first = json.loads((folder / "leaderboard.json").read_text())
    assert again["pairs"] == first["pairs"] and again["rank_by"] == "chrf"


def test_sweep_models_chooses_per_model_then_compares(tmp_path, tiny_model_dir, tiny_gemma3_dir, monkeypatch):
    """Interrupted in the second model's first trial, then resumed: each model's held-out run is its own
    sweep's winner, and the first sweep is not run again."""
    from harness.recipes import sweep as sweep_recipe

    monkeypatch.chdir(tmp_path)
    gemma = tmp_path / "tiny-gemma3"
    gemma.symlink_to(tiny_gemma3_dir)
    real_train = sweep_recipe.train_stage

    def interrupted_train(spec, *rest, **kw):
        if spec.model.base == str(gemma):
            raise KeyboardInterrupt
        return real_train(spec, *rest, **kw)

    monkeypatch.setattr(sweep_recipe, "train_stage", interrupted_train)
    args = [a for o in TINY_OVERRIDES for a in ("--set", o)]
    rc = main(["sweep", TASK, "--models", f"{tiny_model_dir},{gemma}", "--grid", "generation.no_repeat_ngram_size=0,3",
               "--sweeps-dir", str(tmp_path / "sweeps"), "--runs-dir", str(tmp_path / "runs"), *args,
               "--set", "sweep.max_validation=4", "--set", "model@tiny-gemma3.prompt.template=alpaca"])
    assert rc == 130
    (top,) = (tmp_path / "sweeps").iterdir()
    (first_sweep,) = (top / "sweeps" / tiny_model_dir.name).iterdir()
    first_before = (first_sweep / "manifest.json").read_text()
    monkeypatch.setattr(sweep_recipe, "train_stage", real_train)
    assert main(["sweep", "--resume", str(top)]) == 0
    assert (first_sweep / "manifest.json").read_text() == first_before
    doc = json.loads((top / "leaderboard.json").read_text())
    assert [m["prompt_template"] for m in doc["models"]] == [None, "alpaca"]
    for model in doc["models"]:  # each model's held-out run is its own sweep's winner
        manifest = json.loads((Path(model["folder"]) / "manifest.json").read_text())
        assert manifest["sweep"]["dir"].startswith(str(top / "sweeps"))
        assert model["cost"]["adapter_from"] == manifest["sweep"]["trial_dir"]
    assert any("sweep winner" in note for note in doc["notes"])
    shutil.rmtree(top / "sweeps")  # keep the temp folder small

def test_eval_candidates_are_models_beside_run_folders(models_folder, tiny_run, tmp_path, monkeypatch, capsys):
    """An eval folder of two adapters of the tiny Llama (one base, scored once) next to the tiny Gemma 3's run."""
    monkeypatch.chdir(tmp_path)
    folder, _ = models_folder
    runs = {r["name"]: r["run_dir"] for r in json.loads((folder / "manifest.json").read_text())["models"]}
    assert main(["eval", str(Path(runs["tiny-llama"]) / "spec.yaml"), "--adapter", runs["tiny-llama"],
                 "--adapter", str(tiny_run), "--runs-dir", str(tmp_path / "runs")]) == 0
    (eval_dir,) = (tmp_path / "runs").iterdir()
    assert main(["compare", str(eval_dir), runs["tiny-gemma3"], "--out", str(tmp_path / "out")]) == 0
    doc = json.loads((tmp_path / "out" / "leaderboard.json").read_text())
    names = [m["name"] for m in doc["models"]]
    assert len(names) == 3 and names[2] == "tiny-gemma3" and all(n.startswith("tiny-llama · ") for n in names[:2])
    same_base = doc["pairs"][0]  # the two candidates: one base model, one set of base outputs
    assert all(d["value"] == 0.0 and d["ci95"] == [0.0, 0.0] for d in same_base["base"]["delta"].values())
    assert "perplexity" in same_base["tuned"]["delta"] and not same_base["omitted"]  # one tokenizer
    assert all("perplexity" in p["omitted"] for p in doc["pairs"][1:])
