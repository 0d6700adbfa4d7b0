"""Reference perplexity: how likely a model finds the reference description given its prompt.

Runs in length-sorted batches like generation and never materialises full-vocabulary logits
for the whole batch: only positions that predict a description token go through the LM head,
`HEAD_CHUNK` positions at a time, so the large batches of the static engines fit in memory.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from harness.data.prompts import EncodedExample
from harness.models import transformers_model
from harness.scoring.decoding import deterministic_kernels
from harness.scoring.generation import length_sorted_batches

HEAD_CHUNK = 8192  # positions per LM-head call: 8192 x 49k vocabulary x fp32 is 1.6 GB of logits


def reference_nll(model, examples: Sequence[EncodedExample], batch_size: int, device,
                  pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-example summed NLL (nats) of description tokens given the prompt, and their counts.

    Right padding keeps real tokens at positions 0..len-1 so padding cannot change a score;
    the test suite checks that batch size leaves every value unchanged.
    """
    import torch

    nll = np.zeros(len(examples), dtype=np.float64)
    counts = np.zeros(len(examples), dtype=np.int64)
    base = transformers_model(model)
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    model.eval()
    for batch in length_sorted_batches([len(e.input_ids) for e in examples], batch_size):
        width = max(len(examples[i].input_ids) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            n = len(examples[i].input_ids)
            ids[row, :n] = torch.tensor(examples[i].input_ids)
            labels[row, :n] = torch.tensor(examples[i].labels)
            mask[row, :n] = 1
        ids, labels, mask = (t.to(device.torch_device) for t in (ids, labels, mask))
        with torch.inference_mode(), deterministic_kernels():
            hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
            targets = labels[:, 1:]
            rows, cols = torch.nonzero(targets != -100, as_tuple=True)
            token_nll = torch.cat([
                torch.nn.functional.cross_entropy(head(hidden[:, :-1][r, c]).float(), targets[r, c], reduction="none")
                for r, c in zip(rows.split(HEAD_CHUNK), cols.split(HEAD_CHUNK))])
            per_row = torch.zeros(len(batch), dtype=torch.float64, device=token_nll.device)
            per_row.index_add_(0, rows, token_nll.double())
            n_per_row = torch.bincount(rows, minlength=len(batch))
        nll[batch] = per_row.cpu().numpy()
        counts[batch] = n_per_row.cpu().numpy()
    return nll, counts
