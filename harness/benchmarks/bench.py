"""`python -m harness bench TASK`: the harness fast path against the seeds' recipe and Unsloth, measured.

Every recipe trains on the same examples on one device, and every figure is a ratio against a
baseline measured in the same run. Recipes:

- seed:      trl SFTTrainer on prompt/completion strings, batch 2, grad-accum 4, no packing,
             LoRA r=16 on q/k/v/o/gate/up/down (what the notebooks this project replaces do);
- trl_tuned: the same with packing (padding-free) at each --batch: a well-tuned plain trl baseline;
- harness:   harness' own CUDA default (pre-tokenized, padding-free packing, FlashAttention varlen
             kernel, Liger layer kernels, bf16, LoRA inputs kept in bf16, LoRA's up-projection and add
             fused into one GEMM; for a model under 1 GB of weights each step replayed as one CUDA
             graph) at each --batch size;
- harness_sdpa: the same with sdpa attention (a dense block-diagonal mask over the packed row),
             to show what the varlen kernel is worth (only when asked for with --recipes);
- harness_eager: harness with `train.compile: off`, to show what compiling the layers is worth when
             the harness recipe runs with `--set train.compile=on` (only when asked for with --recipes);
- harness_nographs: harness with `train.cuda_graphs: off` (each step launched kernel by kernel), to show
             what replaying the step as a CUDA graph is worth (only when asked for with --recipes);
- unsloth:   Unsloth's FastLanguageModel and its patched trl SFTTrainer on the same pre-tokenized
             examples, LoRA config, packing, batch, sequence length and SFTConfig fields, in its own
             process with its own packages (harness/benchmarks/bench_unsloth.py: Unsloth pins older trl/datasets).
The trl recipes get trl 1.16's chunked LM head, which computes the loss without full-vocabulary logits.

Models (`--only`, `--gen-models`): smollm2 (the task's base model), gemma3 (Gemma 3 270M, real weights,
`--gemma3-base`: a second architecture with sliding-window attention and a 262k vocabulary; the alpaca
prompt, being a base model without a chat template) and tinyllama (a random 1.1B Llama architecture).

Counted the same way for every recipe: tokens are the non-pad tokens of each micro-batch as it
reaches the trainer's training step (the attention mask's sum, or the packed row's length: what
trl itself counts). Steady-state tokens/s covers the optimizer steps after the first --warmup
(warm-up and compilation), with the device synchronised at both ends; the job time runs from
loading the model to the end of training (tokenizing, packing, compiling and all).

Loss check (is a recipe's loss curve unchanged beyond noise?): every recipe trains on the same
batches in the same order (one data seed), and logs its loss every --loss-every steps. The reference
recipe (the first asked of LOSS_REFERENCES) runs again --noise-seeds times with another train.seed
and the same data order: another LoRA initialisation and other dropout masks, the randomness no
result may depend on. The noise band is the largest |loss - reference loss| of those re-seeded runs
at the steps every run logged; each recipe's largest |loss - reference loss| at the same steps is
within noise when it is <= the band. A recipe that changes nothing but the random stream (compiled
dropout draws its masks from inductor's generator, not eager's) lands beyond a band of k re-seeded
runs with chance 1/(k+1), so one run beyond the band is a prompt to look, more --noise-seeds a
sharper test.

FLOPs (stated, since MFU depends on them): PaLM's model FLOPs per trained token
6*N + 12*L*d*T (N parameters without the input embedding, L layers, d hidden size, T the
mean example length, since packed examples do not attend across each other). LoRA computes no
weight gradients for frozen weights, so the work it really needs is 4*N + 8*L*d*T; both MFUs
are reported, against the dense bf16 peak of the device.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from harness import devices
from harness.benchmarks.bench_generation import GENERATION_DOC, format_generation, measure_generation
from harness.benchmarks.bench_train import (BATCHED_RECIPES, RECIPES, SEED_TARGETS, TINYLLAMA_1B, bench_examples,
                                            measure_training, model_folder, qlora_peak_memory, random_model_factory)
from harness.benchmarks.loss_check import LOSS_REFERENCES, loss_check, loss_check_lines, loss_lines, run_name
from harness.benchmarks.train_clock import TrainMeasure
from harness.errors import HarnessError

log = logging.getLogger(__name__)
# The models the bench measures: the task's base model (the embedded SmolLM2 by default), Gemma 3 270M
# (real weights, --gemma3-base: a second architecture, sliding-window attention) and a random
# TinyLlama-1.1B-architecture model. Real-weight models also get the trl_tuned baseline and the loss check
# against it; the random one runs the harness recipes only.
MODEL_PARTS = ("smollm2", "gemma3", "tinyllama")
DEFAULT_PARTS = {"smollm2", "tinyllama", "qlora8b", "generate"}  # gemma3 and serve run when named
OTHER_PARTS = ("qlora8b", "generate", "serve")
GEMMA3_LABEL = "gemma3-270m"


@dataclass
class BenchModel:
    """One model the bench trains and decodes, with the spec (model.base, prompt) and tokenizer it is used with."""

    label: str
    spec: object
    tokenizer: object
    build: object  # attention implementation -> a loaded model
    real_weights: bool  # the trl_tuned baseline runs on it (a random architecture: harness recipes only)
    probe: dict | None = None  # the base model's probe perplexity and prompt template (real weights)


def _real_model(spec, device, embedded_label: str) -> BenchModel:
    """The spec's base model (fetched or converted once), labelled `embedded_label` when it is an embedded one."""
    from harness import models
    from harness.models import base_files

    spec = replace(spec, prompt=replace(spec.prompt))  # settled below for this model alone
    prompt = models.resolve_prompt_template(spec)
    model_ref = base_files.resolve_base(spec.model.base)
    probe = base_files.check_base_probe(spec.model, model_ref)  # no speed figures for a broken model
    tokenizer = models.load_tokenizer(model_ref, spec.model, uses_chat_template=spec.prompt.template is None)

    def build(attention: str = "sdpa"):
        return models.load_model(model_ref, spec.model, tokenizer, device, attn_implementation=attention)

    label = embedded_label if spec.model.base.startswith("embedded:") else Path(spec.model.base).name
    return BenchModel(label, spec, tokenizer, build, real_weights=True, probe={**probe, "prompt_template": prompt})


