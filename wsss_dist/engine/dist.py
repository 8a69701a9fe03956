"""This process's place in the job (Accelerate's process state) and the autocast context of a precision."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class Dist:
    """This process's place in the job (works without torch.distributed: world 1)."""

    rank: int
    world: int
    device: torch.device
    state: object

    def barrier(self) -> None:
        """Wait for every process."""
        self.state.wait_for_everyone()

    def long_barrier(self, seconds: float) -> None:
        """Wait for every process for up to ``seconds`` (a gloo group of its own: NCCL's 10-minute default would end a
        job whose rank 0 alone builds shards or a report for longer)."""
        if self.world <= 1:
            return
        import datetime

        import torch.distributed as td

        group = td.new_group(backend="gloo", timeout=datetime.timedelta(seconds=seconds))
        try:
            td.barrier(group=group)
        finally:
            td.destroy_process_group(group)

    @property
    def main(self) -> bool:
        """Rank 0."""
        return self.rank == 0


def dist() -> Dist:
    """The Accelerate process state (initialises torch.distributed under accelerate/torchrun/SLURM)."""
    from accelerate import PartialState

    s = PartialState(cpu=on_cpu())  # without cpu=True a CUDA-less job would not join its group
    return Dist(s.process_index, s.num_processes, s.device, s)


def on_cpu() -> bool:
    """Whether this process runs on the CPU: no CUDA device, or asked for (``device=cpu``, accelerate's ``--cpu``)."""
    return not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")


def autocast(device: torch.device, precision: str):
    """An autocast context for ``precision`` (no|fp16|bf16) on ``device``'s type."""
    if precision == "no":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def mean_over_processes(x: torch.Tensor) -> torch.Tensor:
    """``x`` averaged over the data-parallel processes (all-reduced; ``x`` itself with one process)."""
    import torch.distributed as td

    if not (td.is_available() and td.is_initialized()) or td.get_world_size() == 1:
        return x
    x = x.clone()
    td.all_reduce(x)
    return x / td.get_world_size()
