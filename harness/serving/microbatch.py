"""Micro-batching for `harness serve`: concurrent requests generated together, on one worker thread.

Once the worker is free and a request is there, it gathers requests for `window_s` (counted from
that request's arrival, or from the moment the worker got free if the request was already
queued) or until it has `max_batch` of them, then generates. Counting from the moment the worker
got free matters under load: the clients just answered, who send their next request a few
milliseconds later, join the requests that queued during the last generation, instead of forming
a second, smaller batch that would then alternate with the first forever. With `max_batch=1` requests are served one at a time.

Requests share a generate call only when their generation settings are equal (max_new_tokens,
temperature, top_p): a gathered batch is split into groups of equal settings, each generated in
its own call. The alternative, one call at the largest max_new_tokens with each output trimmed
to its request's limit, cannot mix temperatures or top_p at all (they are per call in
`model.generate`), and makes a short request wait for, and the device compute, the longest
request's tokens; grouping gives every request its own settings and no more steps than they ask.

Each request holds its own Future, resolved with its own row of the call's results (which come
back in the order the prompts went in), so answers cannot be mixed up between requests.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable

from harness.scoring.generation import Generation
from harness.spec import GenerationSpec

log = logging.getLogger(__name__)
GenerateBatch = Callable[[list[str], GenerationSpec], list[Generation]]


@dataclass(frozen=True)
class Served:
    generation: Generation
    batch_size: int  # requests generated in the same call as this one


@dataclass
class _Request:
    prompt: str
    settings: GenerationSpec
    future: Future
    arrived: float  # time.monotonic()


_STOP = object()


class MicroBatcher:
    """`submit` from any thread; a single worker thread runs `generate_batch` on gathered groups."""

    def __init__(self, generate_batch: GenerateBatch, window_s: float, max_batch: int):
        if window_s < 0 or max_batch < 1:
            raise ValueError(f"window_s must be >= 0 and max_batch >= 1 (got {window_s}, {max_batch})")
        self.window_s, self.max_batch = window_s, max_batch
        self._generate_batch = generate_batch
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name="harness-microbatch", daemon=True)
        self._sizes: Counter[int] = Counter()  # requests per generate call -> calls
        self._sizes_lock = threading.Lock()
        self._stopping = False
        self._stopping_lock = threading.Lock()  # nothing is queued after _STOP, so nothing waits forever

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Serve every request submitted so far, then end the worker; later submits are refused."""
        with self._stopping_lock:
            self._stopping = True
            self._queue.put(_STOP)
        self._thread.join(timeout)

    def submit(self, prompt: str, settings: GenerationSpec) -> "Future[Served]":
        future: Future = Future()
        with self._stopping_lock:
            if self._stopping:
                raise RuntimeError("the server is stopping")
            self._queue.put(_Request(prompt, settings, future, time.monotonic()))
        return future

    def stats(self) -> dict:
        with self._sizes_lock:
            sizes = dict(sorted(self._sizes.items()))
        calls = sum(sizes.values())
        served = sum(size * n for size, n in sizes.items())
        return {"requests": served, "generate_calls": calls, "largest_batch": max(sizes, default=0),
                "mean_batch_size": round(served / calls, 3) if calls else 0.0,
                "batch_sizes": {str(size): n for size, n in sizes.items()}}

    # -- the worker thread --------------------------------------------------------------------------

    def _work(self) -> None:
        stopping = False
        while not stopping:
            batch, stopping = self._gather()
            # A request whose client went away was cancelled: it is dropped, not generated.
            live = [r for r in batch if r.future.set_running_or_notify_cancel()]
            for group in _equal_settings(live):
                self._run(group)

    def _gather(self) -> tuple[list[_Request], bool]:
        """The next batch (waiting for its first request), and whether stop() was called.

        Requests queued before stop() come before _STOP, so each is in this batch or a later one."""
        free_since = time.monotonic()
        first = self._queue.get()
        if first is _STOP:
            return [], True
        batch = [first]
        deadline = max(first.arrived, free_since) + self.window_s
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            batch.append(item)
        return batch, False

    def _run(self, group: list[_Request]) -> None:
        try:
            results = self._generate_batch([r.prompt for r in group], group[0].settings)
            answered = list(zip(group, results, strict=True))
        except Exception as exc:  # the group's requests get the error; the worker serves the next batch
            log.error("generation failed for a batch of %d: %s: %s", len(group), type(exc).__name__, exc)
            for request in group:
                request.future.set_exception(exc)
            return
        with self._sizes_lock:
            self._sizes[len(group)] += 1
        for request, result in answered:
            request.future.set_result(Served(result, len(group)))


def _equal_settings(requests: list[_Request]) -> list[list[_Request]]:
    """Requests grouped by generation settings, groups in the order their first request arrived."""
    groups: list[list[_Request]] = []  # by equality, not hashing: a GenerationSpec holds lists
    for request in requests:
        group = next((g for g in groups if g[0].settings == request.settings), None)
        if group is None:
            groups.append([request])
        else:
            group.append(request)
    return groups
