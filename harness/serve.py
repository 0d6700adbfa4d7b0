"""Use a finished run's tuned model: `harness generate` (terminal) and `harness serve` (HTTP).

Both load the run once into a `LoadedRun` and describe titles through the same cleaning,
prompt (`harness.prompts`) and generation (`harness.generation.generate`) code that scored the
run, so with greedy decoding a served description is the description the metrics judged.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

from fastapi import FastAPI, HTTPException
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, field_validator

from harness import models
from harness.data import clean_text
from harness.errors import HarnessError, RunError, SpecError
from harness.prompts import build_prompt
from harness.run import load_run_spec
from harness.generation import Generation, generate
from harness.spec import GenerationSpec, TaskSpec

log = logging.getLogger(__name__)
ADAPTER_DIR = "adapter"


@dataclass
class LoadedRun:
    """A run's spec, tokenizer and base model with its adapter, loaded once for many titles."""

    run_dir: Path
    spec: TaskSpec
    device: models.Device
    tokenizer: object
    model: object  # a PeftModel: `disable_adapter()` gives the base model without a second copy
    adapter_dir: Path
    # One generation at a time: PEFT's adapter switch and the model itself are shared state.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def load(cls, run_dir: Path) -> "LoadedRun":
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise RunError(f"{run_dir}: no such run folder")
        spec = load_run_spec(run_dir)
        adapter_dir = run_dir / ADAPTER_DIR
        if not (adapter_dir / "adapter_config.json").is_file():
            raise RunError(f"{run_dir}: no trained adapter in {ADAPTER_DIR}/ (unfinished run? "
                           f"finish it with `harness run --resume {run_dir}`)")
        device = models.pick_device()
        model_ref = models.resolve_base(spec.model.base)
        log.info("loading %s with the adapter of %s on %s", spec.model.base, run_dir, device.describe())
        tokenizer = models.load_tokenizer(model_ref, spec.model, uses_chat_template=spec.prompt.template is None)
        model = models.load_model(model_ref, spec.model, tokenizer, device)
        model = models.load_adapter(model, adapter_dir, spec.model.allow_pickle)
        return cls(run_dir, spec, device, tokenizer, model, adapter_dir)

    def settings(self, max_new_tokens: int | None = None, temperature: float | None = None,
                 top_p: float | None = None) -> GenerationSpec:
        """The run's generation settings with per-call overrides; temperature None or 0 is greedy."""
        if max_new_tokens is not None and max_new_tokens < 1:
            raise SpecError(f"max_new_tokens must be at least 1 (got {max_new_tokens})")
        if temperature is not None and not temperature >= 0:
            raise SpecError(f"temperature must be >= 0 (got {temperature})")
        if top_p is not None and not 0 < top_p <= 1:
            raise SpecError(f"top_p must be in (0, 1] (got {top_p})")
        base = self.spec.generation
        sample = bool(temperature)
        return replace(base, max_new_tokens=max_new_tokens or base.max_new_tokens, do_sample=sample,
                       temperature=temperature if sample else base.temperature,
                       top_p=1.0 if top_p is None else top_p, batch_size=1, engine="dynamic")

    def describe(self, title: str, max_new_tokens: int | None = None, temperature: float | None = None,
                 top_p: float | None = None, use_adapter: bool = True, streamer=None) -> Generation:
        """One description; `use_adapter=False` is the base model; `streamer` sees tokens as they come."""
        cleaned = clean_text(title)  # titles were cleaned this way for training and scoring
        if not cleaned:
            raise SpecError("the title is empty")
        prompt = build_prompt(self.tokenizer, self.spec.prompt, cleaned)
        gen = self.settings(max_new_tokens, temperature, top_p)
        with self._lock, (nullcontext() if use_adapter else self.model.disable_adapter()):
            return generate(self.model, self.tokenizer, [prompt], gen, self.device, streamer=streamer)[0]


# -- harness generate ---------------------------------------------------------------------------

def generate_command(args) -> int:
    """Describe `--title`, else stdin titles (one output line each), else titles typed at a prompt."""
    loaded = LoadedRun.load(args.run)
    options = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p}
    loaded.settings(**options)  # bad options fail before any title is read
    stream = sys.stdout.isatty()
    if args.title is not None:
        _print_descriptions(loaded, args.title, args.compare, options, stream, one_line=False)
    elif sys.stdin.isatty():
        for title in _prompted_titles():
            _print_descriptions(loaded, title, args.compare, options, stream, one_line=False)
    else:
        for line in sys.stdin:
            if line.strip():
                _print_descriptions(loaded, line, args.compare, options, stream, one_line=True)
    return 0


