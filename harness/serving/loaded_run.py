"""A finished run's tuned model, loaded once for `harness generate` and `harness serve`.

Titles go through the same cleaning, prompt (`harness.data.prompts`) and batched generation
(`harness.scoring.generation.generate`) code that scored the run, so with greedy decoding a served
description is the description the metrics judged.
"""

from __future__ import annotations

import logging
import threading
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

from harness import devices, models
from harness.data.prompts import FittedPrompt, PromptTooLong, fit_prompts
from harness.data.cleaning import clean_text
from harness.errors import DataError, RunError, SpecError
from harness.models import base_files
from harness.runfolder import load_run_spec, trained_adapter
from harness.scoring.generation import Generation, generate
from harness.spec import GenerationSpec, TaskSpec

log = logging.getLogger(__name__)
MAX_TITLE_CHARS = 500  # one limit for the CLI and the HTTP API; real product titles stay far below it


@dataclass
class LoadedRun:
    """A run's spec, tokenizer and base model with its adapter, loaded once for many titles."""

    run_dir: Path
    spec: TaskSpec
    device: devices.Device
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
        adapter_dir = trained_adapter(run_dir)
        device = devices.pick_device()
        model_ref = base_files.resolve_base(spec.model.base)
        log.info("loading %s with the adapter of %s on %s", spec.model.base, run_dir, device.describe())
        tokenizer = models.load_tokenizer(model_ref, spec.model, uses_chat_template=spec.prompt.template is None)
        model = models.load_model(model_ref, spec.model, tokenizer, device)
        model = models.load_adapter(model, adapter_dir, spec.model.allow_pickle)
        return cls(run_dir, spec, device, tokenizer, model, adapter_dir)

    def settings(self, max_new_tokens: int | None = None, temperature: float | None = None,
                 top_p: float | None = None) -> GenerationSpec:
        """The run's generation settings with per-call overrides; temperature None or 0 is greedy, or, when the
        run decodes with MBR (`generation.mbr_samples`), MBR over candidates sampled at the run's temperature
        and top_p (a temperature > 0 samples the candidates at that temperature instead)."""
        if max_new_tokens is not None and max_new_tokens < 1:
            raise SpecError(f"max_new_tokens must be at least 1 (got {max_new_tokens})")
        if temperature is not None and not temperature >= 0:
            raise SpecError(f"temperature must be >= 0 (got {temperature})")
        if top_p is not None and not 0 < top_p <= 1:
            raise SpecError(f"top_p must be in (0, 1] (got {top_p})")
        base = self.spec.generation
        sample = bool(temperature)
        # The dynamic engine: nothing to compile before the first answer, and it streams. On CUDA its
        # batches are as large as the scorer's (a fixed size from the spec, never from free memory).
        rows = base.static_batch_size if self.device.kind == "cuda" else base.batch_size
        return replace(base, max_new_tokens=max_new_tokens or base.max_new_tokens, do_sample=sample,
                       temperature=temperature if sample else base.temperature,
                       top_p=top_p if sample and top_p is not None  # greedy ignores top_p: one value batches
                       else base.top_p if base.mbr_samples else 1.0,
                       engine="dynamic", batch_size=rows)

    def fit(self, title: str, cut: bool = True) -> FittedPrompt:
        """The prompt for a raw title, cleaned as training titles were and cut to fit train.max_length as
        scoring cut them (`cut=False`: PromptTooLong instead); DataError if it cannot be one."""
        if len(title) > MAX_TITLE_CHARS:
            raise DataError(f"the title is {len(title)} characters (the limit is {MAX_TITLE_CHARS})")
        cleaned = clean_text(title)
        if not cleaned:
            raise DataError("the title is empty" + (" once cleaned" if title.strip() else ""))
        (fitted,) = fit_prompts(self.tokenizer, self.spec.prompt, [cleaned], self.spec.train.max_length)
        if fitted.truncated and not cut:
            raise PromptTooLong(fitted.reason(self.spec.train.max_length))
        return fitted

    def generate(self, prompts: Sequence[str], gen: GenerationSpec, use_adapter: bool = True,
                 on_done: Callable[[int, Generation], None] | None = None, streamer=None) -> list[Generation]:
        """Batched generation for `prompts` (results in their order; batch sizes are the generator's
        choice); `use_adapter=False` is the base model."""
        with self._lock, (nullcontext() if use_adapter else self.model.disable_adapter()):
            return generate(self.model, self.tokenizer, prompts, gen, self.device, on_done=on_done, streamer=streamer)

    def describe(self, title: str, max_new_tokens: int | None = None, temperature: float | None = None,
                 top_p: float | None = None, use_adapter: bool = True, streamer=None) -> Generation:
        """One description, generated alone; `streamer` sees tokens as they come."""
        gen = self.settings(max_new_tokens, temperature, top_p)
        fitted = self.fit(title)
        if fitted.truncated:
            log.warning("the title was cut to fit the run's prompts (%d of its prompt's %d tokens kept; "
                        "train.max_length %d)", len(fitted.ids), fitted.full_tokens, self.spec.train.max_length)
        return self.generate([fitted.text], gen, use_adapter, streamer=streamer)[0]
