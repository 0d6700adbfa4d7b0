"""The micro-batcher on its own, with a fake generator that records its calls: requests that
arrive together share a call, only with equal settings, each gets its own answer back, and
failures and cancellations stay with the requests they belong to."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from harness.scoring.generation import Generation
from harness.serving.microbatch import MicroBatcher
from harness.spec import GenerationSpec

WAIT_S = 10


class Recorder:
    """generate_batch stand-in: answers `prompt@max_new_tokens`; `gate` holds a call until set."""

    def __init__(self, fail_on: str | None = None):
        self.calls: list[tuple[list[str], GenerationSpec]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.fail_on = fail_on

    def __call__(self, prompts: list[str], gen: GenerationSpec) -> list[Generation]:
        self.calls.append((list(prompts), gen))
        self.started.set()
        assert self.gate.wait(WAIT_S)
        if self.fail_on in prompts:
            raise RuntimeError("out of memory")
        return [Generation(f"{p}@{gen.max_new_tokens}", len(p), False) for p in prompts]


@pytest.fixture
def started():
    """start(batcher) -> batcher; every batcher started here is stopped at the end."""
    running = []

    def start(batcher: MicroBatcher) -> MicroBatcher:
        batcher.start()
        running.append(batcher)
        return batcher

    yield start
    for batcher in running:
        batcher.stop(timeout=WAIT_S)


def settings(max_new_tokens: int = 8, temperature: float = 1.0, do_sample: bool = False) -> GenerationSpec:
    return GenerationSpec(max_new_tokens=max_new_tokens, temperature=temperature, do_sample=do_sample)


def test_concurrent_requests_share_calls_by_settings_and_get_their_own_answers(started):
    recorder = Recorder()
    batcher = started(MicroBatcher(recorder, window_s=1.0, max_batch=64))
    jobs = [(f"title-{i}", settings(4 + 4 * (i % 3))) for i in range(48)]
    with ThreadPoolExecutor(max_workers=48) as pool:
        futures = list(pool.map(lambda job: batcher.submit(*job), jobs))
    answers = [f.result(timeout=WAIT_S) for f in futures]
    assert [a.generation.text for a in answers] == [f"{p}@{g.max_new_tokens}" for p, g in jobs]
    assert sorted(p for prompts, _ in recorder.calls for p in prompts) == sorted(p for p, _ in jobs)
    assert len(recorder.calls) == 3  # one call per max_new_tokens value: all 48 arrived within the window
    for prompts, gen in recorder.calls:
        assert {dict(jobs)[p].max_new_tokens for p in prompts} == {gen.max_new_tokens}
    assert sorted(a.batch_size for a in answers) == [16] * 48
    assert batcher.stats() == {"requests": 48, "generate_calls": 3, "largest_batch": 16, "mean_batch_size": 16.0,
                               "batch_sizes": {"16": 3}}


def test_sampled_and_greedy_requests_never_share_a_call(started):
    recorder = Recorder()
    batcher = started(MicroBatcher(recorder, window_s=1.0, max_batch=64))
    kinds = [settings(), settings(do_sample=True, temperature=0.7), settings(do_sample=True, temperature=0.9)]
    futures = [batcher.submit(f"t{i}", kinds[i % 3]) for i in range(9)]
    [f.result(timeout=WAIT_S) for f in futures]
    assert sorted((g.do_sample, g.temperature, len(p)) for p, g in recorder.calls) == \
        [(False, 1.0, 3), (True, 0.7, 3), (True, 0.9, 3)]


def test_max_batch_caps_a_call_and_requests_queued_while_busy_join_the_next_one(started):
    recorder = Recorder()
    recorder.gate.clear()
    batcher = started(MicroBatcher(recorder, window_s=0.0, max_batch=4))
    first = batcher.submit("first", settings())
    assert recorder.started.wait(WAIT_S)  # the worker is busy with `first` alone
    queued = [batcher.submit(f"q{i}", settings()) for i in range(10)]
    recorder.gate.set()
    assert [f.result(timeout=WAIT_S).generation.text for f in [first, *queued]] == \
        ["first@8"] + [f"q{i}@8" for i in range(10)]
    assert [len(prompts) for prompts, _ in recorder.calls] == [1, 4, 4, 2]  # no wait: window 0


def test_requests_queued_while_busy_wait_for_the_clients_just_answered(started):
    """Counting the window from the moment the worker got free: the client answered a moment
    ago joins the request that queued meanwhile, instead of the two batches alternating."""
    recorder = Recorder()
    recorder.gate.clear()
    batcher = started(MicroBatcher(recorder, window_s=0.5, max_batch=8))
    first = batcher.submit("first", settings())
    assert recorder.started.wait(WAIT_S)
    queued = batcher.submit("queued", settings())
    time.sleep(0.6)  # longer than the window: `queued` alone would go at once
    recorder.gate.set()
    first.result(timeout=WAIT_S)
    answered = batcher.submit("answered", settings())
    assert queued.result(timeout=WAIT_S).batch_size == answered.result(timeout=WAIT_S).batch_size == 2


def test_max_batch_one_serves_one_request_per_call(started):
    recorder = Recorder()
    batcher = started(MicroBatcher(recorder, window_s=0.05, max_batch=1))
    futures = [batcher.submit(f"t{i}", settings()) for i in range(5)]
    assert [f.result(timeout=WAIT_S).batch_size for f in futures] == [1] * 5
    assert [prompts for prompts, _ in recorder.calls] == [[f"t{i}"] for i in range(5)]


def test_the_window_waits_for_late_requests_from_the_first_arrival(started):
    recorder = Recorder()
    batcher = started(MicroBatcher(recorder, window_s=0.3, max_batch=8))
    early = batcher.submit("early", settings())
    time.sleep(0.05)
    late = batcher.submit("late", settings())
    assert early.result(timeout=WAIT_S).batch_size == late.result(timeout=WAIT_S).batch_size == 2


def test_a_failed_call_fails_only_its_requests_and_the_worker_goes_on(started):
    recorder = Recorder(fail_on="bad")
    batcher = started(MicroBatcher(recorder, window_s=1.0, max_batch=8))
    bad_group = [batcher.submit("bad", settings(4)), batcher.submit("x", settings(4))]
    good = batcher.submit("good", settings(16))
    for future in bad_group:
        with pytest.raises(RuntimeError, match="out of memory"):
            future.result(timeout=WAIT_S)
    assert good.result(timeout=WAIT_S).generation.text == "good@16"
    assert batcher.submit("after", settings(4)).result(timeout=WAIT_S).generation.text == "after@4"


def test_a_cancelled_request_is_not_generated(started):
    recorder = Recorder()
    recorder.gate.clear()
    batcher = started(MicroBatcher(recorder, window_s=0.0, max_batch=8))
    batcher.submit("busy", settings())
    assert recorder.started.wait(WAIT_S)
    gone, kept = batcher.submit("gone", settings()), batcher.submit("kept", settings())
    assert gone.cancel()  # the client went away while the request was queued
    recorder.gate.set()
    assert kept.result(timeout=WAIT_S).generation.text == "kept@8"
    assert [prompts for prompts, _ in recorder.calls] == [["busy"], ["kept"]]


def test_stop_serves_what_was_submitted_and_refuses_the_rest():
    recorder = Recorder()
    recorder.gate.clear()
    batcher = MicroBatcher(recorder, window_s=0.0, max_batch=2)
    batcher.start()
    futures = [batcher.submit(f"t{i}", settings()) for i in range(5)]
    assert recorder.started.wait(WAIT_S)
    stopper = threading.Thread(target=batcher.stop, kwargs={"timeout": WAIT_S})
    stopper.start()
    recorder.gate.set()
    stopper.join(WAIT_S)
    assert [f.result(timeout=0).generation.text for f in futures] == [f"t{i}@8" for i in range(5)]
    with pytest.raises(RuntimeError, match="stopping"):
        batcher.submit("late", settings())


@pytest.mark.parametrize("window_s, max_batch", [(-0.001, 4), (0.01, 0)])
def test_bad_batching_settings_are_refused(window_s, max_batch):
    with pytest.raises(ValueError):
        MicroBatcher(Recorder(), window_s, max_batch)
