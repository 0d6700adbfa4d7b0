"""Where does GPU time go? Launch overhead, forward, and a plain PEFT train step (no trl),
on a random SmolLM2-135M-architecture model saved with the tests' word-level tokenizer."""
import os
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.conftest import build_tiny_model  # noqa: E402

folder = Path(sys.argv[1])
build_tiny_model(folder)
from transformers import AutoTokenizer  # noqa: E402

tok = AutoTokenizer.from_pretrained(folder)
cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
m = LlamaForCausalLM(cfg).to(torch.bfloat16)
m.save_pretrained(folder)
m = m.cuda()
print("cpus", os.cpu_count(), "torch threads", torch.get_num_threads(), "attn", m.config._attn_implementation)
x = torch.randint(100, 10000, (16, 256), device="cuda")
a = torch.zeros(1, device="cuda")
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(2000):
    a += 1
torch.cuda.synchronize(); print("launch us", (time.perf_counter() - t) / 2000 * 1e6)
with torch.no_grad():
    for _ in range(3):
        m(x)
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(10):
        m(x)
    torch.cuda.synchronize(); print("fwd 16x256 ms", (time.perf_counter() - t) / 10 * 1e3)
from peft import LoraConfig, get_peft_model  # noqa: E402

pm = get_peft_model(m, LoraConfig(r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"]))
opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)
for i in range(13):
    if i == 3:
        torch.cuda.synchronize(); t = time.perf_counter()
    loss = pm(input_ids=x, labels=x).loss
    loss.backward(); opt.step(); opt.zero_grad()
torch.cuda.synchronize(); dt = (time.perf_counter() - t) / 10
print("plain peft train step 16x256 ms", dt * 1e3, "tok/s", 16 * 256 / dt)
