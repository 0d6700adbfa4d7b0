"""The generation bench: every scoring engine over the same prompts in one process, its tokens/s, the
compile or capture cost amortised, the memory-bandwidth bound and how often two engines agree.

GENERATION_DOC says what each scorer is.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

log = logging.getLogger(__name__)


GENERATION_DOC = """Generation scorers, each over the same prompts, greedy, in one process:
loop = the seeds' loop (dynamic engine, one prompt at a time, first --loop-examples prompts);
dynamic = transformers' dynamic cache in length-sorted batches of generation.static_batch_size;
static = the static engine uncompiled (same batches and cache as fast: the eager reference);
fast = the static cache with decoding compiled into CUDA graphs (generation.engine compiled; auto
uses graphs on CUDA: see harness/scoring/generation.py), called twice: the first call compiles (cold), the second reuses the compiled code (warm).
graphs = the static engine's batches decoded by harness' own greedy loop, each step captured once per
shape as a CUDA graph (generation.engine graphs, harness/scoring/graph_decoding.py; uncaptured off CUDA), one
call: its tokens/s includes the capture; without capture = tokens / (seconds - capture seconds).
Compile cost c = cold seconds - warm seconds (graphs: c = capture seconds, decoding s = seconds - c).
Amortised over a held-out set of N = 1,000 examples: tokens/s = (N * tokens/n) / (N * decoding s/n + c),
n = prompts measured, decoding s = warm seconds for fast.
Memory-bandwidth bound (a decode step reads every weight once): tokens/s <= rows * HBM bandwidth /
weight bytes; with the static KV cache read too: rows * bandwidth / (weight bytes + rows * cache
length * KV bytes per token), at the narrowest static shape; fast and graphs shares use their rates
without compile or capture."""


HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12, "L4": 0.3e12}


AMORTISE_EXAMPLES = 1000


def _hbm_bandwidth(device) -> float | None:
    import torch

    if device.kind != "cuda":
        return None
    name = torch.cuda.get_device_name(device.index)
    return next((v for k, v in HBM_BYTES_PER_S.items() if k in name), None)


def _bandwidth_bounds(model, device, rows: int, width: int, max_new_tokens: int) -> dict:
    """Generated tokens/s no decoder can beat at `rows` sequences per step (see GENERATION_DOC)."""
    cfg = model.config
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    itemsize = next(model.parameters()).element_size()
    kv_per_token = 2 * cfg.num_hidden_layers * (cfg.num_key_value_heads or cfg.num_attention_heads) * head_dim * itemsize
    kv_bytes = rows * (width + max_new_tokens) * kv_per_token
    bandwidth = _hbm_bandwidth(device)
    return {"weight_bytes": weight_bytes, "kv_cache_bytes": kv_bytes, "hbm_bytes_per_s": bandwidth, "rows": rows,
            "weights_only_tokens_per_s": rows * bandwidth / weight_bytes if bandwidth else None,
            "with_kv_tokens_per_s": rows * bandwidth / (weight_bytes + kv_bytes) if bandwidth else None}


def _time_generation(model, tokenizer, prompts, gen, device) -> tuple[list, dict]:
    import torch

    from harness.scoring.decoding import GenerationStats
    from harness.scoring.generation import generate

    stats = GenerationStats()
    if device.kind == "cuda":
        torch.cuda.synchronize(device.index)
    started = time.perf_counter()
    out = generate(model, tokenizer, prompts, gen, device, stats=stats)
    if device.kind == "cuda":
        torch.cuda.synchronize(device.index)
    seconds = time.perf_counter() - started
    tokens = sum(g.n_tokens for g in out)
    return out, {"engine": stats.engine, "rows": max((s[0] for s in stats.shapes), default=gen.batch_size),
                 "examples": len(prompts), "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                 "warmup_s": stats.warmup_s, "shapes": stats.shapes}


def _identical(a: list, b: list) -> float:
    n = min(len(a), len(b))
    return sum(x.text == y.text for x, y in zip(a[:n], b[:n])) / n


def _amortised(row: dict, setup_s: float, decoding_s: float) -> float:
    """Tokens/s over AMORTISE_EXAMPLES examples at this row's rate, paying `setup_s` once (GENERATION_DOC)."""
    scale = AMORTISE_EXAMPLES / row["examples"]
    return scale * row["tokens"] / (scale * decoding_s + setup_s)


