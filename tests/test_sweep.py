"""`harness sweep` (issue 12, item 3): settings chosen on validation, never on held-out.

End-to-end sweeps on the tiny model (2 training steps, 8 validation and 8 held-out examples),
an interrupted sweep resumed twice, the choice rule on a hand-built study, and
`train.keep_best` restoring the checkpoint with the lowest eval loss (also across a resume).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import signal
from pathlib import Path

import pytest

from harness import devices
from harness.cli import main
from harness.data.cleaning import normalize_title
from harness.data.records import prepare
from harness.data.splitting import split_value
from harness.errors import SpecError
from harness.spec import SweepSpec, load_spec
from tests.conftest import REPO, tiny_overrides

pytestmark = pytest.mark.slow
TASK = str(REPO / "tasks" / "amazon_desc.yaml")
SWEEP_SETS = ("sweep.validation_fraction=0.2", "sweep.max_validation=8", "train.max_steps=2")


def _sweep_cli(tmp_path: Path, model_dir: Path, grids: list[str], *extra: str) -> int:
    swept = {g.partition("=")[0] for g in grids}  # the tiny run's own train.lr gives way to the grid
    sets = [x for o in tiny_overrides(model_dir, *SWEEP_SETS, *extra) if o.partition("=")[0] not in swept
            for x in ("--set", o)]
    return main(["-q", "sweep", TASK, *[x for g in grids for x in ("--grid", g)], *sets,
                 "--sweeps-dir", str(tmp_path / "sweeps"), "--runs-dir", str(tmp_path / "runs")])


def _resume_cli(sweep_dir: Path) -> int:
    return main(["-q", "sweep", "--resume", str(sweep_dir)])


def _only(folder: Path) -> Path:
    (found,) = [p for p in folder.iterdir() if p.is_dir()]
    return found


def _json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def _ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text(encoding="utf-8").splitlines()]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _study(sweep_dir: Path):
    import optuna

    return optuna.load_study(study_name=_json(sweep_dir / "manifest.json")["sweep"]["study"],
                             storage=f"sqlite:///{sweep_dir / 'study.db'}")


def _count_trainings(monkeypatch, fail_on: dict | None = None) -> list:
    """Wrap the sweep's train_stage to record each call's spec; `fail_on` maps a call number to the
    exception raised instead of that call."""
    from harness.recipes import run, sweep

    calls = []

    @functools.wraps(run.train_stage)
    def wrapper(spec, *args, **kwargs):
        calls.append(spec)
        if fail_on and len(calls) in fail_on:
            raise fail_on[len(calls)]
        return run.train_stage(spec, *args, **kwargs)

    monkeypatch.setattr(sweep, "train_stage", wrapper)
    return calls


def _scored_sets(monkeypatch) -> list[frozenset]:
    """The example ids of every ScoringSession the sweep opens (validation or held-out)."""
    from harness.scoring import heldout_scoring

    sessions = []
    real = heldout_scoring.ScoringSession.__init__

    def init(self, spec, tokenizer, examples, *args, **kwargs):
        sessions.append(frozenset(e.id for e in examples))
        real(self, spec, tokenizer, examples, *args, **kwargs)

    monkeypatch.setattr(heldout_scoring.ScoringSession, "__init__", init)
    return sessions


def _expected_choice(rows: list[dict], max_loop_share: float) -> list[int]:
    """The rule, re-derived from trials.jsonl: feasible = tuned loop share within the cap and the
    base's; best validation rougeL first, earlier trial on a tie."""
    def loops(row, side):
        return row["validation"]["guards"][side]["loop_share"]

    feasible = [r for r in rows if r["state"] == "complete"
                and loops(r, "tuned") <= max_loop_share and loops(r, "tuned") <= loops(r, "base")]
    return [r["trial"] for r in sorted(feasible, key=lambda r: (-r["value"], r["trial"]))]


