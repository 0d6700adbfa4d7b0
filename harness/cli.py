"""`python -m harness` / `harness`: the command line.

Exit codes: 0 success; 1 a regression found by `check`, or input lines `generate` could not
describe (named on stderr; the rest were described); 2 bad input or a result that cannot
be judged (one line on stderr, no traceback); 3 an unexpected crash (traceback); 4 a broken
base model: its perplexity on the shipped probe text is absurd (scrambled or random weights, a bad
GGUF conversion) and the spec does not say `model.random_weights: true` (one line, no verdict given);
130 interrupted (the run folder says where to resume).
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from harness import distributed
from harness.errors import HarnessError

EXIT_CRASH = 3
EXIT_INTERRUPTED = 130
# Commands that run in several processes under torchrun / accelerate launch (harness.distributed).
DISTRIBUTED = ("run", "eval", "check")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the argument (exit 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec value, e.g. --set train.lr=1e-4 (repeatable)")


def _add_models(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", metavar="BASE,BASE,...",
                   help="several base models (model.base values), each in turn on the same data, then their "
                        "leaderboard; a model's own settings: --set model@NAME.section.key=value")


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got '{text}'")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="harness", description="Evaluation-centric LoRA fine-tuning harness.")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("run", help="prepare data, train, score base and tuned, write reports")
    p.add_argument("task", nargs="?", help="task name in tasks/ or a spec path")
    p.add_argument("--resume", type=Path, metavar="RUN", help="continue an interrupted run folder")
    p.add_argument("--runs-dir", type=Path, default=Path("runs"))
    p.add_argument("--gpus", type=_positive_int, metavar="N",
                   help="data-parallel on N GPUs of this host: the same command relaunched under torchrun")
    _add_models(p)
    _add_overrides(p)

    p = sub.add_parser("eval", help="score adapters made elsewhere (or merged models) against the base; no training")
    p.add_argument("task", help="task name in tasks/ or a spec path")
    p.add_argument("--adapter", dest="adapters", action="append", required=True, type=Path, metavar="DIR",
                   help="a PEFT adapter folder, a run folder or a merged model folder (repeatable: compared)")
    p.add_argument("--runs-dir", type=Path, default=Path("runs"))
    _add_overrides(p)

    p = sub.add_parser("sweep", help="choose settings on a validation slice of train; "
                                     "score the winner once on held-out")
    p.add_argument("task", nargs="?", help="task name in tasks/ or a spec path")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="values to try for one train.*/lora.*/generation.* key, e.g. --grid train.lr=1e-4,3e-4 "
                        "(repeatable; a grid runs every combination)")
    p.add_argument("--storage", metavar="URL", help="optuna storage that several machines share, e.g. "
                   "postgresql://user@host/db (default: a SQLite file in the sweep folder)")
    p.add_argument("--resume", type=Path, metavar="SWEEP_DIR", help="continue an interrupted sweep folder")
    p.add_argument("--sweeps-dir", type=Path, default=Path("sweeps"))
    p.add_argument("--runs-dir", type=Path, default=Path("runs"), help="where the winner's run folder goes")
    _add_models(p)
    _add_overrides(p)

    p = sub.add_parser("validate", help="check a task spec without running it")
    p.add_argument("task")
    _add_overrides(p)

    p = sub.add_parser("prepare", help="clean and split the data; print counts")
    p.add_argument("task")
    p.add_argument("--strict", action="store_true", help="stop at the first bad line")
    p.add_argument("--runs-dir", type=Path, default=Path("runs"))
    _add_overrides(p)

    p = sub.add_parser("report", help="render HTML and Markdown reports from run folders")
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN")
    p.add_argument("--out", type=Path, help="output folder (default: the first run folder)")

    p = sub.add_parser("compare", help="leaderboard of several runs' models on their shared held-out split")
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_OR_EVAL",
                   help="run folders, or eval folders (each candidate counts as a model)")
    p.add_argument("--out", type=Path, help="output folder (default: a new folder under comparisons/)")
    p.add_argument("--rank-by", default="rougeL", metavar="METRIC", help="metric of the ranking (default rougeL)")

    p = sub.add_parser("check", help="regression-check a candidate adapter against a baseline")
    p.add_argument("task")
    p.add_argument("--candidate", required=True, type=Path, help="adapter folder or run folder")
    p.add_argument("--baseline", required=True, type=Path, help="baseline file, adapter folder or run folder")
    p.add_argument("--out", type=Path, default=Path("gate-results"), help="folder for verdict.json/.md/junit.xml")
    _add_overrides(p)

    p = sub.add_parser("baseline", help="write a committed baseline file from a run")
    p.add_argument("run", type=Path)
    p.add_argument("--out", required=True, type=Path)

    p = sub.add_parser("generate", help="write descriptions with a run's tuned model")
    p.add_argument("run", type=Path)
    p.add_argument("--title", help="a product title (default: --input, titles piped on stdin, or a prompt)")
    p.add_argument("--input", type=Path, metavar="FILE",
                   help="titles to describe in batches: .txt (one a line) or .jsonl (objects with a title field)")
    p.add_argument("--output", type=Path, metavar="FILE",
                   help="JSON Lines output, written as titles finish (default: stdout, in input order)")
    p.add_argument("--resume", action="store_true", help="continue --output: skip the input lines it describes")
    p.add_argument("--title-field", metavar="NAME", help="the .jsonl field holding the title (default: title)")
    p.add_argument("--progress", action="store_true", help="progress bar on stderr even when it is not a terminal")
    p.add_argument("--compare", action="store_true", help="also write the base model's description")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)

    p = sub.add_parser("serve", help="serve a run's tuned model over HTTP")
    p.add_argument("run", type=Path)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    # 10 ms is little next to one generation (hundreds of ms) and enough for a burst to gather.
    p.add_argument("--batch-window-ms", type=float, default=10.0,
                   help="how long a batch gathers requests once the model is free (default %(default)g; 0: no wait)")
    p.add_argument("--max-batch", type=int, default=64,
                   help="most requests generated together (default %(default)s; 1: one at a time)")

    p = sub.add_parser("bench", help="GPU benchmark: seed recipe vs harness (training and scoring)")
    p.add_argument("task")
    p.add_argument("--out", type=Path, default=Path("bench/results.json"))
    p.add_argument("--quick", action="store_true", help="allow a CPU smoke test (numbers mean nothing there)")
    p.add_argument("--only", help="comma-separated parts: smollm2,tinyllama,qlora8b,generate (default: all); "
                                  "gemma3 (Gemma 3 270M, --gemma3-base) and serve (HTTP micro-batching) run only "
                                  "when named")
    p.add_argument("--recipes", default="seed,trl_tuned,harness",
                   help="comma-separated training recipes: seed,trl_tuned,harness_sdpa,harness_nographs,harness_eager,"
                        "harness,unsloth "
                        "(default: seed,trl_tuned,harness)")
    p.add_argument("--examples", type=int, default=2048, help="training examples per recipe (default 2048)")
    p.add_argument("--max-length", type=int, default=512, help="token length of a (packed) sequence (default 512)")
    p.add_argument("--seed-steps", type=int, default=40, help="optimizer steps timed for the seed recipe (default 40)")
    p.add_argument("--batch", default="16,32",
                   help="packed sequences per step for trl_tuned, harness and unsloth, comma-separated (default 16,32)")
    p.add_argument("--warmup", type=int, default=5,
                   help="optimizer steps left out of the steady-state rate (warm-up, compilation; default 5)")
    p.add_argument("--loss-every", type=int, default=10, help="log the training loss every N steps (default 10)")
    p.add_argument("--noise-seeds", type=int, default=1,
                   help="re-seeded runs of the loss check's reference recipe at each batch: the noise band "
                        "(default 1; 0: no loss verdict)")
    p.add_argument("--unsloth-site", help="folder holding Unsloth and its pinned trl/datasets (pip install --target): "
                                          "put first on the unsloth recipe's path")
    p.add_argument("--gen-examples", type=int, default=512, help="prompts for the batched scorers (default 512)")
    p.add_argument("--loop-examples", type=int, default=32, help="prompts for the one-at-a-time loop (default 32)")
    p.add_argument("--gen-rows", help="rows per static batch for the generation scorers, comma-separated, each "
                                      "measured in turn (default: the task's generation.static_batch_size)")
    p.add_argument("--gen-models", default="smollm2,tinyllama",
                   help="models the generation part measures, comma-separated: smollm2,gemma3,tinyllama "
                        "(default %(default)s)")
    p.add_argument("--gemma3-base", default="embedded:gemma3-270m",
                   help="the gemma3 part's model: embedded name or folder (default %(default)s; the alpaca prompt "
                        "unless --set prompt.template names another)")
    p.add_argument("--work", default="/tmp/harness-bench", help="scratch folder (checkpoints, random 8B weights)")
    _add_overrides(p)

    p = sub.add_parser("export", help="the run's base model with its adapter merged: a transformers folder to deploy")
    p.add_argument("run", type=Path)
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="a new folder for the merged model")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16",
                   help="weight dtype of the export (default %(default)s; the merge itself runs in fp32)")
    p.add_argument("--dequantize", action="store_true",
                   help="QLoRA runs only: merge into the de-quantized nf4 base the adapter learned on (the 4-bit "
                        "rounding stays in the weights; needs CUDA and bitsandbytes)")

    p = sub.add_parser("fetch-model", help="fetch, convert and probe an embedded model (once)")
    p.add_argument("name", nargs="?", help="the embedded model (default: the default model, "
                                           "smollm2-135m-instruct; also gemma3-270m)")
    return parser


def _cmd_run(args) -> int:
    from harness.recipes import compare
    from harness.reporting.leaderboard import folder_summary
    from harness.recipes.run import run_task, summary_line

    if bool(args.task) == bool(args.resume):
        raise HarnessError("run: give a TASK, or --resume RUN (not both)")
    if args.models or (args.resume and compare.is_models_folder(args.resume)):
        if args.gpus or distributed.world_size() > 1:
            raise HarnessError("run --models: runs its models in one process; leave out --gpus and the launcher")
        if args.resume and (args.models or args.overrides):
            raise HarnessError("run --resume: the models and --set values are recorded in the folder; give neither")
        with _sigterm_interrupts():
            folder = compare.run_models(args.task, args.models, args.overrides, args.runs_dir, resume=args.resume)
        print("\n".join(folder_summary(folder)))
        return 0
    if args.gpus and args.gpus != distributed.world_size():
        if distributed.world_size() > 1:
            raise HarnessError(f"run --gpus {args.gpus}: the launcher started {distributed.world_size()} "
                               "processes; give --gpus or a launcher, not both")
        distributed.relaunch(args.gpus, args.argv)
    with _sigterm_interrupts():
        run_dir = run_task(args.task, args.overrides, args.runs_dir, resume=args.resume)
    if not distributed.is_main():
        return 0
    print(f"run folder: {run_dir}")
    print(summary_line(run_dir))
    print(f"reports: {run_dir / 'report.html'}  {run_dir / 'report.md'}")
    return 0


def _cmd_eval(args) -> int:
    from harness.recipes.eval import eval_task, summary_lines

    with _sigterm_interrupts():
        run_dir = eval_task(args.task, args.adapters, args.overrides, args.runs_dir)
    if not distributed.is_main():
        return 0
    print(f"run folder: {run_dir}")
    print("\n".join(summary_lines(run_dir)))
    print(f"reports: {run_dir / 'report.html'}  {run_dir / 'report.md'}")
    return 0


def _cmd_sweep(args) -> int:
    from harness.recipes import compare
    from harness.reporting.leaderboard import folder_summary
    from harness.recipes.sweep import summary_lines, sweep_task

    if bool(args.task) == bool(args.resume):
        raise HarnessError("sweep: give a TASK, or --resume SWEEP_DIR (not both)")
    if args.resume and (args.grid or args.overrides):
        raise HarnessError("sweep --resume: the grid and --set values are recorded in the sweep folder; give neither")
    if args.resume and args.models:
        raise HarnessError("sweep --resume: the models are recorded in the sweep folder; leave out --models")
    if args.models or (args.resume and compare.is_sweep_models_folder(args.resume)):
        with _sigterm_interrupts():
            folder = compare.sweep_models(args.task, args.models, args.grid, args.overrides, args.sweeps_dir,
                                          args.runs_dir, storage=args.storage, resume=args.resume)
        print("\n".join(folder_summary(folder)))
        return 0
    with _sigterm_interrupts():
        sweep_dir = sweep_task(args.task, args.grid, args.overrides, args.sweeps_dir, args.runs_dir,
                               storage=args.storage, resume=args.resume)
    print("\n".join(summary_lines(sweep_dir)))
    return 0


@contextmanager
def _sigterm_interrupts():
    """SIGTERM outside training (which saves a checkpoint first) acts like Ctrl-C: run marked interrupted, exit 130."""
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler) if _main_thread() else None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _cmd_validate(args) -> int:
    from harness.spec import load_spec

    spec = load_spec(args.task, args.overrides)
    missing = [str(p) for p in spec.data_paths() if not any(p.parent.glob(p.name))]
    if missing:
        raise HarnessError(f"{args.task}: data.path: no file matches {missing[0]}")
    print(f"{args.task}: ok ({len(spec.data_paths())} data path(s), base model {spec.model.base})")
    return 0


def _cmd_prepare(args) -> int:
    from harness.data.prepared import write_prepared
    from harness.data.records import format_counts, prepare
    from harness.runfolder import Manifest, new_run_dir
    from harness.spec import load_spec

    overrides = args.overrides + (["data.strict=true"] if args.strict else [])
    spec = load_spec(args.task, overrides)
    prepared = prepare(spec)
    run_dir = new_run_dir(args.runs_dir, f"{spec.name}-prepare")
    write_prepared(prepared, run_dir / "data")
    Manifest.create(run_dir, spec.name).update(status="prepared", data_counts=prepared.counts)
    print(format_counts(prepared.counts))
    print(f"prepared split: {run_dir / 'data'}")
    return 0


def _cmd_report(args) -> int:
    from harness.reporting.report import write_reports

    html, md = write_reports(args.runs, args.out or args.runs[0])
    print(f"{html}\n{md}")
    return 0


def _cmd_compare(args) -> int:
    from harness.reporting.leaderboard import summary_lines, write_leaderboard

    # Named now, created only once the leaderboard is computed: a refusal leaves no empty folder.
    out = args.out or Path("comparisons") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    doc, paths = write_leaderboard(args.runs, out, args.rank_by)
    print("\n".join(summary_lines(doc)))
    print("\n".join(str(p) for p in paths))
    return 0


def _cmd_check(args) -> int:
    from harness.recipes.check import run_check

    return run_check(args.task, args.candidate, args.baseline, args.out, args.overrides)


def _cmd_baseline(args) -> int:
    from harness.recipes.check import write_baseline

    print(write_baseline(args.run, args.out))
    return 0


def _cmd_generate(args) -> int:
    from harness.serving.generate_cli import generate_command

    return generate_command(args)


def _cmd_serve(args) -> int:
    from harness.serving.serve import serve_command

    return serve_command(args)


def _cmd_bench(args) -> int:
    from harness.benchmarks.bench import bench_command

    return bench_command(args)


def _cmd_export(args) -> int:
    from harness.recipes.export import export_run, summary

    print(summary(export_run(args.run, args.out, args.dtype, args.dequantize)))
    return 0


def _cmd_fetch_model(args) -> int:
    from harness.models.base_files import embedded_model, fetch_embedded
    from harness.spec import EMBEDDED_MODEL

    print(fetch_embedded(embedded_model(f"embedded:{args.name}" if args.name else EMBEDDED_MODEL)))
    return 0


COMMANDS = {"run": _cmd_run, "eval": _cmd_eval, "validate": _cmd_validate, "prepare": _cmd_prepare,
            "report": _cmd_report, "check": _cmd_check, "baseline": _cmd_baseline, "generate": _cmd_generate,
            "serve": _cmd_serve, "bench": _cmd_bench, "fetch-model": _cmd_fetch_model,
            "sweep": _cmd_sweep, "compare": _cmd_compare, "export": _cmd_export}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="harness: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # rouge-score says "Using default tokenizer." per call
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # cuBLAS is deterministic only with a fixed workspace, read at its first call (decoding.deterministic_kernels).
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    try:
        if distributed.world_size() > 1:
            if args.command not in DISTRIBUTED:
                raise HarnessError(f"{args.command}: runs in one process; start it without torchrun or "
                                   f"accelerate launch (those run: {', '.join(DISTRIBUTED)})")
            distributed.init()
        return COMMANDS[args.command](args)
    except HarnessError as exc:
        if not isinstance(exc, distributed.MainFailed):  # rank 0 printed that one
            rank = f"[rank {distributed.rank()}]" if not distributed.is_main() else ""
            print(f"harness{rank}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("harness: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception:
        import traceback

        traceback.print_exc()
        print("harness: crashed (this is a bug in harness or a library; exit 3)", file=sys.stderr)
        return EXIT_CRASH
    finally:
        distributed.finish()
