"""Full-size trn.json: peak memory and wall time of `harness prepare`, and time to the first
optimizer step of `harness run` with data.max_train capped.

The real AmazonTitles-1.3MM trn.json (2,248,619 lines, 1.89 GB) is not shipped, so this writes a
synthetic file of the same shape: json.dumps lines `{"uid","title","content","target_ind",
"target_rel"}` (~840 bytes a line), 38% empty content, HTML entities, tags, escaped non-ASCII,
~3% repeated titles, long label lists, and a few cut-short lines. Words are random letters: no
real record is copied.

Usage:
  python bench/prepare_memory.py                       # 2.25M lines, prepare only
  python bench/prepare_memory.py --lines 200000 --first-step --model MODEL_DIR
  python bench/prepare_memory.py --first-step          # builds the tests' tiny model (CPU)
  python bench/prepare_memory.py --set data.workers=1  # prepare in one process
  python bench/prepare_memory.py --tokenize            # + tokenized_dataset vs one-at-a-time, 100k examples

Each measurement runs in its own subprocess; peak RSS is that child's ru_maxrss.
Prints one JSON object (also written to --out).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import resource
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
FULL_LINES = 2_250_000
SPEC = REPO / "tasks" / "amazon_desc.yaml"

_ENTITIES = ["&amp;", "&quot;", "&#8217;", "&amp;#39;", "&nbsp;", "&mdash;", "<br>", "<br />", "<b>", "</b>",
             "\u00e9", "\u00ae", "\u2122", "\u2013", "&lt;", "&gt;", "&#x27;"]


def _vocabulary(rng: random.Random, n: int = 20_000) -> list[str]:
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 10))) for _ in range(n)]
    return [w.capitalize() if rng.random() < 0.3 else w for w in words]


def _text_block(rng: random.Random, words: list[str], n_chars: int) -> str:
    """A long run of words with entities, tags and punctuation sprinkled in; contents are slices of it."""
    out, size = [], 0
    weights = [1 / (i + 1) for i in range(len(words))]  # Zipf-like: a few words are common
    while size < n_chars:
        chunk = rng.choices(words, weights=weights, k=1000)
        for i in range(0, 1000, 50):
            chunk[i] += rng.choice([".", ",", "!", ":"])
        for _ in range(25):
            chunk[rng.randrange(1000)] += rng.choice(_ENTITIES)
        piece = " ".join(chunk)
        out.append(piece)
        size += len(piece) + 1
    return " ".join(out)


def _labels(rng: random.Random) -> str:
    """`"target_ind": [...], "target_rel": [...]` as json.dumps writes them (~22 labels on average)."""
    k = min(1 + int(rng.expovariate(1 / 21)), 400)
    ind = sorted(rng.sample(range(1_305_265), k))
    return f'"target_ind": {json.dumps(ind)}, "target_rel": {json.dumps([1.0] * k)}'


def write_synthetic_trn(path: Path, n_lines: int, seed: int = 0, block_chars: int = 8_000_000) -> dict:
    """Write a trn.json-shaped file of `n_lines` lines; returns what it wrote (sizes, counts).

    Contents are slices of one `block_chars` run of text (a smaller block writes faster)."""
    rng = random.Random(seed)
    words = _vocabulary(rng)
    block = _text_block(rng, words, block_chars)
    labels = [_labels(rng) for _ in range(1024)]
    titles: list[str] = []
    empty = truncated = 0
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n_lines):
            if titles and rng.random() < 0.03:
                title = rng.choice(titles[-5000:]).upper()  # the same product again, other case
            else:
                start = rng.randrange(len(block) - 200)
                title = block[start:start + rng.randint(12, 120)].strip() + f" {i:x}"
                titles.append(title)
                if len(titles) > 10_000:
                    del titles[:5000]
            if rng.random() < 0.38:
                content, empty = "", empty + 1
            else:
                n = min(int(rng.lognormvariate(6.1, 0.8)), 8000)
                start = rng.randrange(len(block) - n)
                content = block[start:start + n]
            line = (f'{{"uid": "{i:010d}", "title": {json.dumps(title)}, "content": {json.dumps(content)}, '
                    f'{labels[rng.randrange(len(labels))]}}}')
            if i % 250_000 == 1_234:  # a cut-short line now and then
                line, truncated = line[: len(line) // 2], truncated + 1
            fh.write(line + "\n")
    return {"lines": n_lines, "bytes": path.stat().st_size, "empty_content": empty, "cut_short": truncated}


def _env(**extra: str) -> dict:
    env = {**os.environ, **extra}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def measure_prepare(data_path: Path, runs_dir: Path, extra: list[str] = ()) -> dict:
    """`python -m harness prepare` on `data_path` in a child process: wall and CPU time, peak RSS.

    `peak_rss_mb` is ru_maxrss: the largest single process (prepare or one of its workers);
    `tree_peak_rss_mb` is the largest sum over the process and its workers, sampled every 0.1 s.
    """
    import psutil

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    cmd = [sys.executable, "-m", "harness", "-q", "prepare", str(SPEC), "--runs-dir", str(runs_dir),
                       "--set", f"data.path={data_path}", *[a for x in extra for a in ("--set", x)]]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tree_peak = 0
    watched = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            tree = [watched, *watched.children(recursive=True)]
            tree_peak = max(tree_peak, sum(p.memory_info().rss for p in tree))
        except psutil.Error:  # a process ended between listing and reading it
            pass
        time.sleep(0.1)
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"prepare failed ({proc.returncode}): {stderr.strip()[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if after.ru_maxrss <= before.ru_maxrss:
        raise SystemExit("prepare's peak RSS is hidden by an earlier, larger child: measure it first")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"command": " ".join(cmd[1:]), "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
            "peak_rss_mb": round(after.ru_maxrss / 1024, 1), "tree_peak_rss_mb": round(tree_peak / 2**20, 1),
            "output_tail": stdout.strip().splitlines()[-12:]}


def measure_first_step(data_path: Path, runs_dir: Path, model: str, max_train: int,
                       timeout_s: float = 1800) -> dict:
    """Seconds from starting `harness run` to its first logged optimizer step (then it is stopped).

    Base scores are cached per run folder so an earlier measurement cannot shorten this one."""
    cmd = [sys.executable, "-m", "harness", "run", str(SPEC), "--runs-dir", str(runs_dir),
                       "--set", f"data.path={data_path}", "--set", f"data.max_train={max_train}",
                       "--set", f"model.base={model}", "--set", "train.logging_steps=1",
                       "--set", "train.eval_fraction=0", "--set", "data.max_heldout=8",
                       "--set", "generation.max_new_tokens=4"]
    runs_dir.mkdir(parents=True, exist_ok=True)
    log_path = runs_dir / "first-step.log"
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=_env(HARNESS_SCORE_CACHE=str(runs_dir / "score-cache")), cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            while True:
                logs = [p for p in runs_dir.glob("*/train_log.jsonl") if p.stat().st_size]
                if logs:
                    elapsed = time.perf_counter() - started
                    break
                if proc.poll() is not None:
                    raise SystemExit(f"run ended before its first step ({proc.returncode}); see {log_path}")
                if time.perf_counter() - started > timeout_s:
                    raise SystemExit(f"no optimizer step after {timeout_s:.0f} s; see {log_path}")
                time.sleep(0.2)
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
    stages = _stage_seconds(logs[0].parent / "manifest.json")
    return {"command": " ".join(cmd[1:]), "first_step_s": round(elapsed, 1), "stages_s": stages,
            "log_tail": log_path.read_text(errors="replace").strip().splitlines()[-6:]}


def _stage_seconds(manifest_path: Path) -> dict:
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return {}
    return dict(manifest.get("timings_s") or {})


def tokenize_one_at_a_time(spec, tokenizer, examples):
    """What harness.training.tokenization.tokenized_dataset did before: two tokenizer calls per example, one process."""
    from datasets import Dataset

    from harness.data.prompts import build_prompt, encode_example

    rows = []
    for ex in examples:
        enc = encode_example(tokenizer, build_prompt(tokenizer, spec.prompt, ex.title), ex.content,
                             spec.train.max_length)
        rows.append({"input_ids": enc.input_ids, "labels": enc.labels})
    return Dataset.from_list(rows)


def measure_tokenize(data_dir: Path, model: str, n: int) -> dict:
    """tokenized_dataset against the encoding it replaced, on the same `n` prepared train examples.

    Both run in this process (CPU seconds count tokenized_dataset's worker processes too), after a
    small warm-up of each so that neither pays for first imports."""
    from harness import models
    from harness.data.prepared import TRAIN_FILE, Example
    from harness.models import base_files
    from harness.spec import load_spec
    from harness.training.tokenization import tokenized_dataset

    spec = load_spec(str(SPEC), [f"model.base={model}"])
    tokenizer = models.load_tokenizer(base_files.resolve_base(model), spec.model,
                                      uses_chat_template=spec.prompt.template is None)
    with open(data_dir / TRAIN_FILE, encoding="utf-8") as fh:  # the first n only: all would be 1.5 GB
        examples = [Example.from_dict(json.loads(line)) for line in itertools.islice(fh, n)]
    out: dict = {"examples": len(examples)}
    for name, fn in (("one_at_a_time", tokenize_one_at_a_time), ("tokenized_dataset", tokenized_dataset)):
        fn(spec, tokenizer, examples[:50])
        cpu, started = _cpu_seconds(), time.perf_counter()
        rows = len(fn(spec, tokenizer, examples))
        out[name] = {"rows": rows, "wall_s": round(time.perf_counter() - started, 1),
                     "cpu_s": round(_cpu_seconds() - cpu, 1)}
    return out


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _tiny_model(folder: Path) -> str:
    from tests.conftest import build_tiny_model

    return str(build_tiny_model(folder))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=FULL_LINES)
    ap.add_argument("--data", type=Path, help="use this file instead of writing a synthetic one")
    ap.add_argument("--first-step", action="store_true", help="also time `run` to its first optimizer step")
    ap.add_argument("--tokenize", action="store_true",
                    help="also time tokenized_dataset against the one-at-a-time encoding on --max-train examples")
    ap.add_argument("--max-train", type=int, default=100_000)
    ap.add_argument("--model", help="model.base for --first-step/--tokenize (default: the tests' tiny model)")
    ap.add_argument("--work", type=Path, help="folder for the data and runs (default: a temp folder)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a spec override for prepare, e.g. --set data.workers=1 (repeatable)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="prepare-memory-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        result: dict = {"cpus": os.cpu_count()}
        data_path = args.data
        if data_path is None:
            data_path = work / "trn.json"
            started = time.perf_counter()
            result["data"] = write_synthetic_trn(data_path, args.lines)
            result["data"]["write_s"] = round(time.perf_counter() - started, 1)
        result["prepare"] = measure_prepare(data_path, work / "runs-prepare", args.overrides)
        model = args.model or (_tiny_model(work / "tiny-model") if args.first_step or args.tokenize else None)
        if args.tokenize:
            prepared = next((work / "runs-prepare").glob("*/data"))
            result["tokenize"] = measure_tokenize(prepared, model, args.max_train)
        if args.first_step:
            result["first_step"] = measure_first_step(data_path, work / "runs-first-step", model, args.max_train)
        text = json.dumps(result, indent=2)
        print(text)
        if args.out:
            args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
