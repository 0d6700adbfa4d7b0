"""Do harness's fast paths keep Gemma 3's sliding window? Checked on the GPU (random weights, real shape).

Usage: python bench/sliding_window_check.py [--lengths 600,1000,750,820] [--rows 16] [--skip-decode]

A Gemma 3 270M-shaped model (hidden 640, 18 layers, 4 query heads, 1 key/value head, head_dim 256, window
512 on five of every six layers, vocabulary 262,144 tied, two RoPE thetas), random weights, LoRA r=16 on
every projection (random B, so every LoRA weight gets a gradient).

1. Kernel semantics, exact: with zero queries (uniform attention) and one-hot values, FlashAttention's varlen
   kernel's output shows which keys each query sees. harness's window_size=(W-1, 0) must give exactly
   transformers' own sliding mask for window W (masking_utils.sliding_window_causal_mask_function), and
   (W, 0) must not (the off-by-one the check guards against).
2. The model on one packed row of examples longer than the window (--lengths, tokens): logits and LoRA
   gradients of the summed per-example loss, against the model's own attention in float32 (eager, each
   example alone). Rows: the model's own bf16 sdpa on each example alone (what bf16 itself costs: E),
   harness's windowed varlen kernel on the packed row, sdpa on the packed row (transformers' position_ids
   mask: what `auto` falls back to without the kernel), and the full-causal kernel on every layer (the old
   behaviour), and where liger-kernel is installed, harness's training path: Liger's kernels as trl applies
   them (transformers' apply_liger_kernel: gemma3_text's RMSNorm with offset 1, GeGLU, RoPE; fused loss off)
   with the windowed kernel. Tolerance: varlen, packed sdpa and Liger within 2 E of float32 on the logits and
   the gradients
   (bf16 keeps 8 significant bits; another kernel sums in another order, so its error is of E's size, not
   E's value); the old kernel beyond 5 E on the positions past the window (or the check has no teeth).
3. Decoding (float32, so that no near-tie in bf16 decides a token): the graphs engine, captured as a CUDA
   graph, decodes --rows left-padded prompts of 470-560 tokens for 96 new tokens (crossing the window)
   and must give transformers' own greedy `generate` tokens on every row; with its window mask removed it
   must not (teeth).
Prints a table and a PASS/FAIL line.
"""
import argparse
import copy
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import devices  # noqa: E402
from harness.models import attention  # noqa: E402
from harness.scoring import graph_decoding  # noqa: E402
from harness.scoring.decoding import GenerationStats  # noqa: E402
from harness.spec import GenerationSpec  # noqa: E402
from harness.training.model_patches import modeling_module_restored  # noqa: E402

WINDOW = 512
BF16_FACTOR, TEETH_FACTOR = 2.0, 5.0
DEVICE = "cuda"  # the CPU smoke test (tests/test_sliding_window.py) runs checks 2 and 3 on "cpu", small


def gemma3_config(**overrides):
    from transformers import Gemma3TextConfig

    layer_types = ["sliding_attention"] * 5 + ["full_attention"]
    return Gemma3TextConfig(**{**dict(
        vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=WINDOW,
        layer_types=layer_types * 3, max_position_embeddings=32768, rope_theta=1_000_000.0,
        rope_local_base_freq=10_000.0, final_logit_softcapping=None, attn_logit_softcapping=None,
        tie_word_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=0), **overrides})


