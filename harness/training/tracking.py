"""Experiment trackers (`train.report_to`): TensorBoard, MLflow, Weights & Biases.

The Trainer's own integrations log the training loss, eval loss and learning rate; harness adds
tokens/s to every training log (from trl's running `num_tokens`, so no extra read-back from the
GPU) and, once the held-out split is scored, the base, tuned and delta values of every metric with
their 95% CIs, through each tracker's own API. Where the data goes:

- tensorboard: event files in `<run>/tensorboard/`;
- mlflow: a SQLite store `<run>/mlflow.db` (MLflow 3 refuses its old file store) unless
  `MLFLOW_TRACKING_URI` names another; experiment `MLFLOW_EXPERIMENT_NAME` or the task's name;
  one MLflow run per harness run, continued by `--resume`;
- wandb: offline files under `<run>/wandb/` unless `WANDB_MODE` or `WANDB_API_KEY` is set.

What was used is recorded in the manifest's `tracking` block.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

from harness.errors import HarnessError
from harness.spec import TaskSpec, report_to_names

log = logging.getLogger(__name__)
TRACKING_EXTRA = "pip install 'harness[tracking]'"
# The module each tracker needs, and how to install it.
PACKAGES = {"tensorboard": ("tensorboard", TRACKING_EXTRA), "mlflow": ("mlflow", TRACKING_EXTRA),
            "wandb": ("wandb", "pip install wandb")}
TENSORBOARD_DIR = "tensorboard"
MLFLOW_DB = "mlflow.db"
TOKENS_PER_SECOND = "tokens_per_second"


def require_packages(spec: TaskSpec) -> None:
    """Fail in one line, before any work, when a tracker `train.report_to` names is not installed."""
    for name in report_to_names(spec.train.report_to):
        module, install = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise HarnessError(f"train.report_to: {name} needs the {module} package, which is not installed "
                               f"({install})")


def report_to_option(spec: TaskSpec) -> list[str] | str:
    """The Trainer's `report_to` for the spec: the tracker names, or "none"."""
    return report_to_names(spec.train.report_to) or "none"


class TokensPerSecond:
    """A TrainerCallback that adds `tokens_per_second` to each training log: trl's running `num_tokens` (all
    processes' tokens, read back only when it logs anyway) over the wall time since the previous log. It must
    see a log before the trackers and the loss log do (`attach`)."""

    def __init__(self):
        self.tokens = 0
        self.at = time.perf_counter()

    def callback(self):
        from transformers import TrainerCallback

        outer = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                outer.tokens, outer.at = 0, time.perf_counter()  # trl counts from 0 in each training session

            def on_log(self, args, state, control, logs=None, **kwargs):
                if not logs or "num_tokens" not in logs or "loss" not in logs:
                    return
                now = time.perf_counter()
                if now > outer.at:
                    logs[TOKENS_PER_SECOND] = round((logs["num_tokens"] - outer.tokens) / (now - outer.at), 2)
                outer.tokens, outer.at = logs["num_tokens"], now

        return Callback()


def attach(trainer, first_callbacks: list) -> None:
    """Put `first_callbacks` before the trackers the Trainer created, so what they add to a log is logged."""
    from transformers.integrations import INTEGRATION_TO_CALLBACK

    integrations = [trainer.pop_callback(INTEGRATION_TO_CALLBACK[name]) for name in PACKAGES]
    for callback in first_callbacks + [c for c in integrations if c is not None]:
        trainer.add_callback(callback)


@contextmanager
def training_session(spec: TaskSpec, run_dir: Path, trainer, record: dict | None):
    """Point the Trainer's trackers at the run folder for one training session; yields the manifest's
    `tracking` record (`record`: the one a resumed run recorded before, so MLflow goes on in the same run)."""
    from transformers.integrations import TensorBoardCallback

    names = report_to_names(spec.train.report_to)
    record = dict(record or {})
    with ExitStack() as stack:
        if "tensorboard" in names:
            board = next(c for c in trainer.callback_handler.callbacks if isinstance(c, TensorBoardCallback))
            board.logging_dir = str(run_dir / TENSORBOARD_DIR)  # not checkpoints/runs/<date>_<host>
            record["tensorboard"] = {"log_dir": TENSORBOARD_DIR}
        if "mlflow" in names and trainer.is_world_process_zero():
            record["mlflow"] = stack.enter_context(_mlflow_run(spec, run_dir, record.get("mlflow")))
        if "wandb" in names:
            record["wandb"] = stack.enter_context(_wandb_env(run_dir, spec.name, record.get("wandb")))
        yield record


