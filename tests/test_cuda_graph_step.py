"""train.cuda_graphs: what can be checked without a GPU -- the switch's resolution, the fixed-shape
batch, and that the step's own loss, gradients and logged metrics are trl's (the capture itself runs
on the GPU machine: bench/graph_step_check.py, bench/RESULTS.md)."""

import pytest
import torch

from harness import devices, models
from harness.errors import HarnessError
from harness.training.cuda_graph_step import StaticBatch, capture_training_steps, sft_loss
from harness.training.fast_paths import fast_path_options, graph_blockers


def _trl_batch(*examples):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(
        [{"input_ids": ids, "labels": labels} for ids, labels in examples])


def test_graphs_are_off_on_cpu_and_on_refuses_it(tiny_model_dir):
    from harness.spec import TaskSpec

    spec = TaskSpec(name="t")
    spec.model.base = str(tiny_model_dir)
    assert fast_path_options(spec, devices.Device("cpu"))["cuda_graphs"] is False
    spec.train.cuda_graphs = "on"
    with pytest.raises(HarnessError, match="cuda_graphs: 'on' needs a CUDA device"):
        fast_path_options(spec, devices.Device("cpu"))


def test_every_blocker_is_named():
    from harness.spec import TaskSpec

    spec = TaskSpec(name="t")
    ready = {"packing": True, "attention": "varlen", "quantize": False}
    assert graph_blockers(spec, ready, cuda=True) == []
    spec.train.grad_accum = 2
    spec.train.gradient_checkpointing = True
    assert graph_blockers(spec, {**ready, "attention": "sdpa", "quantize": True}, cuda=False) == [
        "a CUDA device", "packing with the varlen attention kernel (fixed-shape packed batches)",
        "train.grad_accum 1 (a captured backward overwrites gradients)",
        "no nf4 quantization (bitsandbytes kernels are not checked under capture)",
        "gradient_checkpointing off (its recompute re-seeds the generator)"]


def test_a_packed_batch_is_padded_with_self_contained_masked_filler():
    batch = _trl_batch(([1, 2, 3], [-100, 2, 3]), ([4, 5], [-100, 5]))
    static = StaticBatch(rows=2, max_length=4, max_sequences=6, pad_token_id=9, device="cpu")
    assert static.fill(batch) == 5
    assert static.input_ids.tolist() == [[1, 2, 3, 4, 5, 9, 9, 9]]
    assert static.labels.tolist() == [[-100, 2, 3, -100, 5, -100, -100, -100]]
    # the filler (3 tokens, within max_length 4) restarts its positions: it attends only to itself
    assert static.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    # two examples, one filler sequence, then empty sequences up to the fixed count
    assert static.cu_seq_lens.tolist() == [0, 3, 5, 8, 8, 8, 8]

    # a shorter batch next: nothing of the previous one survives, filler splits at max_length
    static.fill(_trl_batch(([6], [6])))
    assert static.input_ids.tolist() == [[6, 9, 9, 9, 9, 9, 9, 9]]
    assert static.labels.tolist() == [[-100] * 8]  # the collator masks every sequence's first token
    assert static.position_ids.tolist() == [[0, 0, 1, 2, 3, 0, 1, 2]]
    assert static.cu_seq_lens.tolist() == [0, 1, 5, 8, 8, 8, 8]


def test_batches_that_do_not_fit_the_capture_fail_with_the_switch_named():
    static = StaticBatch(rows=1, max_length=4, max_sequences=2, pad_token_id=0, device="cpu")
    with pytest.raises(HarnessError, match="5 tokens exceeds rows x max_length = 4.*cuda_graphs=off"):
        static.fill(_trl_batch(([1, 2, 3, 4, 5], [1, 2, 3, 4, 5])))
    with pytest.raises(HarnessError, match="3 examples exceeds the 2 sequences"):
        static.fill(_trl_batch(([1], [1]), ([2], [2]), ([3], [3])))


