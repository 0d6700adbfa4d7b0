"""What lets a training run stop and come back: a signal turned into save-a-checkpoint-and-stop on every
process, the loss log written as it happens, and the newest complete checkpoint to resume from."""

from __future__ import annotations

import json
import logging
import signal
import time
from contextlib import contextmanager
from pathlib import Path

from harness import distributed
from harness.io import atomic_write_text

log = logging.getLogger(__name__)


class StopOnSignal:
    """A TrainerCallback that turns SIGINT/SIGTERM into save-checkpoint-and-stop."""

    # Under torchrun, Ctrl-C reaches each process twice: from the terminal, and passed on by the launcher.
    LAUNCHER_ECHO_S = 2.0

    def __init__(self):
        self.received: int | None = None
        self.at = 0.0

    def handler(self, signum, _frame):
        if self.received is not None:  # a second signal: the user really wants out now
            if distributed.world_size() > 1 and time.monotonic() - self.at < self.LAUNCHER_ECHO_S:
                return
            raise KeyboardInterrupt
        self.received, self.at = signum, time.monotonic()
        log.warning("signal %s: saving a checkpoint, then stopping (send again to abort now)", signum)

    def callback(self, accelerator):
        """Stops every process at the same step: a signal reaches them at slightly different moments, and
        a process that stops alone leaves the others waiting in their next gradient all-reduce."""
        from transformers import TrainerCallback

        outer = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if outer.received is not None:
                    accelerator.set_trigger()
                if accelerator.check_trigger():  # any process's trigger, through one all-reduce
                    control.should_save = True
                    control.should_training_stop = True

        return Callback()


@contextmanager
def signals_to(stopper: StopOnSignal):
    """SIGINT and SIGTERM go to `stopper` while training runs; the previous handlers come back after."""
    previous = {s: signal.signal(s, stopper.handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class LossLog:
    """Append every logged loss to `train_log.jsonl` as it happens (survives a crash)."""

    def __init__(self, path: Path):
        self.path = path

    def callback(self):
        from transformers import TrainerCallback

        path = self.path

        class Callback(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and state.is_world_process_zero:
                    with open(path, "a", encoding="utf-8") as fh:
                        fh.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")

        return Callback()


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest complete checkpoint: the Trainer writes trainer_state.json last, so a folder
    without it is one a kill -9 cut short, and is skipped."""
    found = sorted((p for p in checkpoint_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()
                    and _readable_json(p / "trainer_state.json")), key=lambda p: int(p.name.split("-")[-1]))
    return found[-1] if found else None


def _readable_json(path: Path) -> bool:
    try:
        json.loads(path.read_text(encoding="utf-8"))
        return True
    except (OSError, ValueError):
        return False


def trim_log(path: Path, last_step: int) -> None:
    """Drop log rows past the checkpoint a resume starts from (a kill -9 logged them, resume redoes them)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line
    atomic_write_text(path, "".join(kept))