def mlflow_target(spec: TaskSpec, run_dir: Path) -> dict:
    """Where MLflow logs: `MLFLOW_TRACKING_URI`, else a SQLite store in the run folder."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(run_dir / MLFLOW_DB).resolve()}"
    return {"tracking_uri": uri, "experiment": os.environ.get("MLFLOW_EXPERIMENT_NAME") or spec.name}


def _experiment_id(client, target: dict, run_dir: Path) -> str:
    found = client.get_experiment_by_name(target["experiment"])
    if found is not None:
        return found.experiment_id
    # In the run's own store, artifacts stay in the run folder too (MLflow's default is under the shell's folder).
    local = target["tracking_uri"].endswith(MLFLOW_DB) and not os.environ.get("MLFLOW_TRACKING_URI")
    return client.create_experiment(target["experiment"],
                                    artifact_location=str((run_dir / "mlartifacts").resolve()) if local else None)


@contextmanager
def _mlflow_run(spec: TaskSpec, run_dir: Path, previous: dict | None):
    """The run's MLflow run as the active one while the Trainer's MLflowCallback logs into it (it starts
    none of its own then, and ends none)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    target = previous or mlflow_target(spec, run_dir)
    client = MlflowClient(target["tracking_uri"])
    if previous:
        run_id = previous["run_id"]
    else:
        run_id = client.create_run(_experiment_id(client, target, run_dir), run_name=run_dir.name).info.run_id
    # set_tracking_uri also sets MLFLOW_TRACKING_URI for the process: the caller's setting comes back after, or
    # the next run in this process would log into this run's store.
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(target["tracking_uri"])
    status = "KILLED"
    try:
        mlflow.start_run(run_id=run_id)
        yield {**target, "run_id": run_id}
        status = "FINISHED"
    finally:
        mlflow.end_run(status=status)
        mlflow.set_tracking_uri(previous)


@contextmanager
def _wandb_env(run_dir: Path, project: str, previous: dict | None = None):
    """Weights & Biases offline, its files in the run folder, unless the user configured it; the W&B run id is
    the run folder's name and the project the task's (unless WANDB_PROJECT says), so the held-out metrics
    (and a resumed run) join the run training started."""
    configured = bool(os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"))
    previous = previous or {}
    changes = {"WANDB_DIR": str(run_dir.resolve()), "WANDB_RUN_ID": previous.get("run_id", run_dir.name),
               "WANDB_PROJECT": previous.get("project", project), "WANDB_RESUME": "allow"} | \
        ({} if configured else {"WANDB_MODE": "offline"})
    changes = {k: v for k, v in changes.items() if k not in os.environ}
    os.environ.update(changes)
    try:
        yield {"mode": os.environ.get("WANDB_MODE", "online"), "dir": os.environ["WANDB_DIR"],
               "run_id": os.environ["WANDB_RUN_ID"], "project": os.environ["WANDB_PROJECT"]}
    finally:
        for key in changes:
            os.environ.pop(key, None)


# -- after scoring: the held-out metrics with their CIs ----------------------------------------
def heldout_scalars(metrics: dict) -> dict[str, float]:
    """`heldout/<side>/<metric>` and its `_ci95_low` / `_ci95_high` for base, tuned and delta."""
    out = {}
    for side in ("base", "tuned", "delta"):
        for name, stat in metrics[side].items():
            tag = f"heldout/{side}/{name}"
            out[tag] = float(stat["value"])
            out[f"{tag}_ci95_low"], out[f"{tag}_ci95_high"] = (float(x) for x in stat["ci95"])
    return out


def log_heldout(spec: TaskSpec, run_dir: Path, record: dict | None, metrics: dict, step: int) -> None:
    """Log the held-out metrics to every tracker the run trained with, at its last training step."""
    names = report_to_names(spec.train.report_to)
    if not names:
        return
    require_packages(spec)
    scalars = heldout_scalars(metrics)
    record = record or {}
    if "tensorboard" in names:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR))
        try:
            for tag, value in scalars.items():
                writer.add_scalar(tag, value, global_step=step)
        finally:
            writer.close()
    if "mlflow" in names:
        if "mlflow" not in record:
            raise HarnessError(f"{run_dir}: train.report_to names mlflow, but training recorded no MLflow run "
                               "(manifest.json tracking.mlflow)")
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        stamp = int(time.time() * 1000)
        client = MlflowClient(record["mlflow"]["tracking_uri"])
        client.log_batch(record["mlflow"]["run_id"],
                         metrics=[Metric(tag, value, stamp, step) for tag, value in scalars.items()])
    if "wandb" in names:
        import wandb

        with _wandb_env(run_dir, spec.name, record.get("wandb")) as target:
            run = wandb.init(project=target["project"], id=target["run_id"], resume="allow")
            run.summary.update(scalars)
            run.finish()
    log.info("tracking: held-out metrics logged to %s", ", ".join(names))
