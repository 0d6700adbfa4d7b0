"""`harness generate`: descriptions for one `--title`, for titles typed at a prompt, or for a
whole file (`--input`) or piped stdin.

Files and piped titles go through the batched generator in chunks and come out as JSON Lines,
one object per described input line. With `--output`, each object is appended the moment its
title is done, so an interrupted job keeps every finished description and `--resume` skips
them; the file is put in input order when the job completes.
"""

from __future__ import annotations

import json
import logging
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from contextlib import contextmanager
from typing import BinaryIO, Iterator, TextIO

from harness.data.prompts import FittedPrompt
from harness.data.title_lines import TitleLine, is_jsonl, read_title_lines
from harness.errors import DataError, HarnessError
from harness.io import atomic_writer, os_error_message
from harness.scoring.generation import Generation
from harness.serving.loaded_run import LoadedRun
from harness.spec import GenerationSpec

log = logging.getLogger(__name__)
# Titles per generate call: large enough for full length-sorted batches on a GPU, small enough
# that a million-line input is never tokenized at once (and `--compare` writes every chunk).
CHUNK_TITLES = 1024
EXIT_SOME_LINES_FAILED = 1  # the rest were described; every failed line was named on stderr
BATCH_ONLY = ("output", "resume", "progress", "title_field")


def generate_command(args) -> int:
    """Describe `--title`; else `--input` or piped stdin in batches; else titles typed at a prompt."""
    job = _batch_job(args)  # bad options and files fail before the model loads
    loaded = LoadedRun.load(args.run)
    options = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p}
    gen = loaded.settings(**options)
    if job is not None:
        return job.run(loaded, gen)
    titles = [args.title] if args.title is not None else _prompted_titles()
    for title in titles:
        _print_descriptions(loaded, title, args.compare, options)
    return 0


# -- one title, or titles typed at a prompt -------------------------------------------------------

def _print_descriptions(loaded: LoadedRun, title: str, compare: bool, options: dict) -> None:
    """The tuned description (and, with `compare`, the base one), labelled when there are two;
    streamed word by word on a terminal, unless MBR chooses it among candidates once all are decoded."""
    for label, use_adapter in ([("tuned", True), ("base", False)] if compare else [(None, True)]):
        prefix = f"{label + ':':<7}" if label else ""
        if sys.stdout.isatty() and not loaded.spec.generation.mbr_samples:
            from transformers import TextStreamer

            print(prefix, end="", flush=True)
            streamer = TextStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
            loaded.describe(title, use_adapter=use_adapter, streamer=streamer, **options)
        else:
            print(prefix + loaded.describe(title, use_adapter=use_adapter, **options).text, flush=True)


def _prompted_titles() -> Iterator[str]:
    """Titles typed at `title> `; an empty line or EOF (Ctrl-D) ends the session."""
    while True:
        try:
            title = input("title> ").strip()
        except EOFError:
            print()
            return
        if not title:
            return
        yield title


# -- a file or piped titles -----------------------------------------------------------------------

def _batch_job(args) -> "BatchJob | None":
    """The batch job `args` ask for (None for --title or the prompt), its options and files checked."""
    if args.title is not None and args.input is not None:
        raise HarnessError("generate: give --title or --input, not both")
    if args.title is not None or (args.input is None and sys.stdin.isatty()):
        given = [f"--{name.replace('_', '-')}" for name in BATCH_ONLY if getattr(args, name) not in (None, False)]
        if given:
            raise HarnessError(f"generate: {', '.join(given)} apply to --input FILE or titles piped on stdin")
        return None
    if args.resume and args.output is None:
        raise HarnessError("generate: --resume needs --output (the file to continue)")
    source = _Source("<stdin>", None, jsonl=False, lines=None) if args.input is None else _Source.of(args.input)
    if args.title_field is not None and not source.jsonl:
        raise HarnessError(f"generate: --title-field applies to .jsonl input, not {source.name}")
    sink = _JsonlFile(args.output, args.resume, args.compare) if args.output else _StdoutInInputOrder()
    progress = args.progress or sys.stderr.isatty()
    return BatchJob(source, sink, args.title_field or "title", args.compare, progress)


