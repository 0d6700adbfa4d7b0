"""Interrupted runs resume where they stopped (issue 6, items 3 and 4).

Training is interrupted for real, in a subprocess, with SIGTERM (checkpoint, then stop) and
with SIGKILL (no warning at all), then resumed with `run --resume` and compared with an
uninterrupted run of the same spec (the shared `tiny_run`: 4 steps, a checkpoint every 2).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from harness.cli import main
from harness.runfolder import pid_alive, process_start
from tests.conftest import REPO, tiny_overrides

pytestmark = pytest.mark.slow
TASK = str(REPO / "tasks" / "amazon_desc.yaml")
WAIT_S = 180  # every wait is bounded; a healthy run needs a fraction of this

# `python -c` body: the harness CLI with every training step slowed by argv[1] seconds, so a test
# can reliably signal the process between checkpoint-2 and the end of training (tiny steps are ms).
SLOW_CLI = textwrap.dedent("""
    import sys, time
    import trl
    _step = trl.SFTTrainer.training_step
    def training_step(self, *args, **kwargs):
        time.sleep(float(sys.argv[1]))
        return _step(self, *args, **kwargs)
    trl.SFTTrainer.training_step = training_step
    from harness.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def _start_slow_run(tmp_path: Path, model_dir: Path, tiny_run: Path, step_delay: float):
    sets = [x for o in tiny_overrides(model_dir) for x in ("--set", o)]
    # tiny_run's base-score cache (conftest puts it next to its runs/): the base side is a cache hit.
    env = {"HARNESS_SCORE_CACHE": str(tiny_run.parents[1] / "score-cache"), "HARNESS_DEVICE": "cpu",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PATH": "/usr/bin:/bin",
           "PYTHONPATH": str(REPO)}  # this checkout's harness, not whichever one is installed
    log = open(tmp_path / "run.log", "wb")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CLI, str(step_delay), "run", TASK,
                             "--runs-dir", str(tmp_path / "runs"), *sets],
                            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return proc, tmp_path / "run.log"


