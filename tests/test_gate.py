"""The CI gate: rule logic on synthetic outputs (fast), and `harness check` end to end on the tiny model."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from harness.cli import main
from harness.errors import CannotJudge
from harness.recipes.check import select_subset
from harness.reporting.verdict import render_junit
from harness.scoring.gate_rules import evaluate, floor_check, guard_check, margin_check
from harness.scoring.metrics import MetricSettings, ModelOutputs
from harness.spec import GateSpec, RuleSpec
from tests.conftest import REPO, tiny_overrides

TASK = str(REPO / "tasks" / "amazon_desc.yaml")


# -- rule logic --------------------------------------------------------------------------------
@pytest.mark.parametrize("high, passed", [(-1.0, True), (-1.0001, False), (0.5, True)])
def test_margin_higher_is_better_fails_only_when_whole_interval_is_below_minus_margin(high, passed):
    result = margin_check("rougeL", delta=high - 1, ci95=[high - 2, high], margin=1.0, mde=0.0, n=50)
    assert result.passed is passed and result.name == "rougeL.margin" and result.score == high - 1
    assert ("regression" in result.reason) is not passed


@pytest.mark.parametrize("low, passed", [(0.5, True), (0.5001, False), (-3.0, True)])
def test_margin_lower_is_better_fails_only_when_whole_interval_is_above_plus_margin(low, passed):
    result = margin_check("perplexity", delta=low + 1, ci95=[low, low + 2], margin=0.5, mde=0.0, n=50)
    assert result.passed is passed


def test_floor_is_a_ceiling_for_perplexity():
    assert floor_check("chrf", 30.0, 30.0).passed and not floor_check("chrf", 29.9, 30.0).passed
    assert floor_check("perplexity", 10.0, 10.0).passed and not floor_check("perplexity", 10.1, 10.0).passed
    assert "above the ceiling" in floor_check("perplexity", 10.1, 10.0).reason


def test_guards():
    assert guard_check("empty_share", 0.05, 0.05).passed
    failed = guard_check("truncated_share", 0.6, 0.5)
    assert not failed.passed and failed.score == 0.6 and failed.name == "guard.truncated_share"


def test_a_nan_never_passes_a_rule():
    with pytest.raises(CannotJudge):
        margin_check("rougeL", delta=float("nan"), ci95=[float("nan"), float("nan")], margin=1.0, mde=0.0, n=5)
    with pytest.raises(CannotJudge):
        floor_check("perplexity", float("nan"), 10.0)


def _outputs(predictions, references, nll=None):
    n = len(references)
    return ModelOutputs(predictions, references, np.full(n, 20.0) if nll is None else np.asarray(nll),
                        np.full(n, 10))


REFS = [f"product {i} is a sturdy red widget with {i % 7} extra parts for the home" for i in range(40)]
SHARES = {"empty_share": 0.0, "truncated_share": 0.0, "loop_share": 0.0}
LOOPING = "It is very easy to use. It is very easy to read. " * 4  # 56 tokens; its second half repeats the first
SETTINGS = MetricSettings(bootstrap_replicates=300)


def test_identical_outputs_pass_without_power_warning():
    base = _outputs(REFS, REFS)
    gate = GateSpec(rules=[RuleSpec("rougeL", 1.0, floor=50.0), RuleSpec("perplexity", 0.5)])
    results, warnings, metrics = evaluate(gate, base, _outputs(REFS, REFS), SHARES, SETTINGS)
    assert [r.name for r in results] == ["rougeL.margin", "rougeL.floor", "perplexity.margin",
                                         "guard.empty_share", "guard.truncated_share"]
    assert all(r.passed for r in results) and warnings == []
    assert metrics["rougeL"]["delta"] == 0.0


def test_clear_regression_fails_in_both_directions():
    worse_text = [" ".join(r.split()[:3]) for r in REFS]
    worse_nll = np.full(len(REFS), 20.0) + np.linspace(5, 8, len(REFS))
    gate = GateSpec(rules=[RuleSpec("rougeL", 1.0), RuleSpec("perplexity", 0.5)])
    results, _, _ = evaluate(gate, _outputs(REFS, REFS), _outputs(worse_text, REFS, worse_nll), SHARES, SETTINGS)
    assert {r.name: r.passed for r in results}["rougeL.margin"] is False
    assert {r.name: r.passed for r in results}["perplexity.margin"] is False


def test_small_noisy_set_warns_that_it_is_underpowered():
    rng = np.random.default_rng(0)
    refs = REFS[:6]
    noisy = [" ".join(w for w in r.split() if rng.random() < 0.6) or "x" for r in refs]
    gate = GateSpec(rules=[RuleSpec("rougeL", 0.5)])
    results, warnings, _ = evaluate(gate, _outputs(refs, refs), _outputs(noisy, refs), SHARES, SETTINGS)
    assert len(warnings) == 1 and "too small to detect" in warnings[0] and "n=6" in warnings[0]
    assert "underpowered" in results[0].reason


def test_a_candidate_that_loops_more_than_the_baseline_fails_the_loops_margin():
    candidate = [LOOPING if i % 4 == 0 else r for i, r in enumerate(REFS)]  # 10 of 40 loop, none before
    gate = GateSpec(rules=[RuleSpec("loops", 0.05)], max_loop_share=0.2)
    results, _, metrics = evaluate(gate, _outputs(REFS, REFS), _outputs(candidate, REFS), {**SHARES, "loop_share": 0.25},
                                   SETTINGS)
    by_name = {r.name: r for r in results}
    assert by_name["loops.margin"].passed is False and by_name["loops.margin"].score == pytest.approx(0.25)
    assert "fails only if the lower end is above +0.05" in by_name["loops.margin"].reason
    assert by_name["guard.loop_share"].passed is False and "over the limit 20%" in by_name["guard.loop_share"].reason
    assert metrics["loops"]["delta"] == pytest.approx(0.25) and metrics["loops"]["delta_ci95"][0] > 0.05
    # Within the margin: one looping output more (1 of 40) is not a regression.
    slight = [LOOPING if i == 0 else r for i, r in enumerate(REFS)]
    results, _, _ = evaluate(GateSpec(rules=[RuleSpec("loops", 0.05)]), _outputs(REFS, REFS), _outputs(slight, REFS),
                             SHARES, SETTINGS)
    assert [(r.name, r.passed) for r in results] == [("loops.margin", True), ("guard.empty_share", True),
                                                     ("guard.truncated_share", True)]


def test_subset_is_seeded_fixed_size_and_in_split_order():
    items = list(range(20))
    a, b = select_subset(items, 6, 0), select_subset(items, 6, 0)
    assert a == b == sorted(a) and len(a) == 6 and select_subset(items, 6, 1) != a
    assert select_subset(items, None, 0) == items and select_subset(items, 50, 0) == items


def test_junit_escapes_and_marks_failures():
    record = {"task": "t", "verdict": "regression", "warnings": ["<w&>"], "reason": "x",
              "rules": [{"name": "a", "passed": True, "score": 1.0, "reason": "ok"},
                        {"name": "b", "passed": False, "score": -3.0, "reason": "bad <&> \"q\""}]}
    suite = ET.fromstring(render_junit(record)).find("testsuite")
    assert suite.get("tests") == "2" and suite.get("failures") == "1"
    assert suite.findall("testcase")[1].find("failure").get("message") == "bad <&> \"q\""


# -- end to end on the tiny model --------------------------------------------------------------
@pytest.fixture(scope="module")
def gate_env(tiny_run, tiny_model_dir, tmp_path_factory):
    """A baseline file written from the shared tiny run, and the --set arguments for `check`."""
    root = tmp_path_factory.mktemp("gate")
    baseline = root / "baselines" / "amazon_desc.json"
    assert main(["baseline", str(tiny_run), "--out", str(baseline)]) == 0
    # The tiny model never ends within 8 new tokens: lift the truncation guard (tested above).
    extra = ("gate.subset=6", "gate.max_truncated_share=1.0")
    sets = [x for o in tiny_overrides(tiny_model_dir, *extra) for x in ("--set", o)]
    return baseline, sets


def _check(candidate, baseline, out, sets, *extra):
    return main(["check", TASK, "--candidate", str(candidate), "--baseline", str(baseline), "--out", str(out),
                 *sets, *extra])


def _verdict(out):
    return json.loads((out / "verdict.json").read_text())


slow = pytest.mark.slow


@slow
def test_baseline_file_contents(gate_env, tiny_run):
    doc = json.loads(gate_env[0].read_text())
    assert doc["task"] == "amazon_desc" and len(doc["examples"]) == 8
    assert set(doc["fingerprints"]) >= {"base_model", "tokenizer", "heldout_split", "prompt", "generation",
                                        "metrics", "adapter"}
    row = doc["examples"][0]
    assert set(row) >= {"id", "prediction", "nll_sum", "n_tokens", "hit_max_new_tokens", "scores"}
    assert doc["metrics"]["rougeL"]["value"] == pytest.approx(
        json.loads((tiny_run / "metrics.json").read_text())["tuned"]["rougeL"]["value"])


@slow
def test_same_adapter_passes_against_file_and_run_folder(gate_env, tiny_run, tmp_path, monkeypatch):
    baseline, sets = gate_env
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    assert _check(tiny_run / "adapter", baseline, tmp_path / "a", sets) == 0
    verdict = _verdict(tmp_path / "a")
    assert verdict["verdict"] == "pass" and verdict["exit_code"] == 0 and verdict["n"] == 6
    assert verdict["sources"]["candidate"].startswith("scored ")
    assert [r["name"] for r in verdict["rules"]][:2] == ["rougeL.margin", "chrf.margin"]
    assert "PASS" in summary.read_text() and (tmp_path / "a" / "junit.xml").is_file()

    assert _check(tiny_run / "adapter", tiny_run, tmp_path / "b", sets) == 0
    assert _verdict(tmp_path / "b")["sources"]["baseline"].startswith("cached scores")


@slow
def test_damaged_adapter_is_a_regression(gate_env, tiny_run, tmp_path):
    from safetensors.torch import load_file, save_file

    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_run / "adapter", damaged)
    weights = load_file(damaged / "adapter_model.safetensors")
    save_file({k: v * 30 if "lora_B" in k else v for k, v in weights.items()}, damaged / "adapter_model.safetensors")
    assert _check(damaged, gate_env[0], tmp_path / "out", gate_env[1]) == 1
    assert _verdict(tmp_path / "out")["verdict"] == "regression"
    suite = ET.parse(tmp_path / "out" / "junit.xml").getroot().find("testsuite")
    assert int(suite.get("failures")) >= 1 and suite.find("testcase/failure") is not None


@slow
def test_cannot_judge_cases_exit_2_and_say_why(gate_env, tiny_run, tmp_path, capsys):
    baseline, sets = gate_env
    # Another held-out split: the baseline's predictions are for other examples.
    assert _check(tiny_run, baseline, tmp_path / "split", sets, "--set", "data.split_salt=other") == 2
    verdict = _verdict(tmp_path / "split")
    assert verdict["verdict"] == "cannot_judge" and "heldout_split" in verdict["reason"]
    assert (tmp_path / "split" / "verdict.md").is_file()

    doc = json.loads(baseline.read_text())
    other = tmp_path / "other_task.json"
    other.write_text(json.dumps({**doc, "task": "other_task"}))
    assert _check(tiny_run, other, tmp_path / "task", sets) == 2
    assert "other_task" in _verdict(tmp_path / "task")["reason"]

    doc["examples"][2]["nll_sum"] = float("nan")
    nan = tmp_path / "nan.json"
    nan.write_text(json.dumps(doc))  # json writes NaN
    assert _check(tiny_run, nan, tmp_path / "nan", sets) == 2
    assert "examples[2].nll_sum" in _verdict(tmp_path / "nan")["reason"]

    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    assert _check(tiny_run, garbage, tmp_path / "garbage", sets) == 2
    assert _check(tiny_run, baseline, tmp_path / "norules", sets, "--set", "gate.rules=[]") == 2
    assert "gate.rules" in _verdict(tmp_path / "norules")["reason"]

    broken = tmp_path / "broken"
    shutil.copytree(tiny_run / "adapter", broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    assert _check(broken, baseline, tmp_path / "broken-out", sets) == 2
    assert _verdict(tmp_path / "broken-out")["verdict"] == "cannot_judge"
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("harness: error: ") and str(broken) in err[-1]


@slow
def test_gate_exits_1_when_the_candidate_loops_more_than_the_baseline(gate_env, tiny_run, tmp_path):
    baseline, sets = gate_env  # the tiny model's 8-token outputs are too short to loop
    looping_run = tmp_path / "looping-run"
    shutil.copytree(tiny_run, looping_run)
    gens = looping_run / "scores" / "tuned_generations.jsonl"
    rows = [json.loads(line) for line in gens.read_text().splitlines()]
    gens.write_text("".join(json.dumps({**r, "text": LOOPING}) + "\n" for r in rows))  # its reused outputs loop
    code = _check(looping_run, baseline, tmp_path / "out", sets, "--set", "gate.rules=[{metric: loops, margin: 0.05}]")
    verdict = _verdict(tmp_path / "out")
    assert code == 1 and verdict["verdict"] == "regression" and verdict["reason"] == "failed: loops.margin"
    assert verdict["sources"]["candidate"].startswith("cached scores") and verdict["metrics"]["loops"]["delta"] == 1.0
