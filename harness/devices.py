"""Where a process computes: the device and the dtype that goes with it.

A foundation: data preparation, distributed setup, training, scoring and serving all ask it, and it loads
nothing itself (torch is imported when asked).
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Device:
    """Where work runs: CUDA (bf16) when present, else CPU (fp32)."""

    kind: str
    index: int = 0

    @property
    def torch_device(self):
        import torch

        return torch.device(f"cuda:{self.index}" if self.kind == "cuda" else "cpu")

    @property
    def dtype(self):
        import torch

        return torch.bfloat16 if self.kind == "cuda" else torch.float32

    def describe(self) -> str:
        import torch

        if self.kind == "cuda":
            return f"cuda:{self.index} {torch.cuda.get_device_name(self.index)}"
        return f"cpu ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def pick_device() -> Device:
    import torch

    if os.environ.get("HARNESS_DEVICE", "").lower() == "cpu" or not torch.cuda.is_available():
        return Device("cpu")
    return Device("cuda", torch.cuda.current_device())