def gemma3_spec(spec, base: str):
    """The task's spec on Gemma 3 (a base model without a chat template: its prompt is settled in
    `_real_model`, the alpaca preset unless the spec names a template)."""
    return replace(spec, model=replace(spec.model, base=base))


def parse_parts(only: str | None, gen_models: str) -> tuple[set[str], set[str]]:
    """The parts (`--only`) and generation models (`--gen-models`) asked for, each name checked."""
    parts = set(only.split(",")) if only else set(DEFAULT_PARTS)
    if parts - set(MODEL_PARTS) - set(OTHER_PARTS):
        raise HarnessError(f"bench --only: unknown {sorted(parts - set(MODEL_PARTS) - set(OTHER_PARTS))} "
                           f"(known: {', '.join(MODEL_PARTS + OTHER_PARTS)})")
    models = set(gen_models.split(","))
    if models - set(MODEL_PARTS):
        raise HarnessError(f"bench --gen-models: unknown {sorted(models - set(MODEL_PARTS))} "
                           f"(known: {', '.join(MODEL_PARTS)})")
    return parts, models


# -- generation (held-out scoring) ---------------------------------------------------------------


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise HarnessError(f"bench {flag}: expected positive integers separated by commas, got '{text}'")
    return values


def _training_ratios(label: str, rows: list[TrainMeasure]) -> dict[str, float]:
    """Each harness row against the seed row, and against every other recipe at the same batch."""
    ratios = {}
    for h in (r for r in rows if r.recipe == "harness"):
        for base in rows:
            if base.recipe != "seed" and (base.recipe == "harness" or base.batch != h.batch):
                continue
            name = "seed" if base.recipe == "seed" else f"{base.recipe} (batch {base.batch})"
            ratios[f"{label}: harness (batch {h.batch}) / {name} tokens/s"] = h.tokens_per_s / base.tokens_per_s
    return ratios