def _trainer(tiny_model_dir, tmp_path, batch: int = 4):
    from harness.data.records import prepare
    from harness.spec import load_spec
    from harness.training.tokenization import tokenized_dataset
    from harness.training.train import build_trainer
    from tests.conftest import REPO, tiny_overrides

    spec = load_spec(str(REPO / "tasks" / "amazon_desc.yaml"),
                     tiny_overrides(tiny_model_dir, "train.packing=on", "lora.dropout=0.0", "train.max_length=64"))
    device = devices.Device("cpu")
    tokenizer = models.load_tokenizer(str(tiny_model_dir), spec.model, uses_chat_template=True)
    model = models.load_model(str(tiny_model_dir), spec.model, tokenizer, device)
    data = tokenized_dataset(spec, tokenizer, prepare(spec).train[:24])
    return build_trainer(spec, model, tokenizer, data, None, tmp_path, device, per_device_train_batch_size=batch,
                         save_strategy="no")


def test_the_graphed_step_computes_trls_loss_gradients_and_metrics(tiny_model_dir, tmp_path):
    """On the padded static batch: the loss, every LoRA gradient and the logged entropy, token accuracy
    and token count equal trl's compute_loss on the unpadded batch."""
    trainer = _trainer(tiny_model_dir, tmp_path)
    batch = next(iter(trainer.get_train_dataloader()))
    model = trainer.model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]

    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    expected_grads = [p.grad.clone() for p in params]
    expected_metrics = {k: list(v) for k, v in trainer._metrics["train"].items()}
    model.zero_grad(set_to_none=True)
    trainer._metrics["train"].clear()
    tokens_before = trainer._total_train_tokens
    trainer._total_train_tokens = 0

    step = capture_training_steps(trainer)  # batch 4, max_length 64
    assert trainer.training_step is step and step.static.capacity == 256
    [callback] = [c for c in trainer.callback_handler.callbacks if type(c).__name__ == "GraphedStepCallback"]
    tokens = step.static.fill(batch)
    assert tokens == batch["input_ids"].shape[1] < step.static.capacity  # so filler is in play
    step.loss, step.stats = step.forward_backward(model)
    step.record(tokens)
    assert not trainer._metrics["train"]["entropy"]  # nothing read back inside a step

    torch.testing.assert_close(step.loss, loss.detach(), rtol=1e-5, atol=1e-6)
    for got, want in zip((p.grad for p in params), expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    trainer.control.should_log = True  # as DefaultFlowCallback sets it on a logging step
    callback.on_step_end(trainer.args, trainer.state, trainer.control)
    got_metrics = trainer._metrics["train"]
    for name in ("entropy", "mean_token_accuracy"):
        assert got_metrics[name] == pytest.approx(expected_metrics[name], rel=1e-5)
    assert got_metrics["num_tokens"] == expected_metrics["num_tokens"] == [tokens_before]

    step.graph = "a captured graph"
    callback.on_train_end(trainer.args, trainer.state, trainer.control)
    assert step.graph is None and step.grads is None  # its memory pool goes back before scoring


def test_sft_loss_ignores_what_the_filler_holds(tiny_model_dir, tmp_path):
    """Filler tokens are label-masked and attend only to themselves: other filler ids, same loss."""
    trainer = _trainer(tiny_model_dir, tmp_path)
    batch = next(iter(trainer.get_train_dataloader()))
    losses = []
    for pad in (0, 7):
        static = StaticBatch(4, 64, 64, pad, "cpu")
        static.fill(batch)
        with torch.no_grad():
            losses.append(sft_loss(trainer.model, static)[0])
    torch.testing.assert_close(losses[0], losses[1])


def test_auto_captures_small_models_only(monkeypatch):
    """Launch-bound small models gain (SmolLM2-135M 6.2x), a GPU-bound 1.1B loses 5%: auto decides by weight size."""
    from harness.spec import TaskSpec
    from harness.models import attention
    from harness.training import fast_paths

    monkeypatch.setattr(attention, "varlen_available", lambda: True)
    spec = TaskSpec(name="t")
    cuda = devices.Device("cuda")
    for size, expected in ((270e6, True), (2.2e9, False)):
        monkeypatch.setattr(fast_paths, "weight_bytes", lambda ref, size=size: size)
        assert fast_path_options(spec, cuda)["cuda_graphs"] is expected
    spec.train.cuda_graphs = "on"
    assert fast_path_options(spec, cuda)["cuda_graphs"] is True  # a spec may still ask for it
