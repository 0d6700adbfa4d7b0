"""Several processes, one per GPU of a host: who is who, and the few collective steps harness takes.

`torchrun` or `accelerate launch` (or `harness run --gpus N`, which re-executes through torchrun)
start the same command in every process and tell each its RANK, LOCAL_RANK and WORLD_SIZE. Rank 0
alone writes the run folder, manifest, scores and reports; the others wait for it where they need
its work (`main_only`). Training is PyTorch DDP through the Trainer, which joins the process group
`init` opened. Scoring gives each process whole batches of the one-process batch plan
(`shard_batches`), so every example is decoded with the same batch-mates, padding and seed as in
one process: the outputs do not depend on how many processes there are.

Launched alone (no WORLD_SIZE), every function here is a no-op and harness runs in one process.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterable, NoReturn, TypeVar

from harness.errors import HarnessError

log = logging.getLogger(__name__)
T = TypeVar("T")


class MainFailed(HarnessError):
    """Rank 0 failed in work the others waited for; it reports the error itself, so they stay silent."""

    def __init__(self, exit_code: int):
        super().__init__(f"rank 0 failed (exit {exit_code}); see its error")
        self.exit_code = exit_code


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def init() -> None:
    """Join the process group the launcher set up: NCCL with one GPU a process, gloo on the CPU."""
    if world_size() == 1:
        return
    import torch
    import torch.distributed as dist

    from harness.devices import pick_device

    if dist.is_initialized():
        return
    # NVLink multicast (NVLS) does nothing for the small all-reduce of LoRA gradients, and on a shared
    # NVSwitch host a program using it can take the GPUs out of service; set it to 1 to opt in.
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = pick_device().kind == "cuda"
    if cuda:
        if local >= torch.cuda.device_count():
            raise HarnessError(f"{os.environ.get('LOCAL_WORLD_SIZE', local + 1)} processes on this host but "
                               f"{torch.cuda.device_count()} GPU(s) visible; start at most one process a GPU")
        torch.cuda.set_device(local)
    # The others wait in a collective while rank 0 alone prepares a large data file (minutes for the full
    # AmazonTitles), past NCCL's default 10-minute timeout; a failed process ends the rest through the launcher.
    dist.init_process_group("nccl" if cuda else "gloo", device_id=torch.device("cuda", local) if cuda else None,
                            timeout=timedelta(hours=1))
    if not is_main():
        _quiet()


def _quiet() -> None:
    """Logs, warnings and progress bars come from rank 0 only; the others still print errors."""
    import warnings

    import datasets
    import transformers

    logging.getLogger().setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    warnings.simplefilter("ignore")


def finish() -> None:
    """Leave the process group (torch warns at exit when a process does not)."""
    if world_size() > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def main_only(fn: Callable[..., T]) -> Callable[..., T]:
    """`fn` runs on rank 0 alone; the other processes wait for it and return its result, or fail
    (`MainFailed`, with its exit code) when it fails."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if world_size() == 1:
            return fn(*args, **kwargs)
        import torch.distributed as dist

        box, failure = [None], None
        if is_main():
            try:
                box[0] = (True, fn(*args, **kwargs))
            except BaseException as exc:  # Ctrl-C too: the others must not wait forever
                box[0], failure = (False, 130 if isinstance(exc, KeyboardInterrupt) else
                                   getattr(exc, "exit_code", 3)), exc
        dist.broadcast_object_list(box, src=0)
        if failure is not None:
            raise failure
        ok, value = box[0]
        if not ok:
            raise MainFailed(value)
        return value

    return wrapper


def shard_batches(batches: Iterable[list[int]]) -> list[int]:
    """This process's share of `batches` (lists of indices): every world_size-th whole batch from its
    rank on, as indices in ascending order. Whole batches, not examples: a subset made of whole
    batches of a length-sorted plan is planned into the very same batches again."""
    n, me = world_size(), rank()
    return sorted(i for k, batch in enumerate(batches) if k % n == me for i in batch)


def unshard(indices: list[int], values: list, total: int) -> list:
    """Every process's values (value j belongs at position indices[j]), gathered on every process
    into one list of `total`, in position order."""
    pairs = list(zip(indices, values, strict=True))
    if world_size() > 1:
        import torch.distributed as dist

        parts: list = [None] * world_size()
        dist.all_gather_object(parts, pairs)
        pairs = [pair for part in parts for pair in part]
    missing = object()
    out = [missing] * total
    for i, value in pairs:
        out[i] = value
    if any(v is missing for v in out):
        raise RuntimeError(f"sharded work covers {sum(v is not missing for v in out)} of {total} positions")
    return out


def part_path(path: Path) -> Path:
    """The file this process appends its share of `path` to: `path` itself in one process."""
    return path if world_size() == 1 else path.with_name(f"{path.stem}.rank{rank()}{path.suffix}")


def rank_parts(path: Path) -> list[Path]:
    """Part files of `path` that processes of a several-process run left (`part_path`)."""
    return sorted(path.parent.glob(f"{path.stem}.rank*{path.suffix}"))


def check_gpus(processes: int) -> None:
    """`--gpus N` asks for no more processes than this host can give one GPU each."""
    import torch

    if os.environ.get("HARNESS_DEVICE", "").lower() == "cpu":
        return  # N CPU processes over gloo: what the tests run
    if not torch.cuda.is_available():
        raise HarnessError(f"--gpus {processes}: no CUDA device here (HARNESS_DEVICE=cpu runs {processes} "
                           "CPU processes instead)")
    if processes > torch.cuda.device_count():
        raise HarnessError(f"--gpus {processes}: only {torch.cuda.device_count()} GPU(s) visible")


def relaunch(processes: int, argv: list[str]) -> NoReturn:
    """Run `harness <argv>` again under torchrun, `processes` processes on this host (`--gpus N`)."""
    check_gpus(processes)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "harness", *argv]
    log.info("relaunching: %s", " ".join(command[1:]))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, command)
