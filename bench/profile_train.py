"""Where a harness training step spends GPU time: torch.profiler over three optimizer steps of the
bench's harness recipe on the random TinyLlama-1.1B architecture (speed only).

Usage: python bench/profile_train.py MODEL_DIR_WITH_TOKENIZER [BATCH]   (CUDA only)
"""
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness import models  # noqa: E402
from harness.benchmarks import bench  # noqa: E402
from harness.spec import load_spec  # noqa: E402
from harness.training.train import build_trainer, tokenized_dataset  # noqa: E402

folder, batch = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 32
spec = load_spec("amazon_desc", [f"model.base={folder}", "train.max_length=512", "train.packing=on"])
device = models.pick_device()
tokenizer = models.load_tokenizer(folder, spec.model, uses_chat_template=True)
model = bench._random_model_factory(bench.TINYLLAMA_1B, tokenizer, device)("varlen")
data = tokenized_dataset(spec, tokenizer, bench._examples(spec, 4096))
trainer = build_trainer(spec, model, tokenizer, data, None, Path("/tmp/profile-train"), device,
                        **{**bench._recipe_overrides("harness", batch, device), "max_steps": 6})
prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])


class Profile(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        torch.cuda.synchronize()
        if state.global_step == 3:
            prof.start()
        if state.global_step == 6:
            prof.stop()


trainer.add_callback(Profile())
trainer.train()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70))
