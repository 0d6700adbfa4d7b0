"""Several processes on the CPU: data-parallel training and sharded scoring (issue 16, item 4).

Two processes talk over gloo (HARNESS_DEVICE=cpu), started the two documented ways: `run --gpus 2`
(which relaunches through torchrun) and `torchrun --nproc_per_node 2 -m harness ...`. Training must
finish with an adapter that loads in this one process; sharded scoring (`eval`, `check`) must give
byte-identical predictions and equal metrics to one process, because each process decodes whole
batches of the one-process plan. The rules behind that (`shard_batches`, `unshard`, `main_only`,
part files) are unit-tested here without processes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from harness import devices, distributed
from harness.cli import main
from harness.scoring.generation import length_sorted_batches
from tests.conftest import REPO, tiny_overrides

TASK = str(REPO / "tasks" / "amazon_desc.yaml")
WAIT_S = 300  # bounded; two tiny processes need a fraction of this
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


# -- the rules, in one process ---------------------------------------------------------------------
def _as_rank(monkeypatch, rank: int, world: int) -> None:
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))


@pytest.mark.parametrize("world", [2, 3, 5])
def test_whole_batches_shard_into_the_same_batches_on_every_rank(monkeypatch, world):
    """Every index goes to exactly one rank, and the length-sorted plan of a rank's share is exactly the
    batches it was given (ties in length included): what makes outputs independent of the world size."""
    rng = random.Random(world)
    lengths = [rng.randint(3, 9) for _ in range(47)]  # many equal lengths: ties must keep their order
    plan = list(length_sorted_batches(lengths, 4))
    seen = []
    for rank in range(world):
        _as_rank(monkeypatch, rank, world)
        mine = distributed.shard_batches(plan)
        seen += mine
        replanned = [[mine[j] for j in batch] for batch in length_sorted_batches([lengths[i] for i in mine], 4)]
        assert replanned == plan[rank::world]
    assert sorted(seen) == list(range(len(lengths)))


def test_unshard_puts_values_back_in_place_and_refuses_gaps():
    assert distributed.unshard([2, 0, 1], ["c", "a", "b"], 3) == ["a", "b", "c"]
    with pytest.raises(RuntimeError, match="covers 2 of 3"):
        distributed.unshard([2, 0], ["c", "a"], 3)


def test_only_rank_zero_writes_the_manifest(tmp_path, monkeypatch):
    from harness.runfolder import Manifest, read_manifest

    manifest = Manifest.create(tmp_path, "demo")
    _as_rank(monkeypatch, 1, 2)
    manifest.update(status="failed")
    assert manifest.data["status"] == "failed" and read_manifest(tmp_path)["status"] == "running"


def test_rank_part_files_fold_into_the_side_file_once(tmp_path, monkeypatch):
    """Each process appends its share to its own part file; rank 0 folds them in (a torn last line
    dropped, rows already there not repeated) and removes them."""
    from harness.scoring.heldout_scoring import fold_rank_parts, read_generations

    def row(i: int) -> str:
        return json.dumps({"id": f"e{i}", "text": f"t{i}", "n_tokens": 1, "hit_max_new_tokens": False})

    side = tmp_path / "tuned_generations.jsonl"
    side.write_text(row(0) + "\n" + row(1)[:9])  # a kill tore its last line
    _as_rank(monkeypatch, 1, 2)
    assert distributed.part_path(side).name == "tuned_generations.rank1.jsonl"
    (tmp_path / "tuned_generations.rank0.jsonl").write_text(row(0) + "\n" + row(2) + "\n")
    distributed.part_path(side).write_text(row(1) + "\n" + row(3) + "\n" + row(4)[:7])
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    fold_rank_parts(side)
    assert sorted(read_generations(side)) == ["e0", "e1", "e2", "e3"]
    assert len(side.read_text().splitlines()) == 4 and not distributed.rank_parts(side)


def test_the_launchers_echo_of_ctrl_c_does_not_abort_the_checkpoint(monkeypatch):
    """torchrun passes the terminal's Ctrl-C on to processes that got it already: that echo must not
    count as the second signal that aborts without a checkpoint; a later one still does."""
    import signal

    from harness.training.interruptions import StopOnSignal

    _as_rank(monkeypatch, 0, 2)
    stopper = StopOnSignal()
    stopper.handler(signal.SIGINT, None)
    stopper.handler(signal.SIGINT, None)
    assert stopper.received == signal.SIGINT
    stopper.at -= stopper.LAUNCHER_ECHO_S
    with pytest.raises(KeyboardInterrupt):
        stopper.handler(signal.SIGINT, None)


def test_launcher_misuse_is_one_line(monkeypatch, capsys, tmp_path):
    """Commands that run in one process refuse a launcher; --gpus needs GPUs (or HARNESS_DEVICE=cpu)
    and cannot be mixed with a launcher of another size."""
    _as_rank(monkeypatch, 0, 2)
    monkeypatch.setattr(distributed, "init", lambda: None)  # no launcher here to join
    assert main(["report", str(tmp_path)]) == 2
    assert "report: runs in one process" in capsys.readouterr().err
    assert main(["run", TASK, "--gpus", "4"]) == 2
    assert "the launcher started 2 processes" in capsys.readouterr().err
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("HARNESS_DEVICE")
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["run", TASK, "--gpus", "2"]) == 2
    assert "--gpus 2: no CUDA device here" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["run", TASK, "--gpus", "0"])
    assert exit_.value.code == 2


# -- two real processes -----------------------------------------------------------------------------
def _launch(command: list[str], cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), "PYTHONPATH": str(REPO),
           "HARNESS_SCORE_CACHE": str(cache), "HARNESS_DEVICE": "cpu", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=WAIT_S)
    assert done.returncode in (0, 1), f"exit {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done


def _sets(model_dir: Path, *extra: str) -> list[str]:
    return [x for o in tiny_overrides(model_dir, *extra) for x in ("--set", o)]


@contextmanager
def _one_thread():
    """One torch thread, as torchrun gives each process: the same float summation order."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def two_process_run(tiny_model_dir, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """`harness run --gpus 2` of the tiny spec: two gloo processes under torchrun."""
    root = tmp_path_factory.mktemp("ddp-run")
    done = _launch([sys.executable, "-m", "harness", "run", TASK, "--gpus", "2", "--runs-dir", str(root / "runs"),
                    *_sets(tiny_model_dir)], root, root / "score-cache")
    assert done.returncode == 0, done.stderr[-4000:]
    (run_dir,) = (root / "runs").iterdir()  # rank 0 made the one run folder, the other used it
    return run_dir, done


@pytest.mark.slow
def test_two_processes_train_data_parallel_and_rank_zero_writes(two_process_run, tiny_run):
    from harness import models
    from harness.recipes.run import load_base_tokenizer
    from harness.runfolder import load_run_spec
    from harness.scoring.heldout_scoring import assert_adapter_applied

    run_dir, done = two_process_run
    assert done.stdout.count("run folder:") == 1  # the summary comes from rank 0 only
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["world_size"] == 2
    assert manifest["train"]["steps"] == 4 and manifest["train"]["global_batch"] == 4 * 2 * 1
    steps = [json.loads(line)["step"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4]  # one writer: no row twice
    assert sorted(p.name for p in (run_dir / "scores").iterdir()) == \
        ["base_generations.jsonl", "base_nll.json", "tuned_generations.jsonl", "tuned_nll.json"]
    assert len((run_dir / "predictions.jsonl").read_text().splitlines()) == 8

    # The adapter is the one-process format and loads here, in one CPU process, where it changes the logits.
    assert sorted(p.name for p in (run_dir / "adapter").iterdir()) == \
        sorted(p.name for p in (tiny_run / "adapter").iterdir())
    spec = load_run_spec(run_dir)
    model_ref, tokenizer = load_base_tokenizer(spec)
    device = devices.pick_device()
    model = models.load_adapter(models.load_model(model_ref, spec.model, tokenizer, device), run_dir / "adapter")
    assert assert_adapter_applied(model, tokenizer, ["Steel water bottle", "Cotton shirt"], device) > 0


@pytest.mark.slow
def test_sharded_eval_gives_the_one_process_predictions_and_metrics(two_process_run, tiny_run, tiny_model_dir,
                                                                   tmp_path, monkeypatch):
    """`torchrun ... eval` of two candidates (base, each candidate and the comparison, all sharded)
    against the same eval in this one process: byte-identical predictions and scores, equal metrics."""
    from harness.recipes.eval import eval_task
    from harness.scoring.heldout_scoring import read_generations

    run_dir, _ = two_process_run
    adapters = ["--adapter", str(run_dir), "--adapter", str(tiny_run)]
    _launch([*TORCHRUN, "-m", "harness", "-q", "eval", TASK, *adapters, "--runs-dir", str(tmp_path / "two"),
             *_sets(tiny_model_dir)], tmp_path, tmp_path / "cache-two")
    (two,) = (tmp_path / "two").iterdir()

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HARNESS_SCORE_CACHE", str(tmp_path / "cache-one"))  # no cache hit: score the base too
    with _one_thread():
        one = eval_task(TASK, [run_dir, tiny_run], tiny_overrides(tiny_model_dir), tmp_path / "one")

    assert json.loads((two / "manifest.json").read_text())["world_size"] == 2
    for name in ("predictions.jsonl", "scores/base_nll.json"):
        assert (two / name).read_bytes() == (one / name).read_bytes(), name
    # Rows of a generations file are read by id; several processes append them in another order.
    assert read_generations(two / "scores/base_generations.jsonl") == \
        read_generations(one / "scores/base_generations.jsonl")
    assert json.loads((two / "metrics.json").read_text()) == json.loads((one / "metrics.json").read_text())
    for candidate in (one / "candidates").iterdir():
        for name in ("predictions.jsonl", "metrics.json", "scores/tuned_nll.json"):
            assert (two / "candidates" / candidate.name / name).read_bytes() == (candidate / name).read_bytes()


@pytest.mark.slow
def test_sharded_check_gives_the_one_process_verdict(two_process_run, tiny_run, tiny_model_dir, tmp_path):
    """`check` scores the candidate adapter with the same sharded path: the same verdict, rule by rule."""
    from harness.recipes.check import run_check

    run_dir, _ = two_process_run
    args = ["--candidate", str(run_dir / "adapter"), "--baseline", str(tiny_run)]
    _launch([*TORCHRUN, "-m", "harness", "-q", "check", TASK, *args, "--out", str(tmp_path / "two"),
             *_sets(tiny_model_dir)], tmp_path, tmp_path / "cache")
    with _one_thread():
        run_check(TASK, run_dir / "adapter", tiny_run, tmp_path / "one", tiny_overrides(tiny_model_dir))
    two = json.loads((tmp_path / "two" / "verdict.json").read_text())
    one = json.loads((tmp_path / "one" / "verdict.json").read_text())
    assert two["sources"]["candidate"].startswith("scored ") and two == one


@pytest.mark.slow
def test_resume_under_two_processes_continues_from_the_checkpoint(two_process_run, tiny_model_dir, tmp_path):
    """A run stopped after checkpoint-2 resumes under two processes: training continues from the
    checkpoint (model, optimizer, data order and each rank's RNG restored) to the same adapter."""
    run_dir, _ = two_process_run
    copy = tmp_path / "runs" / run_dir.name
    shutil.copytree(run_dir, copy)
    for name in ("adapter", "checkpoints/checkpoint-4", "scores/tuned_generations.jsonl", "scores/tuned_nll.json",
                 "metrics.json", "predictions.jsonl"):
        shutil.rmtree(copy / name) if (copy / name).is_dir() else (copy / name).unlink()
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest.update(status="interrupted", stages_done=["prepare", "score_base"])
    (copy / "manifest.json").write_text(json.dumps(manifest))

    _launch([sys.executable, "-m", "harness", "-q", "run", "--resume", str(copy), "--gpus", "2"], tmp_path,
            tmp_path / "cache")
    manifest = json.loads((copy / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["world_size"] == 2
    assert Path(manifest["train"]["resumed_from"]).name == "checkpoint-2" and manifest["train"]["steps"] == 4
    assert (copy / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()


@pytest.mark.slow
def test_a_failure_on_rank_zero_reaches_the_others_and_is_told_once(two_process_run, tmp_path):
    """Rank 0 refuses to resume a completed run while the others wait for the run folder: they fail with
    it instead of waiting forever, and the error is printed once (by rank 0), in one line."""
    run_dir, _ = two_process_run
    done = _launch([*TORCHRUN, "-m", "harness", "run", "--resume", str(run_dir)], tmp_path, tmp_path / "cache")
    assert done.returncode == 1  # torchrun's code for any failed process
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert errors == [f"harness: error: {run_dir}: run already completed; nothing to resume"]
