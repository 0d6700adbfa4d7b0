"""`train.cuda_graphs`: each training step's forward and backward replayed as one CUDA graph.

A small model's step is bound by the host, not the GPU: on an H100 a SmolLM2-135M step at batch 16
issued ~3,200 kernel launches and ~1,470 cuBLAS calls for 39 ms of GPU work in a 305 ms step
(bench/RESULTS.md, fourth session). Captured once, the whole forward and backward is one launch.

A graph replays fixed shapes and fixed addresses, so each packed batch (one padding-free row of up
to rows x max_length tokens, trl's collator) is copied into static buffers of exactly that size:
the unused tail becomes filler sequences of at most max_length tokens whose labels are all masked
and which attend only to themselves (FlashAttention's varlen kernel reads the boundaries), and the
boundary list is padded with empty sequences to a fixed count. Filler costs compute, not results:
bfd packing fills rows almost completely.

Inside the graph nothing may wait for the GPU, so the step computes trl's SFT loss itself (the same
sum of token log-probabilities over labelled tokens, through trl's fused LM head scoring every
position rather than gathering the labelled ones, a data-dependent shape) and reads trl's logged
metrics (entropy, token accuracy, tokens) at logging steps only. The optimizer step, clipping and
scheduler stay the Trainer's, outside the graph: the gradients live at the graph's fixed addresses
and are handed back to the parameters after each replay.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

from harness.errors import HarnessError

# Eager passes before capture: the first builds cuBLAS handles, autograd's streams and (compiled
# layers) the compiled code, the second runs them as the capture will see them.
WARMUP_PASSES = 2


class StaticBatch:
    """Fixed-shape buffers holding one padding-free packed batch, padded as the module docstring says."""

    def __init__(self, rows: int, max_length: int, max_sequences: int, pad_token_id: int, device):
        import torch

        self.max_length = max_length
        self.capacity = rows * max_length
        self.max_sequences = max_sequences
        self.pad_token_id = pad_token_id
        cap = self.capacity
        self.input_ids = torch.full((1, cap), pad_token_id, dtype=torch.long, device=device)
        self.labels = torch.full((1, cap), -100, dtype=torch.long, device=device)
        self.position_ids = torch.zeros((1, cap), dtype=torch.long, device=device)
        self.cu_seq_lens = torch.full((max_sequences + 1,), cap, dtype=torch.int32, device=device)
        self.cu_seq_lens[0] = 0
        # Filler positions restart every max_length tokens; its boundaries lie max_length apart.
        self._filler_positions = (torch.arange(cap, device=device) % max_length).unsqueeze(0)
        self._filler_steps = max_length * torch.arange(1, rows + 1, dtype=torch.int32, device=device)

    def fill(self, batch: dict) -> int:
        """Copy `batch` (trl's padding-free collator output) in; returns its real token count.
        Only tensor copies and fills: nothing waits for the device."""
        ids, cu = batch["input_ids"], batch["cu_seq_lens_q"]
        n, boundaries = ids.shape[1], cu.numel()
        if ids.shape[0] != 1:
            raise HarnessError("train.cuda_graphs: expected a padding-free packed batch (one row); "
                               "set train.cuda_graphs=off")
        if n > self.capacity:
            raise HarnessError(f"train.cuda_graphs: a packed batch of {n} tokens exceeds rows x max_length = "
                               f"{self.capacity}; set train.cuda_graphs=off")
        filler = math.ceil((self.capacity - n) / self.max_length)
        if boundaries - 1 + filler > self.max_sequences:
            raise HarnessError(f"train.cuda_graphs: a packed batch of {boundaries - 1} examples exceeds the "
                               f"{self.max_sequences} sequences the capture was sized for; set train.cuda_graphs=off")
        self.input_ids[:, :n].copy_(ids, non_blocking=True)
        self.input_ids[:, n:].fill_(self.pad_token_id)
        self.labels[:, :n].copy_(batch["labels"], non_blocking=True)
        self.labels[:, n:].fill_(-100)
        self.position_ids[:, :n].copy_(batch["position_ids"], non_blocking=True)
        self.position_ids[:, n:].copy_(self._filler_positions[:, :self.capacity - n])
        self.cu_seq_lens[:boundaries].copy_(cu, non_blocking=True)
        self.cu_seq_lens[boundaries:boundaries + filler].copy_((self._filler_steps[:filler] + n).clamp_(max=self.capacity))
        self.cu_seq_lens[boundaries + filler:].fill_(self.capacity)
        return n

    def model_inputs(self) -> dict:
        return dict(input_ids=self.input_ids, labels=self.labels, position_ids=self.position_ids,
                    cu_seq_lens_q=self.cu_seq_lens, cu_seq_lens_k=self.cu_seq_lens,
                    max_length_q=self.max_length, max_length_k=self.max_length)


@contextmanager
def lm_head_scores_every_position():
    """trl's fused LM head gathers the labelled positions (`hidden[mask]`) on Triton devices: a shape
    that depends on the data, which a graph cannot hold. Off Triton it scores every position and
    zeroes the unlabelled ones (its path for compilers that need static shapes): the same loss."""
    import trl.trainer.utils as trl_utils

    if not callable(getattr(trl_utils, "_use_triton", None)):
        raise HarnessError("train.cuda_graphs: this trl's fused LM head has no `_use_triton` switch to score "
                           "every position; set train.cuda_graphs=off")
    saved = trl_utils._use_triton
    trl_utils._use_triton = lambda device: False
    try:
        yield
    finally:
        trl_utils._use_triton = saved


def sft_loss(model, static: StaticBatch):
    """trl's SFT loss (nll, no label smoothing) on the static batch, and its metric sums.
    Returns (loss, [entropy sum, correct top-1 tokens, labelled tokens]) as device tensors."""
    import torch

    with lm_head_scores_every_position():
        out = model(**static.model_inputs(), use_cache=False, fused_lm_head=True)
    labelled = out.label_mask.sum()
    loss = -out.log_probs.sum() / labelled.clamp(min=1)
    stats = torch.stack([out.entropy.detach().sum().float(), out.is_top1.sum().float(), labelled.float()])
    return loss, stats


class GraphedTrainingStep:
    """A Trainer's `training_step` that captures the forward and backward once and replays them."""

    def __init__(self, trainer, static: StaticBatch):
        self.trainer, self.static = trainer, static
        self.graph = None
        self.params = self.grads = None
        self.loss = self.stats = None
        self._pending = []

    def forward_backward(self, model):
        loss, stats = sft_loss(model, self.static)
        loss.backward()
        return loss.detach(), stats

    def _capture(self, model) -> None:
        import torch

        self.params = [p for p in model.parameters() if p.requires_grad]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_PASSES):
                for p in self.params:
                    p.grad = None
                self.forward_backward(model)
        torch.cuda.current_stream().wait_stream(side)
        # Captured with no gradients present, the backward writes (not adds) each gradient into memory
        # the graph owns; every replay overwrites it.
        for p in self.params:
            p.grad = None
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.loss, self.stats = self.forward_backward(model)
        except RuntimeError as e:
            raise HarnessError(f"train.cuda_graphs: capturing the training step failed ({str(e).splitlines()[0]}); "
                               "set train.cuda_graphs=off") from e
        self.grads = [p.grad for p in self.params]
        if any(g is None for g in self.grads):
            raise HarnessError("train.cuda_graphs: a trainable parameter got no gradient in the captured step; "
                               "set train.cuda_graphs=off")

    def __call__(self, model, inputs, num_items_in_batch=None):
        model.train()
        tokens = self.static.fill(inputs)
        if self.graph is None:
            self._capture(model)
        self.graph.replay()
        for p, g in zip(self.params, self.grads):
            p.grad = g  # the Trainer sets them to None after each optimizer step
        self.record(tokens)
        return self.loss.clone()  # the next replay overwrites self.loss

    def record(self, tokens: int) -> None:
        """Keep this step's metric sums on the device (read back at the next logging step, so the host
        never waits for the GPU inside a step) and count its tokens as trl does."""
        self._pending.append(self.stats.clone())
        self.trainer._total_train_tokens += tokens
        self.trainer._metrics["train"]["num_tokens"] = [self.trainer._total_train_tokens]

    def flush_metrics(self) -> None:
        """Hand trl the per-step entropy and token accuracy its compute_loss would have logged (it
        cannot run inside a graph: it reads values back every step); one read-back for all steps."""
        import torch

        if not self._pending:
            return
        rows = torch.stack(self._pending).tolist()
        self._pending.clear()
        metrics = self.trainer._metrics["train"]
        for entropy, correct, labelled in rows:
            metrics["entropy"].append(entropy / labelled if labelled else 0.0)
            metrics["mean_token_accuracy"].append(correct / labelled if labelled else 0.0)

    def release(self) -> None:
        """Free the graph and the memory its pool holds (a step's activations and gradients): what
        comes after training (scoring, the next bench recipe) needs it. A later train() captures anew."""
        import torch

        self.graph = self.params = self.grads = self.loss = self.stats = None
        torch.cuda.empty_cache()


