"""`harness serve`: a run's tuned model over HTTP, with concurrent requests micro-batched.

The model is loaded once into a `LoadedRun`; requests are validated on the event loop and
handed to a `MicroBatcher`, whose single worker thread generates the requests that arrive
together in one batched call (`harness/serving/microbatch.py` says how batches form), while the event
loop keeps answering `/health` and `/stats`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import signal
import sys
import time
from contextlib import asynccontextmanager, contextmanager

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict, Field, field_validator

from harness.errors import HarnessError
from harness.serving.loaded_run import MAX_TITLE_CHARS, LoadedRun
from harness.serving.microbatch import MicroBatcher

MAX_WINDOW_MS = 1000.0  # a longer wait would add seconds to every request that comes alone


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: str = Field(min_length=1, max_length=MAX_TITLE_CHARS, description="the product title")
    max_new_tokens: int | None = Field(None, ge=1, le=512,
                                       description="default: the run's generation.max_new_tokens")
    temperature: float = Field(0.0, ge=0, le=2, description="0 = the decoding the run was scored with (greedy, "
                               "or MBR over candidates sampled at the run's temperature when its spec sets "
                               "generation.mbr_samples); > 0 samples (MBR's candidates) at this temperature")
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
    latency_ms: float = Field(description="server time for this request, its wait for a batch included")
    batch_size: int = Field(description="requests generated in the same call as this one")


class Batching(BaseModel):
    window_ms: float = Field(description="how long a batch gathers requests once the model is free")
    max_batch: int = Field(description="most requests generated in one call")


class Health(BaseModel):
    status: str
    model: str
    adapter: str
    device: str
    batching: Batching


class Stats(BaseModel):
    requests: int = Field(description="requests generated since start")
    generate_calls: int
    largest_batch: int
    mean_batch_size: float
    batch_sizes: dict[str, int] = Field(description="requests in one call -> number of such calls")


def create_app(loaded: LoadedRun, window_ms: float, max_batch: int) -> FastAPI:
    """The HTTP API over one loaded run; OpenAPI docs at /docs."""
    batcher = MicroBatcher(lambda prompts, gen: loaded.generate(prompts, gen), window_ms / 1000, max_batch)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        batcher.start()
        try:
            yield
        finally:  # uvicorn has let in-flight requests finish by now
            batcher.stop()

    app = FastAPI(title="harness: product descriptions", lifespan=lifespan,
                  description=f"The tuned model of run `{loaded.run_dir}`.")
    identity = {"model": loaded.spec.model.base, "adapter": str(loaded.adapter_dir)}
    batching = Batching(window_ms=window_ms, max_batch=max_batch)

    @app.get("/health", response_model=Health)
    async def health() -> Health:
        return Health(status="ok", device=loaded.device.describe(), batching=batching, **identity)

    @app.get("/stats", response_model=Stats)
    async def stats() -> Stats:
        return Stats(**batcher.stats())

    @app.post("/generate", response_model=GenerateResponse)
    async def generate_description(request: GenerateRequest) -> GenerateResponse:
        started = time.perf_counter()
        try:
            # A title too long for the run's prompts is refused, not cut: the caller learns that the
            # description would not be of the title it sent (`generate` cuts, and flags the record).
            prompt = loaded.fit(request.title, cut=False).text
            settings = loaded.settings(request.max_new_tokens, request.temperature, request.top_p)
        except HarnessError as exc:  # e.g. a title that is empty once cleaned, or too long for the prompt
            raise HTTPException(status_code=422, detail=str(exc)) from None
        try:
            served = await asyncio.wrap_future(batcher.submit(prompt, settings))
        except Exception as exc:  # the batcher logged it; the client learns what failed
            raise HTTPException(status_code=500, detail=f"generation failed: {type(exc).__name__}: {exc}") from None
        return GenerateResponse(description=served.generation.text, tokens=served.generation.n_tokens,
                                batch_size=served.batch_size,
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
    if not 0 <= args.batch_window_ms <= MAX_WINDOW_MS:
        raise HarnessError(f"serve: --batch-window-ms must be between 0 and {MAX_WINDOW_MS:g} "
                           f"(got {args.batch_window_ms:g})")
    if args.max_batch < 1:
        raise HarnessError(f"serve: --max-batch must be at least 1 (got {args.max_batch})")
    loaded = LoadedRun.load(args.run)
    app = create_app(loaded, args.batch_window_ms, args.max_batch)
    print(f"serving {loaded.run_dir} at http://{args.host}:{args.port} (API docs at /docs; Ctrl-C stops); "
          f"batches of up to {args.max_batch} requests gathered for {args.batch_window_ms:g} ms", flush=True)
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