# -- 1. the kernel's window against transformers' mask ------------------------------------------------
def seen_keys(window_size: tuple[int, int], length: int) -> torch.Tensor:
    """[length, length] bool: which keys each query attends to under the kernel with this window_size."""
    from torch.nn.attention.varlen import varlen_attn

    dim = 64 * ((length + 63) // 64)
    assert dim <= 256, "one-hot values need head_dim >= length"
    q = torch.zeros(length, 1, dim, device=DEVICE, dtype=torch.bfloat16)
    k = torch.randn(length, 1, dim, device=DEVICE, dtype=torch.bfloat16)
    v = torch.eye(length, dim, device=DEVICE, dtype=torch.bfloat16).unsqueeze(1)
    cu = torch.tensor([0, length], dtype=torch.int32, device=DEVICE)
    out = varlen_attn(q, k, v, cu, cu, length, length, window_size=window_size)
    return out[:, 0, :length].float() > 0


def transformers_sliding(window: int, length: int) -> torch.Tensor:
    from transformers.masking_utils import sliding_window_causal_mask_function

    allowed = sliding_window_causal_mask_function(window)
    positions = torch.arange(length, device=DEVICE)
    zero = positions.new_zeros(())
    return allowed(zero, zero, positions[:, None], positions[None, :]).expand(length, length)


def kernel_check() -> list[dict]:
    rows = []
    for window, length in ((4, 16), (8, 40), (64, 200)):
        expected = transformers_sliding(window, length)
        ours = seen_keys(attention.kernel_window(window), length)
        off_by_one = seen_keys((window, 0), length)
        rows.append({"window": window, "length": length, "harness (W-1, 0) equals transformers": bool(
            torch.equal(ours, expected)), "(W, 0) differs": not torch.equal(off_by_one, expected)})
    return rows


# -- 2. the model on packed rows ----------------------------------------------------------------------
def lora_model(config):
    from peft import LoraConfig, get_peft_model
    from transformers import Gemma3ForCausalLM

    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = Gemma3ForCausalLM(config).float()
    torch.manual_seed(1)
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, init_lora_weights=False, task_type="CAUSAL_LM",
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"]))


def variant(master, dtype, implementation: str):
    model = copy.deepcopy(master).to(dtype)
    model.get_base_model().set_attn_implementation(implementation)
    return model


def loss_sum(logits, ids, lengths) -> torch.Tensor:
    total, start = 0.0, 0
    for n in lengths:
        part = logits[start:start + n].float()
        total = total + torch.nn.functional.cross_entropy(part[:-1], ids[start + 1:start + n], reduction="sum")
        start += n
    return total


def grads(model) -> torch.Tensor:
    return torch.cat([p.grad.float().flatten() for n, p in model.named_parameters() if p.requires_grad])


def run(model, ids, lengths, packed: bool):
    """Logits [tokens, vocab] (float32, on CPU to keep GPU memory free) and the LoRA gradient vector."""
    model.zero_grad(set_to_none=True)
    if packed:
        positions = torch.cat([torch.arange(n, device=DEVICE) for n in lengths]).unsqueeze(0)
        logits = model(input_ids=ids.unsqueeze(0), position_ids=positions, use_cache=False).logits[0]
    else:
        starts = [0, *torch.tensor(lengths).cumsum(0).tolist()]
        logits = torch.cat([model(input_ids=ids[s:e].unsqueeze(0), use_cache=False).logits[0]
                            for s, e in zip(starts[:-1], starts[1:])])
    loss_sum(logits, ids, lengths).backward()
    out = logits.detach().float().cpu(), grads(model).cpu()
    del logits
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return out


LIGER_CASE = "harness training path: Liger kernels (gemma3_text, as trl applies them) + windowed varlen, packed"


def liger_available() -> bool:
    import importlib.util

    return DEVICE == "cuda" and importlib.util.find_spec("liger_kernel") is not None


def with_liger(model) -> None:
    """Liger's kernels on `model` as the Trainer applies them under trl (its fused loss off)."""
    from transformers.integrations.liger import apply_liger_kernel

    apply_liger_kernel(model, {"fused_linear_cross_entropy": False})


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def past_window(lengths, window: int) -> torch.Tensor:
    return torch.cat([torch.arange(n) >= window for n in lengths])


def model_check(lengths: list[int], config) -> tuple[list[dict], dict]:
    attention.register()
    master = lora_model(config)
    torch.manual_seed(2)
    ids = torch.randint(3, config.vocab_size, (sum(lengths),), device=DEVICE)
    late = past_window(lengths, config.sliding_window)
    reference_logits, reference_grads = run(variant(master, torch.float32, "eager"), ids, lengths, packed=False)
    cases = [("own attention, bf16 sdpa, each example alone (E)", "sdpa", False, None),
             ("harness varlen, windowed, packed", "varlen", True, None),
             ("sdpa, packed (position_ids mask)", "sdpa", True, None),
             ("old: full-causal varlen on every layer, packed", "varlen", True, lambda module, kwargs: None)]
    if liger_available():
        cases.append((LIGER_CASE, "varlen", True, None))
    rows = []
    for name, implementation, packed, window in cases:
        saved = attention.layer_window
        if window is not None:
            attention.layer_window = window
        model = variant(master, torch.bfloat16, implementation)
        try:
            with modeling_module_restored(model):  # Liger patches the Gemma 3 modeling module too
                if name == LIGER_CASE:
                    with_liger(model)
                logits, grad = run(model, ids, lengths, packed)
        finally:
            attention.layer_window = saved
        rows.append({"case": name, "logits rel. err": rel(logits, reference_logits),
                     "logits rel. err past the window": rel(logits[late], reference_logits[late]),
                     "LoRA grad rel. err": rel(grad, reference_grads)})
    e = rows[0]
    bounds = {"logits": BF16_FACTOR * e["logits rel. err"], "grads": BF16_FACTOR * e["LoRA grad rel. err"],
              "teeth": TEETH_FACTOR * e["logits rel. err past the window"]}
    return rows, bounds


# -- 3. decoding -------------------------------------------------------------------------------------
def decode_check(rows: int, config, prompt_lengths: tuple[int, int] = (470, 560), max_new_tokens: int = 96) -> dict:
    from transformers import Gemma3ForCausalLM

    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = Gemma3ForCausalLM(config).float().eval()
    model.set_attn_implementation("sdpa")
    torch.manual_seed(3)
    lengths = torch.randint(prompt_lengths[0], prompt_lengths[1] + 1, (rows,)).tolist()
    width = max(lengths)
    ids = torch.zeros((rows, width), dtype=torch.long, device=DEVICE)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        ids[r, width - n:] = torch.randint(3, config.vocab_size, (n,), device=DEVICE)
        mask[r, width - n:] = 1
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                  eos_token_id=config.eos_token_id, pad_token_id=0,
                                  disable_compile=True)[:, width:]  # eager, as the graphs engine's kernels
    expected = torch.nn.functional.pad(expected, (0, max_new_tokens - expected.shape[1])).tolist()
    tokenizer = types.SimpleNamespace(eos_token_id=config.eos_token_id, pad_token_id=0)
    gen = GenerationSpec(max_new_tokens=max_new_tokens, engine="graphs", static_batch_size=rows)
    device = devices.Device("cuda", torch.cuda.current_device()) if DEVICE == "cuda" else devices.Device("cpu")

    def graphs() -> tuple[list, GenerationStats]:
        stats = GenerationStats()
        with torch.no_grad():
            return graph_decoding.GraphDecoder(model, tokenizer, gen, device, stats)(ids, mask), stats

    windowed, stats = graphs()
    saved = graph_decoding.masked_window
    graph_decoding.masked_window = lambda config: 10**6  # every layer sees every column
    try:
        unwindowed, _ = graphs()
    finally:
        graph_decoding.masked_window = saved
    return {"rows": rows, "prompt tokens": f"{min(lengths)}-{max(lengths)}", "new tokens": max_new_tokens,
            "captured": stats.warmup_s > 0 if DEVICE == "cuda" else "uncaptured (CPU)",
            "graphs = transformers generate (rows)": sum(a == b for a, b in zip(windowed, expected)),
            "graphs without window = generate (rows)": sum(a == b for a, b in zip(unwindowed, expected))}