def max_packed_sequences(dataset, rows: int) -> int:
    """An upper bound on the examples in one batch of `rows` packed rows: `rows` times the most any
    packed row holds (trl's packing records each row's example lengths in `seq_lengths`)."""
    if "seq_lengths" not in dataset.column_names:
        raise HarnessError("train.cuda_graphs: the training set is not packed (no `seq_lengths`); "
                           "set train.packing=on or train.cuda_graphs=off")
    return rows * max(len(s) for s in dataset["seq_lengths"])


def capture_training_steps(trainer) -> GraphedTrainingStep:
    """Make `trainer` train through a GraphedTrainingStep (captured at its first step), its buffers
    sized by the trainer's batch and max_length. The step ignores
    the Trainer's `num_items_in_batch`: fast_path_options allows graphs only with one process and no
    gradient accumulation, where it equals the batch's labelled-token count the loss divides by."""
    if trainer.args.gradient_accumulation_steps != 1:
        raise HarnessError("train.cuda_graphs: needs gradient_accumulation_steps 1 (a captured backward "
                           "overwrites gradients); set train.cuda_graphs=off")
    if getattr(trainer, "_metrics", None) is None or not hasattr(trainer, "_total_train_tokens"):
        raise HarnessError("train.cuda_graphs: this trl's SFTTrainer keeps its metrics elsewhere; "
                           "set train.cuda_graphs=off")
    # Filler sequences (at most one per row) need boundaries of their own.
    rows = trainer.args.per_device_train_batch_size
    sequences = max_packed_sequences(trainer.train_dataset, rows) + rows
    static = StaticBatch(rows, trainer.args.max_length, sequences, trainer.data_collator.pad_token_id,
                         trainer.args.device)
    step = GraphedTrainingStep(trainer, static)
    trainer.training_step = step
    trainer.add_callback(_step_callback(step))
    return step


def _step_callback(step: GraphedTrainingStep):
    """Flushes the step's metrics when the Trainer is about to log (DefaultFlowCallback, registered
    first, has set should_log by then) and on the last step; frees the graph at train end."""
    from transformers import TrainerCallback

    class GraphedStepCallback(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if control.should_log or state.global_step >= state.max_steps:
                step.flush_metrics()

        def on_train_end(self, args, state, control, **kwargs):
            step.release()

    return GraphedStepCallback()
