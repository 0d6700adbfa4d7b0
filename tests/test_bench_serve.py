"""The serving bench's CPU smoke test: both modes run against real `harness serve` subprocesses,
serial really is one request per call, batched really shares calls, and both give the same
greedy descriptions (CPU numbers mean nothing; the bench needs --quick to run here)."""

import json

import pytest

from harness.benchmarks.bench_serve import CLIENTS, MODES
from harness.cli import main
from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_bench_serve_measures_serial_and_batched_servers(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "bench.json"
    code = main(["-q", "bench", str(REPO / "tasks" / "amazon_desc.yaml"), "--quick", "--only", "serve",
                 "--examples", "300", "--work", str(tmp_path / "work"), "--out", str(out),
                 "--set", f"model.base={tiny_model_dir}", "--set", "model.random_weights=true",
                 "--set", "generation.max_new_tokens=4"])
    assert code == 0
    serve = json.loads(out.read_text())["serve"]
    serial, batched = serve["serial"], serve["batched"]
    assert (serial["requests"], batched["requests"]) == (MODES["serial"]["requests"], MODES["batched"]["requests"])
    assert serial["largest_batch"] == 1 and serial["generate_calls"] == serial["requests"]
    assert (serial["window_ms"], serial["max_batch"], batched["window_ms"], batched["max_batch"]) == (0, 1, 10, 64)
    assert 1 < batched["mean_batch_size"] <= batched["largest_batch"] <= batched["max_batch"]
    assert serve["identical_outputs_share"] == 1.0  # fp32 greedy: batching changes no description
    for mode in (serial, batched):
        assert mode["requests_per_s"] > 0 and 0 < mode["latency_p50_ms"] <= mode["latency_p95_ms"]
    assert serve["ratio"] == pytest.approx(batched["requests_per_s"] / serial["requests_per_s"])
    assert serve["clients"] == CLIENTS
    assert "| batched |" in capsys.readouterr().out
