"""train.fused_lora: LoRA's up-projection, scaling and add as one addmm, the same function as PEFT's."""

import pytest
import torch

from harness.training.fused_lora import FusedAddVariant, fusable_layers, fused_lora_add


def _peft_model(dropout: float):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give the branch something to add
            torch.nn.init.normal_(p, std=0.1)
    return model


def _loss_and_grads(model, ids, fused: bool):
    model.zero_grad()
    torch.manual_seed(1)  # the same dropout masks for both paths
    with fused_lora_add(model, fused):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_layers_compute_what_peft_computes(dropout):
    model = _peft_model(dropout).train()
    ids = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(2))
    plain_loss, plain_grads = _loss_and_grads(model, ids, fused=False)
    fused_loss, fused_grads = _loss_and_grads(model, ids, fused=True)
    assert len(fusable_layers(model)) == 14  # 7 projections x 2 layers
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-6, atol=1e-6)
    assert plain_grads.keys() == fused_grads.keys() and len(plain_grads) == 28
    for name in plain_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], rtol=1e-5, atol=1e-6)


def test_the_fused_path_is_used_inside_the_block_and_gone_after_it(monkeypatch):
    model = _peft_model(0.0)
    calls = []
    forward = FusedAddVariant.forward
    monkeypatch.setattr(FusedAddVariant, "forward", staticmethod(lambda *a, **k: calls.append(1) or forward(*a, **k)))
    ids = torch.randint(0, 64, (1, 5))
    with fused_lora_add(model) as n:
        model(input_ids=ids)
        assert n == 14 and len(calls) == 14
        with pytest.raises(Exception, match="merge after training"):
            model.merge_adapter()
    model(input_ids=ids)
    assert len(calls) == 14  # plain PEFT again: merging, saving and scoring never see the variant
    assert not any(layer.lora_variant for layer in fusable_layers(model))
    model.merge_adapter()


def test_a_training_run_with_the_fused_path_logs_the_losses_of_plain_peft(tiny_model_dir, tmp_path, monkeypatch):
    import json

    from tests.conftest import run_tiny

    calls = []
    forward = FusedAddVariant.forward
    monkeypatch.setattr(FusedAddVariant, "forward", staticmethod(lambda *a, **k: calls.append(1) or forward(*a, **k)))

    def losses(flag):
        calls.clear()
        run_dir = run_tiny(tmp_path / flag, tiny_model_dir, f"train.fused_lora={flag}", "train.logging_steps=1")
        rows = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r], len(calls)

    (on, on_calls), (off, off_calls) = losses("on"), losses("off")
    assert on_calls > 0 and off_calls == 0  # the run trained through the fused path only when asked
    assert len(on) == len(off) >= 3
    assert on == pytest.approx(off, rel=1e-5)
