"""The sweep's optuna study: its name, its storage (a SQLite file in the sweep folder or a shared server, with
heartbeats for trials that die) and, on resume, which configurations run again. A building block of the
sweep recipe (harness/recipes/sweep.py), which runs the trials.
"""

from __future__ import annotations

import collections
import copy
import logging
import socket
import warnings

from harness.errors import RunError, SpecError
from harness.fingerprint import hash_json, split_fingerprint
from harness.runfolder import pid_alive
from harness.scoring.sweep_selection import maximizes
from harness.spec import SweepSpec, TaskSpec, spec_to_dict

log = logging.getLogger(__name__)
# Shared storage: a running trial records a heartbeat; one silent for GRACE_S is failed and queued
# again by the next worker (optuna's RetryHeartbeatStaleTrialCallback), at most HEARTBEAT_RETRIES times.
HEARTBEAT_S, GRACE_S, HEARTBEAT_RETRIES = 60, 300, 2
MAX_ATTEMPTS = 3  # a configuration that failed this often is left out on the next resume, not retried forever


def study_name(spec: TaskSpec, grid: dict, train: list, validation: list) -> str:
    """The same spec, grid and data give the same name, so workers on one storage join one study."""
    setup = spec_to_dict(spec)
    setup["data"].pop("path")  # machines may keep the same files in different places
    return f"{spec.name}-" + hash_json({"spec": setup, "grid": grid, "train": split_fingerprint(train),
                                        "validation": split_fingerprint(validation)})[:12]


def open_storage(url: str):
    """optuna's RDB storage (SQLite file or a shared server), with heartbeats for trials that die."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own log says what each trial did
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                              heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(HEARTBEAT_RETRIES))
    except Exception as exc:  # a bad URL, an unreachable server or a missing driver (psycopg2): one line
        detail = " ".join(str(exc).split())[:200]
        raise RunError(f"storage {masked_url(url)}: cannot open ({type(exc).__name__}: {detail})") from None


def open_study(storage, name: str, sweep: SweepSpec, grid: dict):
    import optuna

    study = optuna.create_study(storage=storage, study_name=name, load_if_exists=True,
                                direction="maximize" if maximizes(sweep.select) else "minimize")
    # TPE is seeded by the trials already there, so a resumed sweep does not replay its first suggestions.
    study.sampler = (optuna.samplers.GridSampler(grid, seed=sweep.seed) if sweep.sampler == "grid"
                     else optuna.samplers.TPESampler(seed=sweep.seed + len(study.trials)))
    return study


def masked_url(url: str) -> str:
    """The URL without its password: what the sweep folder records."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        raise SpecError(f"--storage {url.split('@')[-1]!r}: not a database URL "
                        "(e.g. postgresql://user@host/db)") from None


def resumed_storage(recorded: str | None, given: str | None) -> str | None:
    """The study's URL on resume: the recorded one, or the same one given again with its password."""
    if recorded is None:
        if given:
            raise SpecError("--storage: this sweep keeps its study in its own folder; resume without --storage")
        return None
    url = given or recorded
    if masked_url(url) != recorded:
        raise SpecError(f"--storage: this sweep's study is on {recorded}; give that URL or none")
    if url == recorded and "***" in recorded:
        raise SpecError(f"--storage: the sweep recorded {recorded} without its password; give the URL again")
    return url


def retry_unfinished(study) -> None:
    """Queue again each configuration whose last attempt failed, or died running on this host (a
    kill -9 leaves it RUNNING); a configuration that completed, or is queued or running, is left alone,
    and one that failed MAX_ATTEMPTS times is given up (choice.json lists it)."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = t.user_attrs
        if attrs.get("host") == socket.gethostname() and not pid_alive(attrs.get("pid"), attrs.get("pid_started")):
            # What optuna.storages.fail_stale_trials does for a stale heartbeat; study.tell would also run
            # the sampler's after_trial, which stops a grid study outside optimize() (a RuntimeError).
            study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
            log.warning("trial %d died while running (pid %s); it runs again", t.number, attrs.get("pid"))
    trials = study.get_trials(deepcopy=False)
    covered = {params_key(t.params) for t in trials if t.state in (TrialState.COMPLETE, TrialState.RUNNING,
                                                              TrialState.WAITING)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the callback class is marked experimental
        retry = RetryHeartbeatStaleTrialCallback()
    failures = collections.Counter(params_key(t.params) for t in trials if t.state == TrialState.FAIL)
    for t in reversed(trials):
        key = params_key(t.params)
        if t.state != TrialState.FAIL or key in covered:
            continue
        covered.add(key)
        if failures[key] >= MAX_ATTEMPTS:
            log.warning("trial %d's configuration failed %d times; the sweep goes on without it", t.number,
                        failures[key])
        else:
            retry(study, copy.deepcopy(t))  # a WAITING copy: same params, grid slot and trial folder


def params_key(params: dict) -> tuple:
    return tuple(sorted(params.items()))