def test_grid_sweep_chooses_on_validation_and_scores_only_the_winner_on_heldout(tmp_path, tiny_model_dir,
                                                                               monkeypatch):
    """A 2x2 grid: four trials, each scored on the validation slice only; trials that differ only in
    generation settings share one adapter (two trainings); the winner follows the rule and is the
    only thing ever scored on held-out, in a run folder that `harness report` accepts."""
    monkeypatch.chdir(tmp_path)
    trainings = _count_trainings(monkeypatch)
    sessions = _scored_sets(monkeypatch)
    grid = {"train.lr": [0.02, 0.05], "generation.repetition_penalty": [1.0, 1.3]}
    assert _sweep_cli(tmp_path, tiny_model_dir, ["train.lr=0.02,0.05", "generation.repetition_penalty=1.0,1.3"]) == 0

    sweep_dir = _only(tmp_path / "sweeps")
    manifest = _json(sweep_dir / "manifest.json")
    assert manifest["status"] == "completed"
    assert manifest["stages_done"] == ["prepare", "trials", "choose", "heldout", "report"]

    # every trial recorded, in the study and in trials.jsonl / trials.csv
    study = _study(sweep_dir)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
    combos = {tuple(c) for c in itertools.product(*grid.values())}
    assert {(t.params["train.lr"], t.params["generation.repetition_penalty"]) for t in study.trials} == combos
    rows = [json.loads(line) for line in (sweep_dir / "trials.jsonl").read_text().splitlines()]
    assert [r["trial"] for r in rows] == [0, 1, 2, 3]
    for t, row in zip(study.trials, rows):
        assert row["validation"] == t.user_attrs["validation"] and row["value"] == t.value
        assert row["value"] == row["validation"]["tuned"]["rougeL"] and row["gains"] is None
        assert set(row["validation"]["guards"]["tuned"]) >= {"loop_share", "length_ratio", "empty_share"}
    csv = (sweep_dir / "trials.csv").read_text().splitlines()
    assert len(csv) == 5 and "validation.tuned.rougeL" in csv[0].split(",")

    # two trainings (one per learning rate); the generation-only twin got the same adapter
    assert sorted(s.train.lr for s in trainings) == [0.02, 0.05]
    adapters = {}
    for t in study.trials:
        adapters.setdefault(t.params["train.lr"], set()).add(
            _sha256(Path(t.user_attrs["trial_dir"]) / "adapter" / "adapter_model.safetensors"))
    assert all(len(shas) == 1 for shas in adapters.values()) and len({*adapters[0.02], *adapters[0.05]}) == 2

    # the validation slice is carved from train and never meets held-out
    validation = _json(sweep_dir / "validation.json")
    heldout_ids = set(_ids(sweep_dir / "data" / "heldout.jsonl"))
    train_ids = set(_ids(sweep_dir / "data" / "train.jsonl"))
    assert validation["count"] == len(validation["ids"]) == 8 and validation["carved_from"] == "train"
    assert set(validation["ids"]) <= train_ids and not set(validation["ids"]) & heldout_ids

    # the choice follows the rule; held-out is scored exactly once, for the winner
    choice = _json(sweep_dir / "choice.json")
    ranked = _expected_choice(rows, max_loop_share=0.1)
    assert choice["winner"]["trial"] == ranked[0] and choice["runner_up"]["trial"] == ranked[1]
    assert choice["margin"] == pytest.approx(abs(rows[ranked[0]]["value"] - rows[ranked[1]]["value"]))
    assert [s for s in sessions if s == heldout_ids] == [frozenset(heldout_ids)]
    assert all(s == set(validation["ids"]) for s in sessions if s != heldout_ids) and len(sessions) == 5

    # the winner's run folder: the run contract, its trial's adapter, not retrained
    run_dir = Path(choice["heldout_run"])
    assert run_dir.parent == tmp_path / "runs"
    run_manifest = _json(run_dir / "manifest.json")
    assert run_manifest["status"] == "completed" and run_manifest["sweep"]["trial"] == ranked[0]
    winner_dir = Path(choice["winner"]["trial_dir"])
    assert _sha256(run_dir / "adapter" / "adapter_model.safetensors") == \
        _sha256(winner_dir / "adapter" / "adapter_model.safetensors")
    assert run_manifest["train"]["adapter_from"] == str(winner_dir)
    assert set(_ids(run_dir / "predictions.jsonl")) == heldout_ids
    assert main(["-q", "report", str(run_dir), "--out", str(tmp_path / "report")]) == 0

    md = (sweep_dir / "sweep.md").read_text()
    assert f"| {ranked[0]} **winner** | complete |" in md and "## Winner on held-out" in md
    assert (sweep_dir / "sweep.html").read_text().count("data:image/png;base64,") == 2


