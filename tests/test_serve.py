"""`harness serve` on the tiny run: a real HTTP server in a subprocess (loopback, every wait
bounded), the same prompt path as scoring, input validation, and micro-batching: 64 concurrent
requests generated in shared calls, each answered with its own description."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from harness.cli import main
from harness.data.prepared import read_prepared
from harness.serving.serve import is_loopback
from tests.conftest import DEMO_DATA, REPO
from tests.fixtures_loaded import loaded  # noqa: F401  (a fixture)

TITLES = ["Garlic Press", "Kids' Rain Boots , Dinosaur Print", "Aquarium Starter Kit", "Mug"]
SERVER_START_S = 90
REQUEST_TIMEOUT_S = 60
WINDOW_MS, MAX_BATCH = 50, 16
CONCURRENT = 64


def test_served_descriptions_are_the_scored_ones(tiny_run, loaded):  # noqa: F811
    """Greedy output for a held-out title equals what scoring wrote, for tuned and base."""
    heldout = read_prepared(tiny_run / "data").heldout[:2]
    for side, use_adapter in (("tuned", True), ("base", False)):
        rows = [json.loads(line) for line in (tiny_run / "scores" / f"{side}_generations.jsonl").open()]
        scored = {row["id"]: row["text"] for row in rows}
        for example in heldout:
            assert loaded.describe(example.title, use_adapter=use_adapter).text == scored[example.id], side


@pytest.mark.parametrize("flags, message", [(["--max-batch", "0"], "--max-batch must be at least 1"),
                                            (["--batch-window-ms", "-1"], "--batch-window-ms must be between 0")])
def test_bad_batching_options_fail_before_the_model_loads(tmp_path, capsys, flags, message):
    assert main(["serve", str(tmp_path / "no-run"), *flags]) == 2
    assert message in capsys.readouterr().err


def test_loopback_detection():
    assert all(is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "127.0.0.2"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "192.168.1.5", "::", "example.org"))


# -- `harness serve` in a subprocess --------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    """(process, base URL, log path) of a running `harness serve`; killed at the end whatever happens."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    env = dict(os.environ, HARNESS_DEVICE="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "harness", "serve", str(tiny_run), "--port", str(port),
                                 "--batch-window-ms", str(WINDOW_MS), "--max-batch", str(MAX_BATCH)],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            assert proc.poll() is None, f"server exited with {proc.returncode}:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"server not up in {SERVER_START_S} s:\n{log_path.read_text()}"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        yield proc, url, log_path
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def post(url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/generate", json=body, timeout=REQUEST_TIMEOUT_S)


def test_health_names_model_adapter_device_and_batching(server, tiny_run, loaded):  # noqa: F811
    _, url, _ = server
    body = httpx.get(f"{url}/health", timeout=REQUEST_TIMEOUT_S).json()
    assert body == {"status": "ok", "model": loaded.spec.model.base, "adapter": str(tiny_run / "adapter"),
                    "device": body["device"], "batching": {"window_ms": WINDOW_MS, "max_batch": MAX_BATCH}}
    assert body["device"].startswith("cpu")


def test_generate_endpoint_matches_the_cli(server, tiny_run, loaded, capsys):  # noqa: F811
    _, url, _ = server
    response = post(url, {"title": TITLES[1]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"description", "model", "adapter", "tokens", "latency_ms", "batch_size"}
    assert body["batch_size"] == 1 and body["latency_ms"] >= WINDOW_MS  # alone: it waited the window out
    assert body["model"] == loaded.spec.model.base and body["adapter"] == str(tiny_run / "adapter")
    assert body["tokens"] == loaded.describe(TITLES[1]).n_tokens and body["latency_ms"] > 0
    assert main(["generate", str(tiny_run), "--title", TITLES[1]]) == 0
    assert body["description"] + "\n" == capsys.readouterr().out


@pytest.mark.parametrize("body", [
    {"title": ""}, {"title": "   "}, {"title": "x" * 501}, {"title": "Mug", "max_new_tokens": 0},
    {"title": "Mug", "max_new_tokens": 513}, {"title": "Mug", "temperature": 5}, {"title": "Mug", "top_p": 0},
    {"title": "Mug", "colour": "red"}, {"max_new_tokens": 4}, {"title": "<br>"},
], ids=["empty", "blank", "too-long", "zero-tokens", "too-many-tokens", "hot", "top-p-0", "unknown-key",
        "no-title", "empty-once-cleaned"])
def test_bad_requests_are_422(server, body):
    _, url, _ = server
    response = post(url, body)
    assert response.status_code == 422, response.text


def load_titles() -> list[str]:
    """64 distinct titles from the shipped demo set (written for this project)."""
    titles = [json.loads(line)["title"] for line in DEMO_DATA.read_text(encoding="utf-8").splitlines()]
    distinct = list(dict.fromkeys(titles))[:CONCURRENT]
    assert len(distinct) == CONCURRENT
    return distinct


def test_concurrent_requests_are_batched_and_each_gets_its_own_description(server, loaded):  # noqa: F811
    """64 requests at once, two lengths: generated in shared calls (batch size > 1, at most
    --max-batch), and each answer equals its title generated alone, so none was mixed up."""
    _, url, _ = server
    jobs = [{"title": title, "max_new_tokens": 4 + 4 * (i % 2)} for i, title in enumerate(load_titles())]
    before = httpx.get(f"{url}/stats", timeout=REQUEST_TIMEOUT_S).json()
    with ThreadPoolExecutor(max_workers=CONCURRENT) as pool:
        responses = list(pool.map(lambda job: post(url, job), jobs))
    after = httpx.get(f"{url}/stats", timeout=REQUEST_TIMEOUT_S).json()
    assert [r.status_code for r in responses] == [200] * CONCURRENT, [r.text for r in responses if r.status_code != 200]
    for job, response in zip(jobs, responses, strict=True):
        alone = loaded.describe(job["title"], max_new_tokens=job["max_new_tokens"])
        got = response.json()
        assert (got["description"], got["tokens"]) == (alone.text, alone.n_tokens), job
    sizes = [r.json()["batch_size"] for r in responses]
    assert max(sizes) > 1 and max(sizes) <= MAX_BATCH
    assert after["requests"] - before["requests"] == CONCURRENT
    assert 1 < after["largest_batch"] <= MAX_BATCH
    new_calls = {size: n - before["batch_sizes"].get(size, 0) for size, n in after["batch_sizes"].items()}
    assert sum(int(size) * n for size, n in new_calls.items()) == CONCURRENT
    assert sum(n for size, n in new_calls.items() if int(size) > 1) >= CONCURRENT // MAX_BATCH


def test_openapi_docs_are_served(server):
    _, url, _ = server
    assert httpx.get(f"{url}/docs", timeout=REQUEST_TIMEOUT_S).status_code == 200
    schema = httpx.get(f"{url}/openapi.json", timeout=REQUEST_TIMEOUT_S).json()
    assert "/generate" in schema["paths"]


def test_sigint_stops_the_server_cleanly(server):
    """Last in this module: the server goes away on Ctrl-C (SIGINT) with exit code 0."""
    proc, _, log_path = server
    proc.send_signal(signal.SIGINT)
    try:
        code = proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"server still running 20 s after SIGINT:\n{log_path.read_text()}")
    assert code == 0, log_path.read_text()
