"""`harness generate` and `harness serve` on the tiny run: same prompt path as scoring, a real
HTTP server in a subprocess, input validation, no cross-talk under concurrent requests."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from harness.cli import main
from harness.data import read_prepared
from harness.serve import LoadedRun, is_loopback
from tests.conftest import REPO

TITLES = ["Garlic Press", "Kids' Rain Boots , Dinosaur Print", "Aquarium Starter Kit", "Mug"]
SERVER_START_S = 90
REQUEST_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def loaded(tiny_run):
    with pytest.MonkeyPatch.context() as mp:  # module fixtures run before the autouse env fixture
        mp.setenv("HARNESS_DEVICE", "cpu")
        return LoadedRun.load(tiny_run)


def one_line(text: str) -> str:
    return " ".join(text.split())


# -- LoadedRun and `harness generate` -------------------------------------------------------------

def test_served_descriptions_are_the_scored_ones(tiny_run, loaded):
    """Greedy output for a held-out title equals what scoring wrote, for tuned and base."""
    heldout = read_prepared(tiny_run / "data").heldout[:2]
    for side, use_adapter in (("tuned", True), ("base", False)):
        rows = [json.loads(line) for line in (tiny_run / "scores" / f"{side}_generations.jsonl").open()]
        scored = {row["id"]: row["text"] for row in rows}
        for example in heldout:
            assert loaded.describe(example.title, use_adapter=use_adapter).text == scored[example.id], side


def test_generate_title_prints_the_loaded_run_description(tiny_run, loaded, capsys):
    assert main(["generate", str(tiny_run), "--title", TITLES[0]]) == 0
    out = capsys.readouterr().out
    assert out.strip()
    assert out == loaded.describe(TITLES[0]).text + "\n"


def test_generate_reads_titles_from_stdin_one_line_each(tiny_run, loaded, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{TITLES[0]}\n\n   \n{TITLES[1]}\n"))
    assert main(["generate", str(tiny_run), "--max-new-tokens", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [one_line(loaded.describe(t, max_new_tokens=4).text) for t in TITLES[:2]]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_generate_on_a_terminal_prompts_and_streams(tiny_run, loaded, monkeypatch):
    """Typed titles at `title> ` until an empty line; tokens streamed to the terminal."""
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stdin", _Terminal(f"{TITLES[3]}\n\n{TITLES[0]}\n"))
    monkeypatch.setattr(sys, "stdout", terminal)
    assert main(["generate", str(tiny_run), "--max-new-tokens", "3"]) == 0
    prompts = terminal.getvalue().split("title> ")
    assert len(prompts) == 3 and prompts[0] == "" and prompts[2] == ""  # stopped at the empty line
    assert one_line(prompts[1]) == loaded.describe(TITLES[3], max_new_tokens=3).text


def test_generate_compare_labels_tuned_and_base(tiny_run, loaded, capsys):
    assert main(["generate", str(tiny_run), "--title", TITLES[2], "--compare"]) == 0
    tuned, base = capsys.readouterr().out.splitlines()
    assert tuned.startswith("tuned:") and base.startswith("base:")
    assert tuned.split(":", 1)[1].strip() == loaded.describe(TITLES[2]).text
    assert base.split(":", 1)[1].strip() == loaded.describe(TITLES[2], use_adapter=False).text


def test_generate_refuses_missing_or_unfinished_runs_and_bad_options(tiny_run, tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nope"), "--title", "x"]) == 2
    assert main(["generate", str(tmp_path), "--title", "x"]) == 2  # a folder without spec.yaml
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(tiny_run / "spec.yaml", unfinished / "spec.yaml")
    assert main(["generate", str(unfinished), "--title", "x"]) == 2
    assert main(["generate", str(tiny_run), "--title", "x", "--temperature", "-1"]) == 2
    assert main(["generate", str(tiny_run), "--title", "   "]) == 2
    errors = capsys.readouterr().err.splitlines()
    messages = [line for line in errors if line.startswith("harness: error:")]
    assert len(messages) == 5
    assert "no such run folder" in messages[0] and "spec.yaml" in messages[1] and "adapter" in messages[2]
    assert "temperature" in messages[3] and "empty" in messages[4]


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
        proc = subprocess.Popen([sys.executable, "-m", "harness", "serve", str(tiny_run), "--port", str(port)],
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


def test_health_names_model_adapter_and_device(server, tiny_run, loaded):
    _, url, _ = server
    body = httpx.get(f"{url}/health", timeout=REQUEST_TIMEOUT_S).json()
    assert body == {"status": "ok", "model": loaded.spec.model.base, "adapter": str(tiny_run / "adapter"),
                    "device": body["device"]}
    assert body["device"].startswith("cpu")


def test_generate_endpoint_matches_the_cli(server, tiny_run, loaded, capsys):
    _, url, _ = server
    response = post(url, {"title": TITLES[1]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"description", "model", "adapter", "tokens", "latency_ms"}
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


def test_concurrent_requests_do_not_cross_talk(server):
    """20 requests at once over (title, length) pairs: each answer equals its request served alone."""
    _, url, _ = server
    jobs = [{"title": TITLES[i % 4], "max_new_tokens": 2 + 3 * (i // 4 % 2)} for i in range(20)]
    alone = {}
    for job in jobs:
        key = (job["title"], job["max_new_tokens"])
        if key not in alone:
            alone[key] = post(url, job).json()
    with ThreadPoolExecutor(max_workers=20) as pool:
        responses = list(pool.map(lambda job: post(url, job), jobs))
    assert [r.status_code for r in responses] == [200] * 20
    for job, response in zip(jobs, responses):
        expected = alone[(job["title"], job["max_new_tokens"])]
        got = response.json()
        assert (got["description"], got["tokens"]) == (expected["description"], expected["tokens"])


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