def bench_command(args) -> int:
    import platform

    from harness.benchmarks.bench_unsloth import UnslothUnavailable, measure_unsloth
    from harness.models import base_files
    from harness.runfolder import package_versions
    from harness.spec import load_spec

    spec = load_spec(args.task, args.overrides)
    device = devices.pick_device()
    if device.kind != "cuda" and not args.quick:
        raise HarnessError("bench: no CUDA device; the benchmark measures the GPU path (use --quick for a CPU smoke test)")
    parts, gen_models = parse_parts(args.only, args.gen_models)
    wanted = set(args.recipes.split(","))
    batches = _int_list(args.batch, "--batch")
    gen_rows = _int_list(args.gen_rows, "--gen-rows") if args.gen_rows else [spec.generation.static_batch_size]
    if args.noise_seeds < 0:
        raise HarnessError(f"bench --noise-seeds: expected 0 or more re-seeded reference runs, got {args.noise_seeds}")
    if wanted - set(RECIPES):
        raise HarnessError(f"bench --recipes: unknown {sorted(wanted - set(RECIPES))} (known: {', '.join(RECIPES)})")
    work = Path(args.work)
    spec = replace(spec, lora=replace(spec.lora, r=16, target_modules=SEED_TARGETS),
                   train=replace(spec.train, max_length=args.max_length))
    base = _real_model(spec, device, "smollm2-135m")
    tokenizer = base.tokenizer
    examples = bench_examples(spec, args.examples)
    results = {"command": "python -m harness " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("__main__.py")
               else " ".join(sys.argv), "device": device.describe(), "platform": platform.platform(),
               "packages": package_versions(), "examples": len(examples), "flops": __doc__.split("FLOPs")[1].strip(),
               "warmup_steps": args.warmup, "train_seed": spec.train.seed, "training": [], "loss_check": [],
               "ratios": {}, "base_probe": {}}
    used = parts | (gen_models if "generate" in parts else set())
    arches = {"smollm2": lambda: base,
              "gemma3": lambda: _real_model(gemma3_spec(spec, args.gemma3_base), device, GEMMA3_LABEL),
              "tinyllama": lambda: BenchModel("tinyllama-1.1b-arch (random)", spec, tokenizer,
                                              random_model_factory(TINYLLAMA_1B, tokenizer, device),
                                              real_weights=False)}
    arches = {key: make() for key, make in arches.items() if key in used}  # only the models asked for are loaded
    results["base_probe"] = {arch.label: arch.probe for arch in arches.values() if arch.probe}
    unsloth_unavailable = None
    for key, arch in arches.items():
        if key not in parts:
            continue
        label, factory = arch.label, arch.build
        recipes = [r for r in RECIPES if r in wanted and (arch.real_weights or r != "trl_tuned")]
        reference = next((r for r in LOSS_REFERENCES if r in recipes), None)
        runs = [(r, b, None) for r in recipes for b in (batches if r in BATCHED_RECIPES else [None])]
        runs += [(reference, b, spec.train.seed + k) for b in batches for k in range(1, args.noise_seeds + 1)
                 if reference]
        rows = []
        part_spec = arch.spec
        if not arch.real_weights and runs:
            # Saved, so that what the spec's switches read from the model's folder (weight size) is this model's.
            folder = model_folder(label, factory, arch.tokenizer, work)
            part_spec = replace(part_spec, model=replace(part_spec.model, base=str(folder), random_weights=True))
        for r, batch, train_seed in runs:
            try:
                if r == "unsloth":
                    if unsloth_unavailable:
                        continue
                    row, results["unsloth_versions"] = measure_unsloth(
                        part_spec, arch.tokenizer, examples, device, label, batch,
                        Path(base_files.resolve_base(part_spec.model.base)),
                        work, args.unsloth_site, args.warmup, args.loss_every)
                    rows.append(row)
                else:
                    rows.append(measure_training(part_spec, factory, arch.tokenizer, examples, r, device, label, batch,
                                                 work, seed_steps=args.seed_steps, warmup=args.warmup,
                                                 loss_every=args.loss_every, train_seed=train_seed))
            except UnslothUnavailable as exc:  # one line, then the other recipes go on
                unsloth_unavailable = f"unsloth: not run ({exc})"
                log.warning("bench: %s", unsloth_unavailable)
                results.setdefault("skipped", []).append(unsloth_unavailable)
            except Exception as exc:  # recorded and shown next to the table, never hidden
                log.error("bench: %s/%s failed: %s: %s", label, r, type(exc).__name__, exc, exc_info=exc)
                results.setdefault("failures", []).append({"model": label, "recipe": r, "batch": batch,
                                                           "train_seed": train_seed or spec.train.seed,
                                                           "error": f"{type(exc).__name__}: {exc}"[:500]})
        results["training"].extend(asdict(r) for r in rows)
        results["ratios"].update(_training_ratios(label, [r for r in rows if r.train_seed == spec.train.seed]))
        if reference:
            results["loss_check"].extend(loss_check([asdict(r) for r in rows], reference, spec.train.seed))
    if "generate" in parts:
        results["generation_method"] = GENERATION_DOC
        results["generation"] = {}
        for key, arch in arches.items():
            if key not in gen_models:
                continue
            if not arch.real_weights and device.kind != "cuda":
                log.info("bench: TinyLlama-architecture generation skipped on CPU (1.1B parameters)")
                continue
            model = arch.build()
            loop = None
            for rows in gen_rows:
                rows_spec = replace(arch.spec, generation=replace(arch.spec.generation, static_batch_size=rows))
                measured, loop = measure_generation(rows_spec, model, arch.tokenizer, examples[: args.gen_examples],
                                                    device, loop_n=min(args.loop_examples, args.gen_examples),
                                                    loop=loop)
                name = arch.label if len(gen_rows) == 1 else f"{arch.label}, {rows} rows"
                results["generation"][name] = measured
                results["ratios"].update({f"{name} generation: {k} tokens/s": v for k, v in measured["ratios"].items()})
            del model
            if device.kind == "cuda":
                import torch

                torch.cuda.empty_cache()
    if "serve" in parts:  # opt-in (--only serve): harness/benchmarks/bench_serve.py
        from harness.benchmarks.bench_serve import measure_serving

        results["serve"] = measure_serving(spec, tokenizer, [e.title for e in examples], device, work)
        results["ratios"]["serve: batched / serial requests/s"] = results["serve"]["ratio"]
    if "qlora8b" in parts and device.kind == "cuda":
        results["qlora"] = qlora_peak_memory(spec, tokenizer, device, 2048, work)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from harness.io import atomic_write_json

    atomic_write_json(args.out, results)
    print(format_results(results))
    return 0


