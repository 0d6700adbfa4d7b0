"""`python -m harness bench TASK --only serve`: `harness serve` under 64 concurrent clients,
micro-batched against one request at a time.

Each mode is a real `harness serve` subprocess on loopback serving the same run folder:
`serial` is `--batch-window-ms 0 --max-batch 1` (every request its own generate call, what
`serve` did before micro-batching), `batched` is serve's defaults (read back from `/health`).
64 client threads each send one request, wait for its answer and send the next (a closed
loop, like 64 users), until the mode's requests are done (serial: 8, batched: 256); the first 8
titles are the same in both modes, so their outputs can be compared. The run folder holds a fresh, untrained LoRA
adapter on the task's base model (LoRA's B starts at zero, so it writes what the base model
writes, at the cost of a tuned model: the LoRA matmuls still run), so the bench needs no
finished run.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import yaml

import harness
from harness.errors import HarnessError
from harness.io import atomic_write_text
from harness.runfolder import ADAPTER_DIR, SPEC_FILE
from harness.spec import TaskSpec, spec_to_dict

log = logging.getLogger(__name__)
CLIENTS = 64
# Serial answers one request at a time (10.5 s each for SmolLM2 with its LoRA adapter on an H100 at 96 new
# tokens: 16 took 168 s), so it gets an eighth of the clients' requests; its rate needs no more.
MODES = {"serial": {"flags": ["--batch-window-ms", "0", "--max-batch", "1"], "requests": CLIENTS // 8},
         "batched": {"flags": [], "requests": 4 * CLIENTS}}
WARMUP_REQUESTS = 2
SERVER_START_S = 300
REQUEST_TIMEOUT_S = 600  # a serial request waits for up to 63 others


def measure_serving(spec: TaskSpec, tokenizer, titles: list[str], device, work: Path) -> dict:
    """requests/s, tokens/s and client-side latency percentiles per mode, and their ratio."""
    needed = max(mode["requests"] for mode in MODES.values())
    if len(titles) < needed:
        raise HarnessError(f"bench serve: needs {needed} titles, got {len(titles)} (raise --examples)")
    run_dir = write_bench_run(spec, tokenizer, device, Path(work) / "serve-run")
    results: dict = {"clients": CLIENTS, "max_new_tokens": spec.generation.max_new_tokens}
    answers = {}
    for name, mode in MODES.items():
        with running_server(run_dir, mode["flags"], Path(work) / f"serve-{name}.log") as port:
            batching = _get_json(port, "/health")["batching"]
            drive(port, titles[:WARMUP_REQUESTS], WARMUP_REQUESTS)  # CUDA kernels and allocator, untimed
            before = _get_json(port, "/stats")
            wall_s, latencies, answers[name] = drive(port, titles[: mode["requests"]], CLIENTS)
            after = _get_json(port, "/stats")
        calls = after["generate_calls"] - before["generate_calls"]
        tokens = sum(a["tokens"] for a in answers[name])
        results[name] = {
            **batching, "requests": len(latencies),
            "wall_s": wall_s, "requests_per_s": len(latencies) / wall_s, "tokens_per_s": tokens / wall_s,
            "latency_p50_ms": float(np.percentile(latencies, 50) * 1000),
            "latency_p95_ms": float(np.percentile(latencies, 95) * 1000),
            "generate_calls": calls, "mean_batch_size": len(latencies) / calls,
            "largest_batch": after["largest_batch"]}
        log.info("bench serve %s: %s", name, results[name])
    results["ratio"] = results["batched"]["requests_per_s"] / results["serial"]["requests_per_s"]
    serial, batched = answers["serial"], answers["batched"]
    results["identical_outputs_share"] = sum(
        a["description"] == b["description"] for a, b in zip(serial, batched[: len(serial)], strict=True)) / len(serial)
    return results


def format_serving(serve: dict) -> list[str]:
    """Table lines for the bench report."""
    lines = ["", f"serve: {serve['clients']} concurrent clients, max_new_tokens {serve['max_new_tokens']}",
             "| mode | window ms | max batch | requests | requests/s | tokens/s | p50 ms | p95 ms | mean batch |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in MODES:
        m = serve[name]
        lines.append(f"| {name} | {m['window_ms']:g} | {m['max_batch']} | {m['requests']} | "
                     f"{m['requests_per_s']:.2f} | {m['tokens_per_s']:,.0f} | {m['latency_p50_ms']:,.0f} | "
                     f"{m['latency_p95_ms']:,.0f} | {m['mean_batch_size']:.1f} |")
    lines.append(f"serve: batched / serial requests/s {serve['ratio']:.1f}x; "
                 f"identical outputs {serve['identical_outputs_share']:.0%}")
    return lines


def write_bench_run(spec: TaskSpec, tokenizer, device, run_dir: Path) -> Path:
    """A run folder `serve` accepts: the spec and a fresh (untrained) LoRA adapter from its lora section."""
    from peft import LoraConfig, get_peft_model

    from harness import models
    from harness.models import base_files

    model = models.load_model(base_files.resolve_base(spec.model.base), spec.model, tokenizer, device)
    lora = LoraConfig(r=spec.lora.r, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
                      target_modules=spec.lora.target_modules, task_type="CAUSAL_LM")
    get_peft_model(model, lora).save_pretrained(run_dir / ADAPTER_DIR)
    atomic_write_text(run_dir / SPEC_FILE, yaml.safe_dump(spec_to_dict(spec), sort_keys=False))
    del model
    if device.kind == "cuda":
        import torch

        torch.cuda.empty_cache()
    return run_dir


@contextmanager
def running_server(run_dir: Path, flags: list[str], log_path: Path) -> Iterator[int]:
    """The port of a `harness serve` subprocess on 127.0.0.1, up and healthy; stopped on exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "harness", "serve", str(run_dir), "--host", "127.0.0.1", "--port", str(port),
               *flags]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(command, cwd=Path(harness.__file__).parents[1], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + SERVER_START_S
        while not _healthy(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise HarnessError(f"bench serve: server did not come up (log {log_path}): {tail!r}")
            time.sleep(0.5)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _healthy(port: int) -> bool:
    try:
        return _get_json(port, "/health")["status"] == "ok"
    except (OSError, http.client.HTTPException, ValueError):
        return False


def _get_json(port: int, path: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def drive(port: int, titles: list[str], clients: int) -> tuple[float, list[float], list[dict]]:
    """(wall seconds, per-request latencies, answers in title order) of `clients` closed-loop
    clients sharing `titles`; each client keeps one connection open, as a real client would."""
    latencies = [0.0] * len(titles)
    answers: list[dict] = [{}] * len(titles)
    next_index = iter(range(len(titles)))
    take = threading.Lock()

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
        try:
            while True:
                with take:
                    i = next(next_index, None)
                if i is None:
                    return
                started = time.perf_counter()
                conn.request("POST", "/generate", json.dumps({"title": titles[i]}),
                             {"content-type": "application/json"})
                response = conn.getresponse()
                body = response.read()
                latencies[i] = time.perf_counter() - started
                if response.status != 200:
                    raise HarnessError(f"bench serve: HTTP {response.status} for request {i}: {body[:300]!r}")
                answers[i] = json.loads(body)
        finally:
            conn.close()

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        for future in [pool.submit(client) for _ in range(clients)]:
            future.result()
    return time.perf_counter() - started, latencies, answers