@dataclass
class _Source:
    name: str  # as messages name it: the path as given, or <stdin>
    path: Path | None  # None: stdin
    jsonl: bool
    lines: int | None  # for the progress bar; unknown for stdin

    @classmethod
    def of(cls, path: Path) -> "_Source":
        jsonl = is_jsonl(path)
        try:
            with open(path, "rb") as fh:
                lines = sum(1 for _ in fh)  # a quick pass, so the progress bar has an end
        except OSError as exc:
            raise DataError(os_error_message(path, exc, "read")) from None
        return cls(str(path), path, jsonl, lines)

    @contextmanager
    def stream(self) -> Iterator[BinaryIO]:
        if self.path is None:
            yield sys.stdin.buffer
            return
        try:
            fh = open(self.path, "rb")
        except OSError as exc:
            raise DataError(os_error_message(self.path, exc, "read")) from None
        with fh:
            yield fh


@dataclass
class BatchJob:
    source: _Source
    sink: "_JsonlFile | _StdoutInInputOrder"
    title_field: str
    compare: bool
    progress: bool

    def run(self, loaded: LoadedRun, gen: GenerationSpec) -> int:
        """Describe every good line; name each bad one on stderr; exit 1 if there were any."""
        from tqdm import tqdm

        passes = 2 if self.compare else 1
        bar = tqdm(total=None if self.source.lines is None else self.source.lines * passes, unit="description",
                   file=sys.stderr, disable=not self.progress, dynamic_ncols=True)
        failed = described = 0
        chunk: list[tuple[TitleLine, FittedPrompt]] = []
        try:
            with self.source.stream() as stream, self.sink:
                for line in read_title_lines(stream, self.source.jsonl, self.title_field):
                    problem = line.problem
                    if problem is None and line.number in self.sink.done:
                        self.sink.check_same_title(line, self.source.name)
                        bar.update(passes)
                        continue
                    if problem is None:
                        try:
                            chunk.append((line, loaded.fit(line.title)))
                        except DataError as exc:
                            problem = str(exc)
                    if problem is not None:
                        failed += 1
                        bar.update(passes)
                        tqdm.write(f"{self.source.name}:{line.number}: {problem}", file=sys.stderr)
                    elif len(chunk) == CHUNK_TITLES:
                        described += self._describe(loaded, gen, chunk, bar)
                        chunk = []
                described += self._describe(loaded, gen, chunk, bar)
        except KeyboardInterrupt:
            if isinstance(self.sink, _JsonlFile):
                log.warning("interrupted: %d descriptions are in %s; add --resume to continue it",
                            len(self.sink.written), self.sink.path)
            raise
        finally:
            bar.close()
        log.info("described %d titles from %s%s", described, self.source.name,
                 f" into {self.sink.path}" if isinstance(self.sink, _JsonlFile) else "")
        if failed:
            log.warning("%d line(s) of %s not described (each named above)", failed, self.source.name)
            return EXIT_SOME_LINES_FAILED
        return 0

    def _describe(self, loaded: LoadedRun, gen: GenerationSpec, chunk: list[tuple[TitleLine, FittedPrompt]],
                  bar) -> int:
        """One batched generate call for the chunk (two with --compare); each record written when done."""
        if not chunk:
            return 0
        prompts = [fitted.text for _, fitted in chunk]
        self.sink.expect([line.number for line, _ in chunk])
        tuned: dict[int, Generation] = {}

        def tuned_done(i: int, result: Generation) -> None:
            bar.update()
            if self.compare:
                tuned[i] = result
            else:
                self.sink.add(chunk[i][0].number, _record(*chunk[i], result))

        def base_done(i: int, result: Generation) -> None:
            bar.update()
            self.sink.add(chunk[i][0].number, _record(*chunk[i], tuned.pop(i), result))

        loaded.generate(prompts, gen, on_done=tuned_done)
        if self.compare:
            loaded.generate(prompts, gen, use_adapter=False, on_done=base_done)
        return len(chunk)


def _record(line: TitleLine, fitted: FittedPrompt, tuned: Generation, base: Generation | None = None) -> dict:
    """One output object: the input line and title, whether the title was cut to fit the run's prompts
    (`title_truncated`), and each description with its length and whether it stopped at max_new_tokens
    (`truncated`)."""
    record = {"line": line.number, "title": line.title, "description": tuned.text, "tokens": tuned.n_tokens,
              "truncated": tuned.hit_max_new_tokens, "title_truncated": fitted.truncated}
    if base is not None:
        record.update(base_description=base.text, base_tokens=base.n_tokens, base_truncated=base.hit_max_new_tokens)
    return record


