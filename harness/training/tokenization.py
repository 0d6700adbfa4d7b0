"""Training examples as token rows for trl: prompts fitted to train.max_length (long titles cut or their
examples left out, and counted), labels masked to the description, tokenized in parallel."""

from __future__ import annotations

from harness.data.prompts import encode_fitted, fit_prompts
from harness.spec import TaskSpec

_TOKENIZE_PER_PROCESS = 5_000  # fewer examples per process do not repay starting one


def tokenized_dataset(spec: TaskSpec, tokenizer, examples):
    """input_ids/labels rows (harness.data.prompts.encode_fitted) with a progress bar; a title whose prompt
    leaves too little room within train.max_length is cut, or its example dropped (`train.long_prompts`)."""
    return tokenize_counting(spec, tokenizer, examples)[0]


def tokenize_counting(spec: TaskSpec, tokenizer, examples) -> tuple[object, dict]:
    """tokenized_dataset, and how many titles it cut (`truncated`) or dropped (`skipped`), counted as it goes.

    Batched tokenizer calls, spread by datasets.map over up to one process per CPU core: a
    100k-example set takes seconds on a 16-core machine rather than minutes in one process.
    """
    import os
    import uuid

    from datasets import Dataset

    titles = [ex.title for ex in examples]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cpus = max(1, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))  # the host's other ranks tokenize too
    procs = min(cpus, len(titles) // _TOKENIZE_PER_PROCESS)
    dataset = Dataset.from_dict({"title": titles, "content": [ex.content for ex in examples]}).map(
        _encode_batch, batched=True, remove_columns=["title", "content"], num_proc=procs if procs > 1 else None,
        fn_kwargs={"tokenizer": tokenizer, "prompt": spec.prompt, "max_length": spec.train.max_length,
                   "skip_long": spec.train.long_prompts == "skip"},
        # An in-memory dataset has no cache to key; naming the result skips hashing the tokenizer.
        new_fingerprint=uuid.uuid4().hex, desc="tokenizing")
    counts = {"truncated": sum(dataset["title_cut"]) if len(dataset) else 0, "skipped": len(titles) - len(dataset)}
    # With every example dropped, map returns a dataset without columns.
    return (dataset.remove_columns("title_cut") if len(dataset) else dataset), counts


def _encode_batch(batch: dict, tokenizer, prompt, max_length: int, skip_long: bool) -> dict:
    fitted = fit_prompts(tokenizer, prompt, batch["title"], max_length)
    keep = [i for i, f in enumerate(fitted) if not (skip_long and f.truncated)]
    encoded = encode_fitted(tokenizer, [fitted[i] for i in keep], [batch["content"][i] for i in keep], max_length)
    return {"input_ids": [e.input_ids for e in encoded], "labels": [e.labels for e in encoded],
            "title_cut": [fitted[i].truncated for i in keep]}


def split_eval(examples: list, fraction: float) -> tuple[list, list]:
    """A small validation slice from the training side (never the held-out split)."""
    n_eval = int(len(examples) * fraction)
    if fraction <= 0 or n_eval < 1:
        return examples, []
    return examples[n_eval:], examples[:n_eval]
