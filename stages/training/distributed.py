"""Processes and devices of a training run: the torchrun process group, DDP / FSDP2 wrapping,
and full (gathered) state dicts for checkpoints.

Under `torchrun` (RANK/WORLD_SIZE set) each process trains on `cuda:LOCAL_RANK`
when that GPU is visible, else on CPU with gloo when no GPU is visible at all.
Asking for more ranks per node than visible GPUs is refused with what to do,
rather than failing inside CUDA with "invalid device ordinal".
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from stages.errors import LaunchError
from stages.training import checkpoint as ckpt


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # we initialised the process group, so we tear it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            values = values.to(self.device)
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values.cpu()


def pick_device(local_rank: int, cuda_count: int) -> torch.device:
    """cuda:LOCAL_RANK when that GPU is visible, CPU when none is; a clear error when too few are."""
    if cuda_count == 0:
        return torch.device("cpu")
    if local_rank < cuda_count:
        return torch.device(f"cuda:{local_rank}")
    raise LaunchError(
        f"this process has LOCAL_RANK={local_rank} but only {cuda_count} CUDA device(s) are visible: start at "
        f"most {cuda_count} process(es) per node (torchrun --nproc_per_node {cuda_count}), or hide the GPUs "
        "(CUDA_VISIBLE_DEVICES=) to train every rank on CPU with gloo"
    )


def init_distributed() -> Dist:
    """Join the torchrun process group when RANK/WORLD_SIZE are set (gloo on CPU, nccl on GPU)."""
    joined = dist.is_available() and dist.is_initialized()  # the caller set up the group: use it
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(local, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    if world <= 1 and not joined:
        return Dist(device=device)
    owns = not joined
    if owns:
        dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=device if cuda else None)
    return Dist(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local,
                device=device, owns_group=owns)


def wrap_model(objective: torch.nn.Module, fsdp: bool, d: Dist) -> torch.nn.Module:
    """DDP for models that fit one device, FSDP2 (fully_shard per decoder layer) with `fsdp`."""
    if d.world_size <= 1:
        return objective
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        layers = [m for m in objective.model.modules() if type(m).__name__.endswith("DecoderLayer")]
        for layer in layers:
            fully_shard(layer)
        return fully_shard(objective)
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(objective, device_ids=[d.local_rank] if d.device.type == "cuda" else None)


# ---------------------------------------------------------------- full state dicts


def model_state(wrapped: torch.nn.Module, student: torch.nn.Module, fsdp: bool) -> dict[str, torch.Tensor]:
    """The model's full state dict on CPU (gathered on every rank under FSDP)."""
    if fsdp and dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in student.state_dict().items()}


def optim_state(wrapped, optimizer, fsdp: bool) -> dict:
    if fsdp and dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(wrapped, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_states(path: Path, wrapped, student, optimizer, fsdp: bool) -> None:
    if fsdp and dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(student, ckpt.load_model_state(path), options=opts)
        set_optimizer_state_dict(wrapped, optimizer, ckpt.load_optim_state(path), options=opts)
        return
    if fsdp:  # fsdp asked for, single process: the weights were not loaded before wrapping
        student.load_state_dict(ckpt.load_model_state(path))
    optimizer.load_state_dict(ckpt.load_optim_state(path))
