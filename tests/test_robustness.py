"""Robustness (issue 6, items 5-7): atomic outputs, untrusted content, unwritable or full disks.

In-process checks through `harness.cli.main` (which returns the exit code). Failures are
provoked by monkeypatching, never by filling a real disk or touching the network.
"""

from __future__ import annotations

import datetime
import errno
import itertools
import json
import re
import shutil
import socket
import threading
import types
from pathlib import Path

import pytest

from harness import devices, models, runfolder
from harness.cli import main
from harness.errors import ModelError, RunError
from harness.io import atomic_write_json
from harness.models import base_files
from harness.runfolder import Manifest, new_run_dir
from tests.conftest import REPO, TINY_OVERRIDES, tiny_overrides

TASK = str(REPO / "tasks" / "amazon_desc.yaml")
CPU = devices.Device("cpu")


def _run_args(runs_dir: Path, overrides: list[str]) -> list[str]:
    return ["run", TASK, "--runs-dir", str(runs_dir), *[x for o in overrides for x in ("--set", o)]]


def _one_error_line(capsys) -> str:
    """The single `harness: error:` line on stderr (log lines may be there too; a traceback may not)."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("harness: error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    return errors[0]


def _enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


# --- item 5: atomic outputs ------------------------------------------------------------------

def test_a_failed_write_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    atomic_write_json(target, {"rougeL": 1.0})
    before = target.read_bytes()

    with monkeypatch.context() as m:  # the rename fails (disk full at the last moment)
        m.setattr("harness.io.os.replace", _enospc)
        with pytest.raises(RunError, match=r"metrics\.json: disk full"):
            atomic_write_json(target, {"rougeL": 2.0})
    with monkeypatch.context() as m:  # the process dies mid-write (Ctrl-C while fsyncing)
        m.setattr("harness.io.os.fsync", lambda fd: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            atomic_write_json(target, {"rougeL": 3.0})
    with monkeypatch.context() as m:  # serialising fails
        m.setattr("harness.io.json.dumps", lambda *a, **k: (_ for _ in ()).throw(TypeError("not JSON")))
        with pytest.raises(TypeError):
            atomic_write_json(target, {"rougeL": 4.0})
    with pytest.raises(ValueError):  # NaN is refused before any file is touched
        atomic_write_json(target, {"rougeL": float("nan")})
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temp file left behind


def test_a_failed_manifest_update_keeps_the_last_good_manifest(tmp_path, monkeypatch):
    manifest = Manifest.create(tmp_path, "task")
    manifest.update(stages_done=["prepare"])
    with monkeypatch.context() as m:
        m.setattr("harness.io.os.replace", _enospc)
        with pytest.raises(RunError, match="manifest.json: disk full"):
            manifest.update(stages_done=["prepare", "score_base"])
    assert json.loads((tmp_path / "manifest.json").read_text())["stages_done"] == ["prepare"]


def test_a_failed_report_or_baseline_write_keeps_the_previous_one(tiny_run, tmp_path, monkeypatch):
    from harness.recipes.check import write_baseline
    from harness.reporting.report import write_reports

    baseline = write_baseline(tiny_run, tmp_path / "baseline.json")
    run_dir = shutil.copytree(tiny_run, tmp_path / "run")
    files = [run_dir / "report.html", run_dir / "report.md", Path(baseline)]
    before = [f.read_bytes() for f in files]
    monkeypatch.setattr("harness.io.os.replace", _enospc)
    with pytest.raises(RunError, match="disk full"):
        write_reports([run_dir], run_dir)
    with pytest.raises(RunError, match="disk full"):
        write_baseline(tiny_run, baseline)
    assert [f.read_bytes() for f in files] == before


def test_run_folder_writers_go_through_atomic_writes():
    """Every artifact writer in these modules uses harness.io (append-only logs excepted)."""
    direct = re.compile(r"\.write_text\(|\.write_bytes\(|json\.dump\(|open\([^)]*[\"'][wx]b?[\"']")
    for name in ("recipes/run.py", "runfolder.py", "reporting/report.py", "recipes/check.py"):
        path = REPO / "harness" / name
        if path.is_file():
            hits = [line.strip() for line in path.read_text().splitlines() if direct.search(line)]
            assert hits == [], f"{name}: non-atomic write(s): {hits}"


def test_runs_started_in_the_same_second_get_distinct_folders(tmp_path, monkeypatch):
    """32 threads, one frozen clock, and a random suffix that repeats every name twice: the exclusive
    mkdir makes each thread take a folder nobody else has."""
    frozen = datetime.datetime(2026, 1, 2, 3, 4, 5)

    class Clock(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return frozen

    counter, lock = itertools.count(), threading.Lock()

    def colliding_token(_n):
        with lock:
            return f"{next(counter) // 2:04x}"

    monkeypatch.setattr(runfolder, "_dt", types.SimpleNamespace(datetime=Clock, timezone=datetime.timezone))
    monkeypatch.setattr(runfolder.secrets, "token_hex", colliding_token)
    barrier = threading.Barrier(32)
    made, errors = [], []

    def start():
        barrier.wait(timeout=30)
        try:
            made.append(new_run_dir(tmp_path / "runs", "task"))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == [] and len(made) == 32 and len(set(made)) == 32
    assert all(p.is_dir() and p.name.startswith("task-20260102-030405-") for p in made)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(p.name for p in made)


# --- item 6: untrusted content ---------------------------------------------------------------

def _pickle_copy(src: Path, dst: Path, weights: str, pickle_name: str) -> Path:
    import torch
    from safetensors.torch import load_file

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_file(src / weights), dst / pickle_name)
    return dst


def test_pickle_base_model_is_refused_unless_allowed(tiny_model_dir, tmp_path, capsys):
    import torch

    from harness.spec import ModelSpec

    folder = _pickle_copy(tiny_model_dir, tmp_path / "bin-model", "model.safetensors", "pytorch_model.bin")
    tokenizer = models.load_tokenizer(str(folder), ModelSpec(), uses_chat_template=True)
    with pytest.raises(ModelError, match=r"only pickle weights \(\.bin\); refusing.*model\.allow_pickle: true"):
        models.load_model(str(folder), ModelSpec(), tokenizer, CPU)
    trusted = models.load_model(str(folder), ModelSpec(allow_pickle=True), tokenizer, CPU)
    reference = models.load_model(str(tiny_model_dir), ModelSpec(), tokenizer, CPU)
    assert all(torch.equal(a, b) for a, b in zip(trusted.state_dict().values(), reference.state_dict().values()))

    code = main(_run_args(tmp_path / "runs", [*TINY_OVERRIDES, f"model.base={folder}"]))
    assert code == 2 and "refusing to load them" in _one_error_line(capsys)


def test_pickle_adapter_is_refused_unless_allowed(tiny_model_dir, tiny_run, tmp_path):
    import torch

    from harness.spec import ModelSpec

    adapter = _pickle_copy(tiny_run / "adapter", tmp_path / "bin-adapter", "adapter_model.safetensors",
                           "adapter_model.bin")
    tokenizer = models.load_tokenizer(str(tiny_model_dir), ModelSpec(), uses_chat_template=True)
    base = models.load_model(str(tiny_model_dir), ModelSpec(), tokenizer, CPU)
    with pytest.raises(ModelError, match=r"adapter has only pickle weights"):
        models.load_adapter(base, adapter)
    loaded = models.load_adapter(base, adapter, allow_pickle=True)
    lora = {k: v for k, v in loaded.state_dict().items() if "lora_" in k}
    assert lora and all(torch.count_nonzero(v) for k, v in lora.items() if "lora_B" in k)


def test_trust_remote_code_is_off_unless_the_spec_sets_it(tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from harness.spec import load_spec

    seen = []

    def recording(cls):
        real = cls.from_pretrained

        def from_pretrained(*args, **kwargs):
            seen.append((cls.__name__, kwargs.get("trust_remote_code", "MISSING")))
            return real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", from_pretrained)

    recording(AutoTokenizer)
    recording(AutoModelForCausalLM)
    for extra, expected in (((), False), (("model.trust_remote_code=true",), True)):
        seen.clear()
        spec = load_spec(TASK, tiny_overrides(tiny_model_dir, *extra))
        tokenizer = models.load_tokenizer(str(tiny_model_dir), spec.model, uses_chat_template=True)
        models.load_model(str(tiny_model_dir), spec.model, tokenizer, CPU)
        assert seen == [("AutoTokenizer", expected), ("AutoModelForCausalLM", expected)]


def test_offline_hub_id_that_is_not_cached_is_one_line_and_no_network(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants as hub

    attempts = []

    def no_network(sock, address, *args):
        attempts.append(address)
        raise OSError(errno.ENETUNREACH, "network is off in this test")

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)  # read once at import; HF_HUB_OFFLINE=1 is set too
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", no_network)
    missing = "harness-test/model-that-is-not-cached"
    with pytest.raises(ModelError, match=f"'{missing}' is not in the local Hugging Face cache"):
        base_files.resolve_base(missing)
    code = main(_run_args(tmp_path / "runs", [*TINY_OVERRIDES, f"model.base={missing}"]))
    assert code == 2
    line = _one_error_line(capsys)
    assert missing in line and "HF_HUB_OFFLINE" in line
    assert attempts == []


# --- item 7: unwritable runs folder, full disk, out of memory -------------------------------

def test_runs_dir_that_cannot_be_created_is_one_line_exit_2(tmp_path, capsys):
    """Tests run as root, where chmod does not stop writes; a path under a regular file does (ENOTDIR)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    code = main(_run_args(blocker / "runs", TINY_OVERRIDES))
    assert code == 2
    assert _one_error_line(capsys) == f"harness: error: cannot create {blocker / 'runs'}: a parent is not a folder"
    code = main(["prepare", TASK, "--runs-dir", str(blocker)])
    assert code == 2 and f"cannot create {blocker}" in _one_error_line(capsys)