def measure_generation(spec, model, tokenizer, examples, device, loop_n: int,
                       loop: tuple[list, dict] | None = None) -> tuple[dict, tuple[list, dict] | None]:
    """Every scorer of GENERATION_DOC on the same prompts; a scorer that fails is recorded, the others still run.

    `loop` (outputs, row) reuses a one-at-a-time measurement from an earlier call (it does not depend on the
    batch rows); the loop measurement used is returned for the next call."""
    from harness.data.prompts import build_prompt
    from harness.scoring.generation import generate

    prompts = [build_prompt(tokenizer, spec.prompt, e.title) for e in examples]
    gen = spec.generation
    fast = "compiled" if device.kind == "cuda" else "static"  # CPU (--quick): the same path, uncompiled
    scorers = [("loop", prompts[:loop_n], replace(gen, engine="dynamic", batch_size=1)),
               ("dynamic", prompts, replace(gen, engine="dynamic", batch_size=gen.static_batch_size)),
               ("static", prompts, replace(gen, engine="static")),
               ("fast_cold", prompts, replace(gen, engine=fast)),
               ("fast", prompts, replace(gen, engine=fast)),
               ("graphs", prompts, replace(gen, engine="graphs"))]
    generate(model, tokenizer, prompts[:4], scorers[0][2], device)  # warm-up: CUDA context, eager kernels
    rows, outputs, failures = {}, {}, []
    if loop is not None:
        outputs["loop"], rows["loop"] = loop
        scorers = scorers[1:]
    for name, subset, engine_gen in scorers:
        try:
            outputs[name], rows[name] = _time_generation(model, tokenizer, subset, engine_gen, device)
        except Exception as exc:  # recorded and printed next to the table, never hidden
            log.error("bench: generation %s failed: %s: %s", name, type(exc).__name__, exc)
            failures.append({"scorer": name, "error": f"{type(exc).__name__}: {exc}"[:500]})
    result = {"max_new_tokens": gen.max_new_tokens, "do_sample": gen.do_sample, "scorers": rows, "failures": failures,
              "ratios": {}, "identical_outputs_share": {}}
    for name in ("dynamic", "static", "fast"):  # graphs: _graphs_ratios
        if name in rows and "loop" in rows:
            result["ratios"][f"{name} / loop"] = rows[name]["tokens_per_s"] / rows["loop"]["tokens_per_s"]
    rates = {}  # tokens/s without compile or capture, for the bandwidth shares
    if "fast" in rows and "fast_cold" in rows:
        warm, cold = rows["fast"], rows["fast_cold"]
        compile_s = max(cold["seconds"] - warm["seconds"], 0.0)
        result["compile_s"] = compile_s
        result["amortised_tokens_per_s"] = _amortised(warm, compile_s, warm["seconds"])
        rates["fast"] = warm["tokens_per_s"]
        if "dynamic" in rows:
            result["ratios"]["fast / dynamic"] = warm["tokens_per_s"] / rows["dynamic"]["tokens_per_s"]
        for base in ("loop", "dynamic"):
            if base in rows:
                result["ratios"][f"fast, compile amortised over {AMORTISE_EXAMPLES:,} / {base}"] = \
                    result["amortised_tokens_per_s"] / rows[base]["tokens_per_s"]
    if "graphs" in rows:
        result["graphs"] = _graphs_figures(rows["graphs"])
        rates["graphs"] = result["graphs"]["tokens_per_s_without_capture"]
        result["ratios"].update(_graphs_ratios(result, rows))
    shaped = next((rows[n] for n in ("fast", "graphs", "static") if n in rows and rows[n]["shapes"]), None)
    if shaped is not None:
        narrowest = shaped["shapes"][-1]
        bounds = _bandwidth_bounds(model, device, narrowest[0], narrowest[1], gen.max_new_tokens)
        for name, rate in rates.items():
            for key in ("weights_only", "with_kv"):
                bound = bounds[f"{key}_tokens_per_s"]
                bounds[f"{name}_share_of_{key}_bound"] = rate / bound if bound else None
        result["bandwidth_bound"] = bounds
    for one, other in [("fast", "static"), ("fast", "dynamic"), ("fast", "loop"), ("fast", "fast_cold"),
                       ("graphs", "static"), ("graphs", "loop"), ("graphs", "fast")]:
        if one in outputs and other in outputs:
            result["identical_outputs_share"][f"{one} vs {other}"] = _identical(outputs[one], outputs[other])
    return result, (outputs["loop"], rows["loop"]) if "loop" in rows else None