def table(rows: list[dict]) -> str:
    keys = list(rows[0])
    fmt = lambda v: f"{v:.2e}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    return "\n".join(lines + ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="600,1000,750,820", help="example lengths in the packed row (tokens)")
    parser.add_argument("--rows", type=int, default=16, help="prompts decoded together in the decoding check")
    parser.add_argument("--skip-decode", action="store_true")
    args = parser.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]
    if not torch.cuda.is_available():
        print("FAIL: needs a CUDA device (FlashAttention's varlen kernel)")
        return 2
    if "window_size" not in attention.kernel_parameters():
        print(f"FAIL: PyTorch {torch.__version__}'s varlen kernel has no window_size: harness refuses varlen for "
              "sliding-window models here (auto -> sdpa)")
        return 1
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.cuda.get_device_name()}")
    failures = []

    kernel = kernel_check()
    print("\n1. kernel window semantics (exact)\n" + table(kernel))
    failures += [f"kernel window {r['window']}" for r in kernel
                 if not (r["harness (W-1, 0) equals transformers"] and r["(W, 0) differs"])]

    rows, bounds = model_check(lengths, gemma3_config())
    print(f"\n2. Gemma 3 270M shape, random weights, packed row of {lengths} tokens (window {WINDOW}); errors "
          "relative to float32 eager on each example alone\n" + table(rows))
    print(f"bounds: logits <= {bounds['logits']:.2e}, gradients <= {bounds['grads']:.2e} ({BF16_FACTOR:g} E); "
          f"old kernel past the window > {bounds['teeth']:.2e} ({TEETH_FACTOR:g} E)")
    for r in rows[1:3] + rows[4:]:
        if r["logits rel. err"] > bounds["logits"] or r["LoRA grad rel. err"] > bounds["grads"]:
            failures.append(r["case"])
    if not liger_available():
        print("(liger-kernel not installed: the Liger row is left out)")
    if rows[3]["logits rel. err past the window"] <= bounds["teeth"]:
        failures.append("the old full-causal kernel is not told apart (no teeth)")

    if not args.skip_decode:
        decode = decode_check(args.rows, gemma3_config())
        print("\n3. graphs decoding, float32, captured\n" + table([decode]))
        if not decode["captured"] or decode["graphs = transformers generate (rows)"] != decode["rows"]:
            failures.append("graphs decoding differs from transformers' generate")
        if decode["graphs without window = generate (rows)"] == decode["rows"]:
            failures.append("decoding without the window is not told apart (no teeth)")

    print("\nPASS" if not failures else "\nFAIL: " + "; ".join(failures))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