def test_validation_slice_is_carved_from_train_only(tmp_path):
    """A pure function of the normalized title under its own salt: a partition of train (file order
    kept), disjoint from held-out by id and title, capped at the smallest hashes."""
    spec = load_spec(TASK, ["data.max_heldout=null"])
    prepared = prepare(spec)
    sweep = SweepSpec(validation_fraction=0.25, max_validation=20)
    from harness.recipes.sweep import carve_validation

    kept, validation = carve_validation(prepared.train, sweep)
    assert len(validation) == 20 and len(kept) + len(validation) == len(prepared.train)
    assert [e.id for e in prepared.train if e in validation] == [e.id for e in validation]
    key = lambda e: normalize_title(e.title)  # noqa: E731
    heldout = {key(e) for e in prepared.heldout}
    assert not {key(e) for e in validation} & heldout
    assert not {e.id for e in validation} & {e.id for e in prepared.heldout}
    values = sorted(split_value(key(e), sweep.validation_salt) for e in prepared.train)
    assert sorted(split_value(key(e), sweep.validation_salt) for e in validation) == values[:20]
    assert carve_validation(prepared.train, sweep)[1] == validation

    with pytest.raises(SpecError, match="sweep.validation_salt: must differ from data.split_salt"):
        load_spec(TASK, ["sweep.validation_salt=harness-v1"])
    with pytest.raises(SpecError, match=r"sweep.validation_fraction: 0.01 of 3 train examples leaves 0"):
        carve_validation(prepared.train[:3], SweepSpec(validation_fraction=0.01))


def test_interrupted_sweep_resumes_only_what_is_missing(tmp_path, tiny_model_dir, monkeypatch):
    """Trial 2 crashes (sweep exits 3), then its retry dies like a kill -9 (SystemExit escapes optuna,
    leaving the trial RUNNING under this process's pid); each --resume runs only what is missing:
    the finished trial is never rerun, the dead one is retried in its own folder."""
    monkeypatch.chdir(tmp_path)
    grids = ["train.lr=0.02,0.03,0.05"]
    calls = _count_trainings(monkeypatch, fail_on={2: RuntimeError("injected crash")})
    assert _sweep_cli(tmp_path, tiny_model_dir, grids) == 3
    sweep_dir = _only(tmp_path / "sweeps")
    assert _json(sweep_dir / "manifest.json")["status"] == "failed"
    study = _study(sweep_dir)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL"]
    first, failed = study.trials
    first_adapter = Path(first.user_attrs["trial_dir"]) / "adapter" / "adapter_model.safetensors"
    first_sha, first_mtime = _sha256(first_adapter), first_adapter.stat().st_mtime_ns
    assert calls[1].train.lr == failed.params["train.lr"]

    calls = _count_trainings(monkeypatch, fail_on={1: SystemExit("killed")})
    with pytest.raises(SystemExit):
        _resume_cli(sweep_dir)
    assert [t.state.name for t in _study(sweep_dir).trials] == ["COMPLETE", "FAIL", "RUNNING"]
    assert [s.train.lr for s in calls] == [failed.params["train.lr"]]

    calls = _count_trainings(monkeypatch)
    assert _resume_cli(sweep_dir) == 0
    rest = {0.02, 0.03, 0.05} - {first.params["train.lr"], failed.params["train.lr"]}
    assert [s.train.lr for s in calls] == [failed.params["train.lr"], *rest]
    study = _study(sweep_dir)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "FAIL", "COMPLETE", "COMPLETE"]
    retried = study.trials[3]
    assert retried.params == failed.params and retried.user_attrs["trial_dir"] == failed.user_attrs["trial_dir"]
    assert retried.system_attrs["failed_trial"] == failed.number
    assert (_sha256(first_adapter), first_adapter.stat().st_mtime_ns) == (first_sha, first_mtime)
    rows = [json.loads(line) for line in (sweep_dir / "trials.jsonl").read_text().splitlines()]
    assert [r["retry_of"] for r in rows] == [None, None, 1, 1, None]
    choice = _json(sweep_dir / "choice.json")
    assert choice["completed"] == 3 and choice["given_up"] == []
    assert choice["winner"]["trial"] == _expected_choice(rows, 0.1)[0]
    assert _json(Path(choice["heldout_run"]) / "manifest.json")["status"] == "completed"
    assert _json(sweep_dir / "manifest.json")["status"] == "completed"