def _wait_for_checkpoint(proc: subprocess.Popen, runs: Path, log: Path, step: int = 2) -> Path:
    """The run folder, once checkpoint-<step> is complete (its trainer_state.json parses)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        for state in runs.glob(f"*/checkpoints/checkpoint-{step}/trainer_state.json"):
            try:
                json.loads(state.read_text())
                return state.parents[2]
            except ValueError:
                pass  # still being written
        if proc.poll() is not None:
            pytest.fail(f"run exited ({proc.returncode}) before checkpoint-{step}:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    proc.wait(timeout=30)
    pytest.fail(f"no checkpoint-{step} within {WAIT_S}s:\n{log.read_text()[-3000:]}")


def _resume(run_dir: Path) -> int:
    return main(["-q", "run", "--resume", str(run_dir)])


def test_sigterm_saves_a_checkpoint_and_resume_gives_the_same_adapter(tmp_path, tiny_model_dir, tiny_run,
                                                                      monkeypatch):
    """SIGTERM mid-training: exit 130, manifest `interrupted` with its last checkpoint; `--resume`
    finishes from it and the adapter is byte-identical (same sha256 of adapter_model.safetensors)
    to the uninterrupted run's. Exact equality holds because the Trainer restores model, optimizer,
    scheduler, data order and the RNG (LoRA dropout) state from the checkpoint, on one CPU setup."""
    monkeypatch.chdir(tmp_path)
    proc, log = _start_slow_run(tmp_path, tiny_model_dir, tiny_run, step_delay=1.0)
    run_dir = _wait_for_checkpoint(proc, tmp_path / "runs", log)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=WAIT_S) == 130, log.read_text()[-3000:]

    manifest = _manifest(run_dir)
    assert manifest["status"] == "interrupted"
    assert manifest["stages_done"] == ["prepare", "score_base"]
    checkpoint = Path(manifest["last_checkpoint"])
    assert checkpoint.parent == run_dir / "checkpoints" and (checkpoint / "trainer_state.json").is_file()
    assert 2 <= int(checkpoint.name.split("-")[1]) < 4, "the signal should stop training before its end"
    assert not (run_dir / "adapter").exists()

    assert _resume(run_dir) == 0
    manifest = _manifest(run_dir)
    assert manifest["status"] == "completed" and manifest["train"]["resumed_from"] == str(checkpoint)
    assert manifest["train"]["steps"] == 4
    assert _sha256(run_dir / "adapter" / "adapter_model.safetensors") == \
        _sha256(tiny_run / "adapter" / "adapter_model.safetensors")


def test_sigkill_leaves_running_with_a_dead_pid_and_resume_still_works(tmp_path, tiny_model_dir, tiny_run,
                                                                       monkeypatch):
    """kill -9 after checkpoint-2: the manifest still says `running` with a pid that is gone;
    `--resume` accepts it, continues from checkpoint-2, ends with the byte-identical adapter, and
    the loss log has each step once (rows the killed process logged past the checkpoint dropped)."""
    monkeypatch.chdir(tmp_path)
    proc, log = _start_slow_run(tmp_path, tiny_model_dir, tiny_run, step_delay=1.0)
    run_dir = _wait_for_checkpoint(proc, tmp_path / "runs", log)
    time.sleep(0.3)  # inside step 3's training_step
    proc.kill()
    assert proc.wait(timeout=60) == -signal.SIGKILL

    manifest = _manifest(run_dir)
    assert manifest["status"] == "running" and manifest["pid"] == proc.pid
    assert not pid_alive(manifest["pid"], manifest.get("pid_started"))

    assert _resume(run_dir) == 0
    manifest = _manifest(run_dir)
    assert manifest["status"] == "completed"
    assert Path(manifest["train"]["resumed_from"]).name == "checkpoint-2"
    assert _sha256(run_dir / "adapter" / "adapter_model.safetensors") == \
        _sha256(tiny_run / "adapter" / "adapter_model.safetensors")
    rows = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]


def test_resume_refuses_a_run_whose_process_is_alive(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        manifest = {"status": "running", "pid": sleeper.pid, "pid_started": process_start(sleeper.pid)}
        (run_dir / "manifest.json").write_text(json.dumps(manifest))
        assert _resume(run_dir) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"harness: error: {run_dir}: run is still in progress (pid {sleeper.pid} is alive); "
                       "stop it or wait, then resume"]
        assert json.loads((run_dir / "manifest.json").read_text()) == manifest  # untouched
        assert not pid_alive(sleeper.pid, "1")  # same pid, other start time: a recycled pid
    finally:
        sleeper.kill()
        sleeper.wait(timeout=30)
    assert not pid_alive(sleeper.pid, manifest["pid_started"])


def test_resume_does_not_regenerate_scored_predictions(tmp_path, tiny_run, monkeypatch):
    """Scoring killed mid-way: 3 tuned generations on disk plus a torn half line. `--resume` generates
    only the 5 missing prompts (counted by wrapping `generate`) and ends with all 8, each once."""
    from harness.scoring import heldout_scoring as scoring

    run_dir = shutil.copytree(tiny_run, tmp_path / tiny_run.name)
    gens = run_dir / "scores" / "tuned_generations.jsonl"
    lines = gens.read_text().splitlines()
    assert len(lines) == 8
    gens.write_text("\n".join(lines[:3]) + "\n" + lines[3][: len(lines[3]) // 2])
    manifest = _manifest(run_dir)
    manifest.update(status="interrupted", stages_done=["prepare", "score_base", "train"])
    (run_dir / "manifest.json").write_text(json.dumps(manifest))

    calls = []
    real = scoring.generate

    def counting(model, tokenizer, prompts, *args, **kwargs):
        calls.append(len(prompts))
        return real(model, tokenizer, prompts, *args, **kwargs)

    monkeypatch.setattr(scoring, "generate", counting)
    monkeypatch.chdir(tmp_path)
    assert _resume(run_dir) == 0
    assert calls == [5]
    rows = [json.loads(line) for line in gens.read_text().splitlines()]
    assert len(rows) == 8 and len({r["id"] for r in rows}) == 8
    assert gens.read_text().splitlines()[:3] == lines[:3]
    assert _manifest(run_dir)["status"] == "completed"
    assert len((run_dir / "predictions.jsonl").read_text().splitlines()) == 8


def test_sigint_and_sigterm_both_ask_for_checkpoint_then_stop_and_a_second_one_aborts():
    """The subprocess tests send SIGTERM; SIGINT (Ctrl-C) goes through the same handler. The stop
    goes through the accelerator's trigger, which every process of a several-process run checks."""
    import os
    import types

    from accelerate import Accelerator

    from harness.training.interruptions import signals_to, StopOnSignal

    accelerator = Accelerator(cpu=True)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for signum in (signal.SIGINT, signal.SIGTERM):
        stopper = StopOnSignal()
        control = types.SimpleNamespace(should_save=False, should_training_stop=False)
        with signals_to(stopper):
            stopper.callback(accelerator).on_step_end(None, None, control)
            assert not control.should_save and not control.should_training_stop
            os.kill(os.getpid(), signum)
            time.sleep(0.05)  # the handler runs in the main thread at the next bytecode
            assert stopper.received == signum
            stopper.callback(accelerator).on_step_end(None, None, control)
            assert control.should_save and control.should_training_stop
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signum)
                time.sleep(0.05)
    assert {s: signal.getsignal(s) for s in before} == before
