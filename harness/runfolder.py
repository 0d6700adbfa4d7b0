"""Run folders: `runs/<run-id>/` holds everything one run produced, plus its manifest.

A run id is created with an exclusive mkdir, so two runs started at once never share a
folder. The manifest is rewritten atomically after every stage, so a killed run still says
how far it got.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import secrets
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import yaml

from harness import distributed
from harness.errors import RunError
from harness.io import atomic_write_json, os_error_message
from harness.spec import TaskSpec, build

PACKAGES = ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes", "liger-kernel",
            "rouge-score", "sacrebleu", "pandas", "matplotlib", "numpy", "harness")
MANIFEST = "manifest.json"
SPEC_FILE = "spec.yaml"  # the resolved spec the run ran with (paths absolute)
ADAPTER_DIR = "adapter"  # the trained LoRA adapter
CANDIDATES_DIR = "candidates"  # an eval run's scored candidates, one folder each


def trained_adapter(run_dir: Path) -> Path:
    """The run's trained adapter folder; a run that has not trained yet is a one-line RunError."""
    adapter_dir = Path(run_dir) / ADAPTER_DIR
    if not (adapter_dir / "adapter_config.json").is_file():
        raise RunError(f"{run_dir}: no trained adapter in {ADAPTER_DIR}/ (unfinished run? finish it with "
                       f"`harness run --resume {run_dir}`)")
    return adapter_dir


def new_run_dir(runs_root: Path, task: str) -> Path:
    try:
        runs_root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a parent is a file, read-only, disk full: one line, not a traceback
        raise RunError(os_error_message(runs_root, exc, "create")) from None
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    for _ in range(10):
        folder = runs_root / f"{task}-{stamp}-{secrets.token_hex(2)}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
        except OSError as exc:
            raise RunError(os_error_message(folder, exc, "create")) from None
    raise RunError(f"cannot find a free run folder name under {runs_root}")


def package_versions(names=PACKAGES) -> dict[str, str | None]:
    """Installed version of each package (None when it is not installed)."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment() -> dict:
    return {"python": sys.version.split()[0], "platform": platform.platform(), "packages": package_versions(),
            "git_commit": git_commit()}


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after "pid (comm)": [0] is the state, [19] the start time (Linux)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return None


def process_start(pid: int) -> str | None:
    """When `pid` started (clock ticks since boot), so a recycled pid is not taken for the run's."""
    fields = _proc_stat(pid)
    return fields[19] if fields and len(fields) > 19 else None


def pid_alive(pid, started: str | None = None) -> bool:
    """Whether the process that wrote a manifest (`pid`, started at `started`) still runs on this host.

    Our own pid never counts (a recycled pid in a restarted container may be ours)."""
    if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    fields = _proc_stat(pid)
    if not fields:
        return True  # no /proc: trust os.kill
    if fields[0] == "Z":  # killed, not yet reaped
        return False
    return started is None or len(fields) <= 19 or fields[19] == started


def read_manifest(run_dir: Path) -> dict:
    path = Path(run_dir) / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"{path}: not a run folder (no manifest.json)") from None
    except (OSError, ValueError) as exc:
        raise RunError(f"{path}: unreadable manifest ({exc})") from None


class Manifest:
    """The run's manifest, persisted on every change (by rank 0 alone when several processes run)."""

    def __init__(self, run_dir: Path, data: dict):
        self.run_dir = Path(run_dir)
        self.data = data

    @classmethod
    def create(cls, run_dir: Path, task: str) -> "Manifest":
        manifest = cls(run_dir, {"run_id": Path(run_dir).name, "task": task, "status": "running",
                                 "pid": os.getpid(), "pid_started": process_start(os.getpid()),
                                 "started_at": _now(), "timings_s": {}, **environment()})
        manifest.save()
        return manifest

    @classmethod
    def load(cls, run_dir: Path) -> "Manifest":
        return cls(run_dir, read_manifest(run_dir))

    def update(self, **fields) -> None:
        self.data.update(fields)
        self.save()

    def timing(self, stage: str, seconds: float) -> None:
        self.data.setdefault("timings_s", {})[stage] = round(seconds, 3)
        self.save()

    def save(self) -> None:
        self.data["updated_at"] = _now()
        if not distributed.is_main():
            return
        atomic_write_json(self.run_dir / MANIFEST, self.data)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def load_run_spec(run_dir: Path) -> TaskSpec:
    """The resolved spec a run recorded (paths absolute), loaded through the same checks."""
    path = Path(run_dir) / SPEC_FILE
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError:
        raise RunError(f"{path}: missing; not a run folder") from None
    except yaml.YAMLError:
        raise RunError(f"{path}: damaged (not valid YAML)") from None
    spec = build(TaskSpec, raw, "")
    spec.base_dir = "/"
    return spec