def _graphs_figures(row: dict) -> dict:
    """The graphs engine's one call split into capture and decoding (GENERATION_DOC)."""
    capture_s = row["warmup_s"]
    decoding_s = row["seconds"] - capture_s
    return {"capture_s": capture_s, "tokens_per_s_with_capture": row["tokens_per_s"],
            "tokens_per_s_without_capture": row["tokens"] / decoding_s,
            "amortised_tokens_per_s": _amortised(row, capture_s, decoding_s)}


def _graphs_ratios(result: dict, rows: dict) -> dict[str, float]:
    """The graphs engine against every baseline: its measured rate (capture included) and amortised rate."""
    g = result["graphs"]
    ratios = {}
    for base in ("loop", "dynamic", "static"):
        if base in rows:
            ratios[f"graphs (capture included) / {base}"] = g["tokens_per_s_with_capture"] / rows[base]["tokens_per_s"]
            ratios[f"graphs, capture amortised over {AMORTISE_EXAMPLES:,} / {base}"] = \
                g["amortised_tokens_per_s"] / rows[base]["tokens_per_s"]
    if "amortised_tokens_per_s" in result:
        ratios["graphs / fast, both amortised"] = g["amortised_tokens_per_s"] / result["amortised_tokens_per_s"]
        ratios["graphs without capture / fast warm"] = g["tokens_per_s_without_capture"] / rows["fast"]["tokens_per_s"]
    return ratios


SCORER_NAMES = {"loop": "one at a time (seeds' loop)", "dynamic": "dynamic cache, batched",
                "static": "static cache, eager", "fast_cold": "fast, first call (compiles)", "fast": "fast, warm",
                "graphs": "graphs (own loop, CUDA graphs)"}


def format_generation(label: str, g: dict) -> list[str]:
    decoding = "sampled" if g["do_sample"] else "greedy"
    lines = ["", f"generation, {label} ({decoding}, max_new_tokens {g['max_new_tokens']}):",
             "| scorer | engine | rows | examples | tokens | seconds | tokens/s | warm-up s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in g["scorers"].items():
        lines.append(f"| {SCORER_NAMES[name]} | {r['engine']} | {r['rows']} | {r['examples']} | {r['tokens']:,} | "
                     f"{r['seconds']:.2f} | {r['tokens_per_s']:,.0f} | {r['warmup_s']:.1f} |")
    if "compile_s" in g:
        lines.append(f"compile cost c = cold - warm seconds = {g['compile_s']:.1f} s; fast with compile amortised over "
                     f"N = {AMORTISE_EXAMPLES:,} examples, (N * tokens/n) / (N * warm s/n + c): "
                     f"{g['amortised_tokens_per_s']:,.0f} tokens/s")
    if "graphs" in g:
        r = g["graphs"]
        lines.append(f"graphs: capture c = {r['capture_s']:.2f} s; {r['tokens_per_s_with_capture']:,.0f} tokens/s with "
                     f"capture, {r['tokens_per_s_without_capture']:,.0f} without; capture amortised over "
                     f"N = {AMORTISE_EXAMPLES:,} examples: {r['amortised_tokens_per_s']:,.0f} tokens/s")
    if "bandwidth_bound" in g:
        b = g["bandwidth_bound"]
        if b["hbm_bytes_per_s"]:
            shares = lambda key: ", ".join(f"{n} reaches {b[f'{n}_share_of_{key}_bound']:.1%}"  # noqa: E731
                                           for n in ("fast", "graphs") if f"{n}_share_of_{key}_bound" in b)
            lines.append(f"bandwidth bound, rows x {b['hbm_bytes_per_s'] / 1e12:.2f} TB/s / bytes read per step, at "
                         f"{b['rows']} rows: weights only ({b['weight_bytes'] / 1e9:.2f} GB) "
                         f"{b['weights_only_tokens_per_s']:,.0f} tokens/s, {shares('weights_only')}; weights + static "
                         f"KV cache ({b['kv_cache_bytes'] / 1e9:.2f} GB) {b['with_kv_tokens_per_s']:,.0f} tokens/s, "
                         f"{shares('with_kv')}")
        else:
            lines.append("bandwidth bound: n/a (no known HBM bandwidth for this device)")
    lines += [f"ratio {k}: {v:.2f}x" for k, v in g["ratios"].items()]
    lines += [f"identical outputs {k}: {v:.0%}" for k, v in g["identical_outputs_share"].items()]
    lines += [f"FAILED generation {f['scorer']}: {f['error']}" for f in g["failures"]]
    return lines