def format_results(results: dict) -> str:
    lines = [f"device: {results['device']}", f"command: {results['command']}",
             "harness process: " + ", ".join(f"{k} {v}" for k, v in results["packages"].items() if v),
             *(["unsloth process: " + ", ".join(f"{k} {v}" for k, v in results["unsloth_versions"].items() if v)]
               if "unsloth_versions" in results else []),
             f"tokens/s: steady state, after {results['warmup_steps']} warm-up optimizer steps; "
             "job s: model load to end of training", "",
             "| model | recipe | batch | attention | tokens/s | step s | job s | peak GB | MFU (6N) | MFU (4N, LoRA) "
             "| steps |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    pct = lambda v: "n/a" if v is None or math.isnan(v) else f"{v:.1%}"  # noqa: E731
    for r in results["training"]:
        lines.append(f"| {r['model']} | {run_name(r, results['train_seed'])} | {r['batch']} | {r['attention']} | "
                     f"{r['tokens_per_s']:,.0f} | {r['step_time_s']:.3f} | {r['job_s']:.1f} | {r['peak_mem_gb']:.2f} | "
                     f"{pct(r['mfu_palm'])} | {pct(r['mfu_lora'])} | {r['optimizer_steps']} |")
    lines += loss_lines(results["training"], results["train_seed"])
    lines += loss_check_lines(results["loss_check"])
    lines += [f"note {r['model']}/{run_name(r, results['train_seed'])} (batch {r['batch']}): {r['notes']}"
              for r in results["training"] if r.get("notes")]
    lines += results.get("skipped", [])
    for label, g in results.get("generation", {}).items():
        lines += format_generation(label, g)
    if "qlora" in results:
        q = results["qlora"]
        lines += ["", f"QLoRA {q['model']} at {q['seq_len']} tokens: peak {q['peak_mem_gb']:.2f} GB "
                      f"(weights {q['weights_loaded_gb']:.2f} GB)"]
    if "serve" in results:
        from harness.benchmarks.bench_serve import format_serving

        lines += format_serving(results["serve"])
    lines += [f"FAILED {f['model']}/{f['recipe']}: {f['error']}" for f in results.get("failures", [])]
    lines += ["", "ratios:"] + [f"  {k}: {v:.2f}x" for k, v in results["ratios"].items()]
    return "\n".join(lines)