def _print_descriptions(loaded: LoadedRun, title: str, compare: bool, options: dict, stream: bool,
                        one_line: bool) -> None:
    """The tuned description (and, with `compare`, the base one), labelled when there are two.

    `one_line` folds line breaks so stdin line N always matches output line N (or pair N).
    """
    for label, use_adapter in ([("tuned", True), ("base", False)] if compare else [(None, True)]):
        prefix = f"{label + ':':<7}" if label else ""
        if stream:
            from transformers import TextStreamer

            print(prefix, end="", flush=True)
            streamer = TextStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
            loaded.describe(title, use_adapter=use_adapter, streamer=streamer, **options)
        else:
            text = loaded.describe(title, use_adapter=use_adapter, **options).text
            print(prefix + (" ".join(text.split()) if one_line else text), flush=True)


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


# -- harness serve ------------------------------------------------------------------------------

class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: str = Field(min_length=1, max_length=500, description="the product title")
    max_new_tokens: int | None = Field(None, ge=1, le=512,
                                       description="default: the run's generation.max_new_tokens")
    temperature: float = Field(0.0, ge=0, le=2, description="0 = greedy (what the run was scored with)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling; used only when temperature > 0")

    @field_validator("title")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the title is blank")
        return value


class GenerateResponse(BaseModel):
    description: str
    model: str = Field(description="the base model, as the run's spec names it")
    adapter: str = Field(description="the adapter folder")
    tokens: int = Field(description="generated tokens, end-of-turn excluded")
    latency_ms: float = Field(description="server time for this request, waiting for earlier ones included")


class Health(BaseModel):
    status: str
    model: str
    adapter: str
    device: str


def create_app(loaded: LoadedRun) -> FastAPI:
    """The HTTP API over one loaded run; OpenAPI docs at /docs."""
    app = FastAPI(title="harness: product descriptions",
                  description=f"The tuned model of run `{loaded.run_dir}`.")
    identity = {"model": loaded.spec.model.base, "adapter": str(loaded.adapter_dir)}

    @app.get("/health", response_model=Health)
    async def health() -> Health:
        return Health(status="ok", device=loaded.device.describe(), **identity)

    @app.post("/generate", response_model=GenerateResponse)
    async def generate_description(request: GenerateRequest) -> GenerateResponse:
        started = time.perf_counter()
        try:
            # In a worker thread so the event loop keeps answering (/health) during generation;
            # LoadedRun's lock makes concurrent requests take turns.
            result = await run_in_threadpool(loaded.describe, request.title, request.max_new_tokens,
                                             request.temperature, request.top_p)
        except HarnessError as exc:  # e.g. a title that is empty once cleaned
            raise HTTPException(status_code=422, detail=str(exc)) from None
        return GenerateResponse(description=result.text, tokens=result.n_tokens,
                                latency_ms=round((time.perf_counter() - started) * 1000, 2), **identity)

    return app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve_command(args) -> int:
    import uvicorn

    if not is_loopback(args.host):
        print(f"harness: warning: serving on {args.host}, not loopback: anyone who can reach this address "
              "can use the model (there is no authentication)", file=sys.stderr)
    loaded = LoadedRun.load(args.run)
    app = create_app(loaded)
    print(f"serving {loaded.run_dir} at http://{args.host}:{args.port} (API docs at /docs; Ctrl-C stops)",
          flush=True)
    with _stop_signals_exit_cleanly():
        try:
            uvicorn.run(app, host=args.host, port=args.port, log_level="info")
        except SystemExit:  # uvicorn exits when it cannot bind; it has logged why
            raise HarnessError(f"cannot serve on {args.host}:{args.port} (see the message above)") from None
    return 0


@contextmanager
def _stop_signals_exit_cleanly():
    """Make Ctrl-C / SIGTERM a normal stop (exit 0).

    uvicorn shuts down gracefully on SIGINT/SIGTERM and then re-raises the signal to the
    previous handler, which would turn a requested stop into exit 130 or death by signal.
    """
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