def _json_line(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"


class _JsonlFile:
    """`--output`: records appended and flushed as they finish, put in input order at the end.

    An interrupted write leaves at most one unfinished last line; `--resume` drops it and skips
    every input line the file already describes.
    """

    def __init__(self, path: Path, resume: bool, compare: bool):
        self.path = Path(path)
        self.done: dict[int, str] = {}  # input line -> its title, from an earlier job
        if self.path.exists() and not resume:
            raise DataError(f"{self.path} exists; add --resume to skip the titles it holds, or choose another --output")
        if self.path.exists():
            self.done = _finished_lines(self.path, compare)
            log.info("resuming %s: %d titles already described", self.path, len(self.done))
        self.written: list[int] = list(self.done)  # input line numbers, in file order
        self._fh: TextIO | None = None

    def __enter__(self) -> "_JsonlFile":
        """Open for appending (only now: a run that fails to load leaves no empty output behind)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")
        except OSError as exc:
            raise DataError(os_error_message(self.path, exc)) from None
        return self

    def __exit__(self, exc_type, *_) -> None:
        """Close; after a complete job, put the file in input-line order (atomically), unless it is."""
        self._fh.close()
        if exc_type is not None or self.written == sorted(self.written):
            return
        with open(self.path, encoding="utf-8") as fh:
            lines = fh.readlines()
        with atomic_writer(self.path) as out:
            out.writelines(text for _, text in sorted(zip(self.written, lines, strict=True), key=lambda pair: pair[0]))

    def check_same_title(self, line: TitleLine, source: str) -> None:
        if self.done[line.number] != line.title:
            raise DataError(f"{self.path}: its line {line.number} has another title than {source}:{line.number}; "
                            "it was written from another input (choose another --output)")

    def expect(self, numbers: list[int]) -> None:
        """Order does not matter while writing: the file is sorted when the job completes."""

    def add(self, number: int, record: dict) -> None:
        self._fh.write(_json_line(record))
        self._fh.flush()
        self.written.append(number)


def _finished_lines(path: Path, compare: bool) -> dict[int, str]:
    """{input line: title} of the records in an earlier job's output; an unfinished last line is cut off."""
    done: dict[int, str] = {}
    offset = 0
    try:
        with open(path, "r+b") as fh:
            for number, raw in enumerate(fh, 1):
                if not raw.endswith(b"\n"):
                    log.warning("%s:%d: unfinished last line (an interrupted write) dropped", path, number)
                    fh.truncate(offset)
                    break
                record = _parse_record(raw)
                if record is None:
                    raise DataError(f"{path}:{number}: not a line `harness generate` wrote; cannot resume into it")
                if ("base_description" in record) != compare:
                    raise DataError(f"{path}: written {'without' if compare else 'with'} --compare; "
                                    "resume it with the same options")
                done[record["line"]] = record["title"]
                offset += len(raw)
    except OSError as exc:
        raise DataError(os_error_message(path, exc, "read")) from None
    return done


def _parse_record(raw: bytes) -> dict | None:
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    if isinstance(record, dict) and isinstance(record.get("line"), int) and isinstance(record.get("title"), str) \
            and isinstance(record.get("description"), str):
        return record
    return None


class _StdoutInInputOrder:
    """No `--output`: records on stdout in input order, each as soon as every earlier line's is out."""

    def __init__(self):
        self.done: dict[int, str] = {}  # nothing to resume on stdout
        self._next: deque[int] = deque()
        self._held: dict[int, dict] = {}

    def expect(self, numbers: list[int]) -> None:
        self._next.extend(numbers)

    def add(self, number: int, record: dict) -> None:
        self._held[number] = record
        while self._next and self._next[0] in self._held:
            sys.stdout.write(_json_line(self._held.pop(self._next.popleft())))
        sys.stdout.flush()

    def __enter__(self) -> "_StdoutInInputOrder":
        return self

    def __exit__(self, *_) -> None:
        """Nothing to close: every expected record was written by `add`, stdout stays open."""