def test_disk_full_while_starting_a_run_is_one_line_exit_2(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("harness.io.os.fsync", _enospc)
    code = main(_run_args(tmp_path / "runs", tiny_overrides(tiny_model_dir)))
    assert code == 2
    assert re.fullmatch(r"harness: error: cannot write .*/spec\.yaml: disk full", _one_error_line(capsys))


@pytest.mark.parametrize("error, words", [
    (OSError(errno.ENOSPC, "No space left on device", "/runs/x/scores/base_generations.jsonl"),
     "cannot write /runs/x/scores/base_generations.jsonl: disk full"),
    (MemoryError(), "out of memory"),
])
def test_disk_full_or_out_of_memory_inside_a_stage_is_one_line_exit_2(tiny_model_dir, tmp_path, monkeypatch,
                                                                      capsys, error, words):
    """A plain OSError(ENOSPC) from an append-only writer (not harness.io) or a MemoryError in any
    stage: the run is marked failed with the same one line, and the CLI exits 2 without a traceback."""
    def fail(self):
        raise error

    monkeypatch.setattr("harness.scoring.heldout_scoring.ScoringSession.score_base", fail)
    monkeypatch.chdir(tmp_path)
    code = main(_run_args(tmp_path / "runs", tiny_overrides(tiny_model_dir)))
    assert code == 2
    line = _one_error_line(capsys)
    assert words in line
    (run_dir,) = (tmp_path / "runs").iterdir()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "failed" and words in manifest["error"]


def test_a_fast_path_switch_this_machine_cannot_run_fails_before_any_work(tiny_model_dir, tmp_path, capsys):
    code = main(_run_args(tmp_path / "runs", tiny_overrides(tiny_model_dir, "train.attention=varlen")))
    assert code == 2 and "train.attention: 'varlen' needs a CUDA device" in _one_error_line(capsys)
    (manifest_path,) = (tmp_path / "runs").glob("*/manifest.json")
    manifest = json.loads(manifest_path.read_text())
    assert manifest["status"] == "failed" and not manifest.get("stages_done")
