"""The GPU fast path's building blocks, checked on CPU where they can be."""

import pytest
import torch

from harness import models
from harness.spec import ModelSpec, TaskSpec
from harness.train import fast_path_options


@pytest.mark.parametrize("attention", ["sdpa", "flex_attention"])
def test_packed_sequences_do_not_attend_across_examples(tiny_model_dir, attention):
    """Padding-free packing: position_ids restart per example and the mask becomes block-causal.

    transformers builds that mask from position_ids only without a KV cache; trl's SFTTrainer passes
    use_cache=False in training, as this test does."""
    tokenizer = models.load_tokenizer(str(tiny_model_dir), ModelSpec(), uses_chat_template=True)
    model = models.load_model(str(tiny_model_dir), ModelSpec(), tokenizer, models.Device("cpu"),
                              attn_implementation=attention)
    a = torch.tensor([[5, 9, 14, 3, 22]])
    b = torch.tensor([[7, 8, 30, 31, 12, 40, 41]])
    with torch.no_grad():
        alone_b = model(input_ids=b).logits
        packed = model(input_ids=torch.cat([a, b], dim=1),
                       position_ids=torch.cat([torch.arange(5), torch.arange(7)]).unsqueeze(0), use_cache=False).logits
        leaky = model(input_ids=torch.cat([a, b], dim=1), use_cache=False).logits  # no restart: b attends to a
    torch.testing.assert_close(packed[:, 5:], alone_b, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(leaky[:, 5:], alone_b, atol=1e-3)


def test_trl_padding_free_collator_restarts_positions():
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    batch = collate([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4, 5], "labels": [-100, 5]}])
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100, 5]]


def test_fast_paths_are_cuda_only_by_default(tiny_model_dir):
    spec = TaskSpec(name="t")
    spec.model.base = str(tiny_model_dir)
    assert fast_path_options(spec, models.Device("cpu")) == {"quantize": False, "packing": False,
                                                              "liger_kernels": False, "attention": "sdpa"}
    spec.train.packing = "on"
    assert fast_path_options(spec, models.Device("cpu"))["packing"] is True