def test_tpe_sweep_completes_its_n_trials(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """sampler tpe: optuna's TPE picks sweep.n_trials of the combinations; a finished sweep is not resumed."""
    monkeypatch.chdir(tmp_path)
    assert _sweep_cli(tmp_path, tiny_model_dir, ["generation.repetition_penalty=1.0,1.2,1.3"],
                      "sweep.sampler=tpe", "sweep.n_trials=2") == 0
    sweep_dir = _only(tmp_path / "sweeps")
    study = _study(sweep_dir)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert not any("grid_id" in t.system_attrs for t in study.trials)  # GridSampler marks each trial's slot
    assert all(t.params["generation.repetition_penalty"] in (1.0, 1.2, 1.3) for t in study.trials)
    rows = [json.loads(line) for line in (sweep_dir / "trials.jsonl").read_text().splitlines()]
    assert _json(sweep_dir / "choice.json")["winner"]["trial"] == _expected_choice(rows, 0.1)[0]
    capsys.readouterr()
    assert _resume_cli(sweep_dir) == 2
    assert "already completed; nothing to resume" in capsys.readouterr().err


def test_a_grid_over_mbr_samples_trains_once_and_scores_each_decoding(tmp_path, tiny_model_dir, monkeypatch):
    """`--grid generation.mbr_samples=0,4`: greedy against MBR over 4 samples, a decoding-only choice: one
    training whose adapter both trials share, each trial scored (base and tuned) with its own decoding."""
    monkeypatch.chdir(tmp_path)
    trainings = _count_trainings(monkeypatch)
    assert _sweep_cli(tmp_path, tiny_model_dir, ["generation.mbr_samples=0,4"], "generation.batch_size=4") == 0
    sweep_dir = _only(tmp_path / "sweeps")
    study = _study(sweep_dir)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 2
    assert sorted(t.params["generation.mbr_samples"] for t in study.trials) == [0, 4]
    assert len(trainings) == 1
    trial_dirs = {t.params["generation.mbr_samples"]: Path(t.user_attrs["trial_dir"]) for t in study.trials}
    assert len({_sha256(d / "adapter" / "adapter_model.safetensors") for d in trial_dirs.values()}) == 1
    texts = {n: {side: sorted(json.loads(line)["text"] for line in (d / "scores" / f"{side}_generations.jsonl")
                               .read_text(encoding="utf-8").splitlines()) for side in ("base", "tuned")}
             for n, d in trial_dirs.items()}
    assert texts[0]["base"] != texts[4]["base"] and texts[0]["tuned"] != texts[4]["tuned"]
    choice = _json(sweep_dir / "choice.json")
    rows = [json.loads(line) for line in (sweep_dir / "trials.jsonl").read_text().splitlines()]
    assert choice["winner"]["trial"] == _expected_choice(rows, 0.1)[0]


def test_retry_queues_what_failed_or_died_here_and_gives_up_after_three_failures():
    """A (failed 3 times) is given up, B (failed once) and D (RUNNING under a dead pid on this host)
    are queued again with their trial folders, C (complete) and E (running elsewhere) are left alone."""
    import socket
    import subprocess

    import optuna
    from optuna.trial import TrialState

    from harness.recipes.sweep import choose
    from harness.recipes.sweep_study import MAX_ATTEMPTS, retry_unfinished

    assert MAX_ATTEMPTS == 3
    dead = subprocess.Popen(["true"])
    dead.wait()
    study = optuna.create_study()
    plan = [("A", TrialState.FAIL, {}), ("A", TrialState.FAIL, {}), ("A", TrialState.FAIL, {}),
            ("B", TrialState.FAIL, {"trial_dir": "trials/b"}), ("C", TrialState.COMPLETE, {}),
            ("D", TrialState.RUNNING, {"host": socket.gethostname(), "pid": dead.pid, "trial_dir": "trials/d"}),
            ("E", TrialState.RUNNING, {"host": "another-machine", "pid": dead.pid})]
    for name, state, attrs in plan:
        study.enqueue_trial({"train.lr": name})
        trial = study.ask()
        trial.suggest_categorical("train.lr", list("ABCDE"))
        for key, value in {"validation": {"guards": {"tuned": {"loop_share": 0.0}, "base": {"loop_share": 0.0}}},
                           "trial_dir": "trials/x", **attrs}.items():
            trial.set_user_attr(key, value)
        if state != TrialState.RUNNING:
            study.tell(trial, 1.0 if state == TrialState.COMPLETE else None, state=state)
    retry_unfinished(study)
    states = [(t.params["train.lr"], t.state.name) for t in study.trials]
    assert states[:7] == [("A", "FAIL")] * 3 + [("B", "FAIL"), ("C", "COMPLETE"), ("D", "FAIL"), ("E", "RUNNING")]
    queued = {t.params["train.lr"]: t for t in study.trials[7:]}
    assert set(queued) == {"B", "D"} and all(t.state.name == "WAITING" for t in queued.values())
    assert queued["D"].user_attrs["trial_dir"] == "trials/d" and queued["B"].system_attrs["failed_trial"] == 3
    choice = choose(study, SweepSpec(), {"train.lr": list("ABCDE")})
    assert choice["winner"]["params"] == {"train.lr": "C"}
    assert choice["given_up"] == [{"params": {"train.lr": "A"}, "last_trial": 2}]


def _hand_built_study(trials, select="rougeL", max_loop_share=0.1):
    """An in-memory study whose trials carry the validation guards and the real loop constraints. Each
    trial is (value, tuned loop share, base loop share), or (validation scores, ...) whose value the
    sweep's own rule computes (`trial_value`)."""
    import optuna

    from harness.scoring.sweep_selection import loop_constraints, maximizes, trial_value

    sweep = SweepSpec(select=select, max_loop_share=max_loop_share)
    study = optuna.create_study(direction="maximize" if maximizes(select) else "minimize")
    for i, (value, tuned_loops, base_loops) in enumerate(trials):
        study.enqueue_trial({"train.lr": i})
        trial = study.ask()
        trial.suggest_categorical("train.lr", list(range(len(trials))))
        guards = {"tuned": {"loop_share": tuned_loops}, "base": {"loop_share": base_loops}}
        scores = value if isinstance(value, dict) else {}
        trial.set_user_attr("validation", {**scores, "guards": guards})
        trial.set_user_attr("trial_dir", f"trials/{i}")
        for name, constraint in loop_constraints(guards, sweep).items():
            trial.set_constraint(name, constraint)
        study.tell(trial, trial_value(scores, select) if scores else value)
    return study, sweep


def test_a_trial_that_loops_too_often_is_never_chosen():
    """Trial 0 scores best but loops past the cap, trial 3 second best but loops more than base: the
    winner is trial 1 (as optuna's own constrained best_trial says), trial 2 the runner-up."""
    from harness.recipes.sweep import choose

    study, sweep = _hand_built_study([(30.0, 0.5, 0.0), (25.0, 0.0, 0.0), (20.0, 0.05, 0.05), (28.0, 0.05, 0.0)])
    choice = choose(study, sweep, {"train.lr": [0, 1, 2, 3]})
    assert choice["winner"]["trial"] == 1 == study.best_trial.number
    assert choice["runner_up"]["trial"] == 2 and choice["margin"] == 5.0
    reasons = {c["trial"]: c["reasons"] for c in choice["infeasible"]}
    assert reasons == {0: ["tuned loop_share 0.500 > sweep.max_loop_share 0.1",
                           "tuned loop_share 0.500 > base loop_share 0.000"],
                       3: ["tuned loop_share 0.050 > base loop_share 0.000"]}

    study, sweep = _hand_built_study([(12.0, 0.0, 0.0), (9.0, 0.0, 0.0)], select="perplexity")
    assert choose(study, sweep, {"train.lr": [0, 1]})["winner"]["trial"] == 1  # lower perplexity wins
    study, sweep = _hand_built_study([(30.0, 0.5, 0.5)])
    choice = choose(study, sweep, {"train.lr": [0]})
    assert choice["winner"] is None and choice["infeasible"][0]["trial"] == 0


# -- sweep.select as a list: the worst paired gain --------------------------------------------
# Paired 95% CIs of tuned − base, chosen to be exact in binary floating point.
DELTA_CI = {"rougeL": [0.75, 2.125], "chrf": [-0.25, 1.5], "perplexity": [-1.25, -0.375], "loops": [-0.25, 0.125]}


def _validation_metrics(path: Path) -> None:
    """A fixed validation_metrics.json (the metrics.json format) with the deltas of DELTA_CI."""
    base = {"rougeL": 20.0, "chrf": 30.0, "perplexity": 12.5, "loops": 0.25}
    delta = {m: (lo + hi) / 2 for m, (lo, hi) in DELTA_CI.items()}
    block = lambda v, ci: {"value": v, "ci95": ci, "n": 8}  # noqa: E731
    path.write_text(json.dumps({
        "base": {m: block(v, [v, v]) for m, v in base.items()},
        "tuned": {m: block(base[m] + delta[m], [base[m], base[m] + 2 * delta[m]]) for m in base},
        "delta": {m: block(delta[m], DELTA_CI[m]) for m in base},
        "guards": {"base": {"loop_share": 0.25}, "tuned": {"loop_share": 0.125}}}), encoding="utf-8")


def test_worst_paired_gain_is_the_lowest_ci_bound_with_lower_is_better_flipped(tmp_path):
    """From a fixed validation_metrics.json: a higher-is-better metric's gain is the lower CI bound of
    tuned − base, a lower-is-better one's (perplexity, loops) minus the upper bound; the trial's value is
    the smallest gain. A list of one metric keeps the gain rule; a bare name keeps the tuned value."""
    from harness.scoring.sweep_selection import maximizes, paired_gains, trial_value
    from harness.sweepfolder import VALIDATION_METRICS, validation_scores

    _validation_metrics(tmp_path / VALIDATION_METRICS)
    scores = validation_scores(tmp_path)
    assert scores["delta_ci95"] == DELTA_CI
    assert paired_gains(scores, ["rougeL", "chrf", "perplexity", "loops"]) == \
        {"rougeL": 0.75, "chrf": -0.25, "perplexity": 0.375, "loops": -0.125}
    assert trial_value(scores, ["rougeL", "perplexity"]) == 0.375
    assert trial_value(scores, ["rougeL", "chrf", "perplexity"]) == -0.25
    assert trial_value(scores, ["loops", "rougeL"]) == -0.125
    assert trial_value(scores, ["perplexity"]) == 0.375 and maximizes(["perplexity"])
    assert trial_value(scores, "perplexity") == 12.5 + (-1.25 - 0.375) / 2 and not maximizes("perplexity")
    assert trial_value(scores, "rougeL") == 20.0 + (0.75 + 2.125) / 2


def _gain_scores(tuned_rougel: float, **cis) -> dict:
    return {"tuned": {"rougeL": tuned_rougel}, "delta_ci95": {m: list(ci) for m, ci in cis.items()}}


def test_a_list_select_chooses_the_best_worst_gain_over_a_higher_single_metric():
    """Trial 0 has the highest tuned rougeL and the widest rougeL gain but loses chrf, trial 3 the best
    worst gain but loops past the cap: [rougeL, chrf] picks trial 1 (worst gain 0.5) over trial 2 (0.25),
    where rougeL alone picks trial 0; each summary carries the listed metrics' gains."""
    from harness.recipes.sweep import choose, trial_rows

    trials = [(_gain_scores(30.0, rougeL=(2.0, 5.0), chrf=(-1.0, 0.5), perplexity=(-2.0, -1.0)), 0.0, 0.0),
              (_gain_scores(25.0, rougeL=(0.75, 3.0), chrf=(0.5, 2.0), perplexity=(-1.0, 0.25)), 0.0, 0.0),
              (_gain_scores(24.0, rougeL=(0.25, 2.0), chrf=(1.0, 3.0), perplexity=(-3.0, -1.5)), 0.0, 0.0),
              (_gain_scores(26.0, rougeL=(1.0, 3.0), chrf=(1.0, 2.0), perplexity=(-2.0, -1.0)), 0.5, 0.0)]
    grid = {"train.lr": [0, 1, 2, 3]}
    study, sweep = _hand_built_study(trials, select="rougeL")
    assert choose(study, sweep, grid)["winner"]["trial"] == 0

    study, sweep = _hand_built_study(trials, select=["rougeL", "chrf"])
    assert [t.value for t in study.trials] == [-1.0, 0.5, 0.25, 1.0]
    choice = choose(study, sweep, grid)
    assert choice["select"] == ["rougeL", "chrf"] and choice["direction"] == "maximize"
    assert choice["rule"].startswith("highest worst paired gain (lower bound of the paired 95% CI of tuned − base "
                                     "on validation, sign-flipped where lower is better) over rougeL, chrf among "
                                     "feasible trials")
    assert (choice["winner"]["trial"], choice["runner_up"]["trial"], choice["margin"]) == (1, 2, 0.25)
    assert choice["winner"]["gains"] == {"rougeL": 0.75, "chrf": 0.5}
    assert choice["runner_up"]["gains"] == {"rougeL": 0.25, "chrf": 1.0}
    assert [c["trial"] for c in choice["infeasible"]] == [3] and choice["infeasible"][0]["gains"]["chrf"] == 1.0
    rows = trial_rows(study, grid, sweep)
    assert [r["gains"] for r in rows][0] == {"rougeL": 2.0, "chrf": -1.0}
    assert all(r["value"] == min(r["gains"].values()) for r in rows)

    # perplexity's gain is minus the upper bound of the delta: trial 2 (upper -1.5) gains most, trial 1
    # (upper +0.25) did not clearly lower it; the lower bounds alone would have picked trial 1
    study, sweep = _hand_built_study(trials[:3], select=["perplexity"])
    assert [t.value for t in study.trials] == [1.0, -0.25, 1.5]
    assert choose(study, sweep, {"train.lr": [0, 1, 2]})["winner"]["trial"] == 2


def test_sweep_select_list_is_checked_before_any_work(tmp_path, capsys):
    """Each bad `sweep.select` is one line naming it; a good list loads from --set as YAML."""
    spec = load_spec(TASK, ["sweep.select=[rougeL,chrf]"])
    assert spec.sweep.select == ["rougeL", "chrf"] and load_spec(TASK).sweep.select == "rougeL"
    cases = [
        ("sweep.select=[rougeL,chrff]", "sweep.select[1]: unknown metric 'chrff' (did you mean 'chrf'?)"),
        ("sweep.select=[rougeL,chrf,rougeL]", "sweep.select[2]: 'rougeL' is listed twice"),
        ("sweep.select=[]", "sweep.select: must name a metric or list at least one"),
        ("sweep.select=rougeLL", "sweep.select: unknown metric 'rougeLL' (did you mean 'rougeL'?)"),
        ("sweep.select=[rougeL, 3]", "sweep.select: expected str | list[str], got ['rougeL', 3]"),
    ]
    for override, message in cases:
        assert main(["sweep", TASK, "--grid", "train.lr=1e-4,2e-4", "--set", override,
                     "--sweeps-dir", str(tmp_path / "sweeps")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (override, err)
    with pytest.raises(SpecError, match=r"sweep.select\[1\]: 'bleu' is not among metrics.names"):
        load_spec(TASK, ["sweep.select=[chrf,bleu]", "metrics.names=[rougeL,chrf,perplexity,loops]"])
    assert not (tmp_path / "sweeps").exists()


def test_list_select_sweep_ranks_by_worst_gain_and_reports_each_gain(tmp_path, tiny_model_dir, monkeypatch,
                                                                      capsys):
    """End to end on the tiny model: every trial's value is the worst gain recomputed by hand from its own
    validation_metrics.json, the winner follows it, and the report labels the column and shows each
    listed metric's gain instead of Base and Δ."""
    from harness.sweepfolder import VALIDATION_METRICS

    monkeypatch.chdir(tmp_path)
    select = ["rougeL", "chrf", "perplexity"]
    assert _sweep_cli(tmp_path, tiny_model_dir, ["generation.repetition_penalty=1.0,1.3"],
                      "sweep.select=[rougeL,chrf,perplexity]") == 0
    sweep_dir = _only(tmp_path / "sweeps")
    rows = [json.loads(line) for line in (sweep_dir / "trials.jsonl").read_text().splitlines()]
    for row in rows:
        delta = _json(Path(row["trial_dir"]) / VALIDATION_METRICS)["delta"]
        gains = {m: delta[m]["ci95"][0] if m != "perplexity" else -delta[m]["ci95"][1] for m in select}
        assert row["gains"] == gains and row["value"] == min(gains.values())
    choice = _json(sweep_dir / "choice.json")
    assert choice["select"] == select and choice["winner"]["trial"] == _expected_choice(rows, 0.1)[0]
    assert choice["winner"]["gains"] == rows[choice["winner"]["trial"]]["gains"]
    assert "validation worst paired gain (rougeL, chrf, perplexity)" in capsys.readouterr().out

    md = (sweep_dir / "sweep.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| Trial |"))
    assert header.endswith("| worst paired gain (rougeL, chrf, perplexity) ↑ | gain rougeL | gain chrf "
                           "| gain perplexity | Loops (tuned) | Feasible | Seconds |")
    winner = rows[choice["winner"]["trial"]]
    assert f"| {winner['value']:.2f} | " + " | ".join(f"{winner['gains'][m]:.2f}" for m in select) + " |" in md
    lines = md.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("- **Winner:**"))
    gains = ", ".join(f"{m} {winner['gains'][m]:+.2f}" for m in select)
    assert lines[at].endswith(f"(gains: {gains})") and lines[at + 1].startswith("- **Runner-up:**")
    html = (sweep_dir / "sweep.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "<th class=\"num\">gain chrf</th>" in html
    assert "Validation worst paired gain (rougeL, chrf, perplexity) per trial" in html


def test_no_feasible_trial_fails_closed_before_heldout(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """Every output counted as a loop: both trials break sweep.max_loop_share, the sweep exits 2 with
    one line, choice.json names no winner, and nothing is scored on held-out (no run folder)."""
    from harness.scoring import heldout_scoring

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(heldout_scoring.degeneration, "loops", lambda text: True)
    assert _sweep_cli(tmp_path, tiny_model_dir, ["generation.repetition_penalty=1.0,1.3"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("harness: error")]
    assert len(err) == 1 and "no trial meets the loop constraint (2 infeasible" in err[0]
    sweep_dir = _only(tmp_path / "sweeps")
    choice = _json(sweep_dir / "choice.json")
    assert choice["winner"] is None and choice["feasible"] == 0 and len(choice["infeasible"]) == 2
    assert not (tmp_path / "runs").exists()
    md = (sweep_dir / "sweep.md").read_text()
    assert "**No trial is feasible**" in md and md.count("no: tuned loop\\_share 1.000 &gt; sweep.max\\_loop\\_share 0.1") == 2


def test_grid_arguments_are_checked_before_any_work(tmp_path, capsys):
    cases = [
        (["--grid", "data.heldout_fraction=0.1,0.2"], "a sweep varies train.*, lora.* or generation.* keys only"),
        (["--grid", "train.lrr=1e-4,2e-4"], "train.lrr: unknown key (did you mean 'lr'?)"),
        (["--grid", "train.lr=1e-4,-1"], "train.lr: must be > 0"),
        (["--grid", "train.lr=1e-4,0.0001"], "--grid train.lr: value 0.0001 is listed twice"),
        (["--grid", "train.lr=1e-4", "--set", "train.lr=2e-4"], "--grid train.lr: given twice"),
        (["--grid", "lora.target_modules=q_proj"], "only single values"),
        (["--grid", "train.lr=1e-4,2e-4", "--set", "sweep.sampler=tpe", "--set", "sweep.n_trials=3"],
         "sweep.n_trials: 3 is more than the 2 combinations"),
        ([], "give at least one --grid"),
    ]
    for args, message in cases:
        assert main(["sweep", TASK, *args, "--sweeps-dir", str(tmp_path / "sweeps")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (args, err)
    assert not (tmp_path / "sweeps").exists()
    assert main(["sweep", "--resume", str(tmp_path), "--grid", "train.lr=1"]) == 2
    assert "give neither" in capsys.readouterr().err


# -- train.keep_best --------------------------------------------------------------------------
KEEP_BEST = ("train.keep_best=true", "train.save_steps=1", "train.max_steps=4", "train.eval_fraction=0.25",
             "train.lr=0.3")  # a learning rate this high makes the eval loss go up and down: best != last


def _train_keep_best(model_dir: Path, out: Path, resume_from: Path | None = None):
    from harness import models
    from harness.training.train import train

    spec = load_spec(TASK, tiny_overrides(model_dir, *KEEP_BEST))
    examples = prepare(spec).train
    device = devices.pick_device()
    tokenizer = models.load_tokenizer(str(model_dir), spec.model, uses_chat_template=True)
    model = models.load_model(str(model_dir), spec.model, tokenizer, device)
    return train(spec, model, tokenizer, examples, out, device, resume_from=resume_from)


@pytest.fixture(scope="module")
def keep_best_run(tiny_model_dir, tmp_path_factory):
    """One uninterrupted keep_best training (on CPU: the eval-loss course below is CPU's)."""
    previous = os.environ.get("HARNESS_DEVICE")
    os.environ["HARNESS_DEVICE"] = "cpu"
    try:
        out = tmp_path_factory.mktemp("keep-best")
        yield out, _train_keep_best(tiny_model_dir, out)
    finally:
        if previous is None:
            os.environ.pop("HARNESS_DEVICE", None)
        else:
            os.environ["HARNESS_DEVICE"] = previous


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _same(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_keep_best_restores_the_checkpoint_with_the_lowest_eval_loss(keep_best_run):
    out, result = keep_best_run
    evals = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    evals = {row["step"]: row["eval_loss"] for row in evals if "eval_loss" in row}
    assert sorted(evals) == [1, 2, 3, 4]
    best_step = min(evals, key=evals.get)
    assert best_step != 4, "the settings should make the last checkpoint not the best"
    assert result.steps == 4 and Path(result.best["checkpoint"]).name == f"checkpoint-{best_step}"
    assert result.best["eval_loss"] == pytest.approx(evals[best_step])
    adapter = _tensors(out / "adapter" / "adapter_model.safetensors")
    assert _same(adapter, _tensors(out / "checkpoints" / f"checkpoint-{best_step}" / "adapter_model.safetensors"))
    assert not _same(adapter, _tensors(out / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors"))


def test_keep_best_survives_an_interruption_and_resume(keep_best_run, tiny_model_dir, tmp_path, monkeypatch):
    """SIGTERM during step 3: checkpoint, stop; resuming runs step 4 and still ends on the best
    checkpoint, with the adapter equal to the uninterrupted run's (best tracking was restored)."""
    import trl

    from harness.training.interruptions import latest_checkpoint
    from harness.training.train import TrainingInterrupted

    reference_dir, reference = keep_best_run
    real_step = trl.SFTTrainer.training_step

    def training_step(self, *args, **kwargs):
        if self.state.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the harness's handler: checkpoint after this step, stop
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(trl.SFTTrainer, "training_step", training_step)
    with pytest.raises(TrainingInterrupted):
        _train_keep_best(tiny_model_dir, tmp_path)
    monkeypatch.setattr(trl.SFTTrainer, "training_step", real_step)
    checkpoint = latest_checkpoint(tmp_path / "checkpoints")
    assert checkpoint.name == "checkpoint-3"
    result = _train_keep_best(tiny_model_dir, tmp_path, resume_from=checkpoint)
    assert result.steps == 4 and Path(result.best["checkpoint"]).name == Path(reference.best["checkpoint"]).name
    assert _same(_tensors(tmp_path / "adapter" / "adapter_model.safetensors"),
                 _tensors(reference_dir / "adapter" / "adapter_model.safetensors"))
