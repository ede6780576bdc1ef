"""The learning-rate schedule and the AdamW optimiser of every training run: the student trainer's
(students, the teacher fine-tune) and the demo teacher's.

    lr = lr_at(step, optim)                  linear warmup, then cosine to lr * min_lr_ratio
    optimizer = build_optimizer(model, optim)
    set_lr(optimizer, lr); norm = clip_and_step(optimizer, params, max_norm)

`optim` is anything with the fields of stages.training.config.OptimConfig that these
read: lr, warmup_steps, max_steps, min_lr_ratio, weight_decay, betas. The
learning rate is a pure function of the step, so resuming needs only the step
and the optimiser state.
"""

from __future__ import annotations

import math

import torch

from stages.errors import TrainingError
from stages.training.config import OptimConfig


def lr_at(step: int, optim: OptimConfig) -> float:
    """Linear warmup for `warmup_steps`, then cosine from lr to lr * min_lr_ratio at max_steps."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    span = max(optim.max_steps - optim.warmup_steps, 1)
    progress = min((step - optim.warmup_steps) / span, 1.0)
    floor = optim.lr * optim.min_lr_ratio
    return floor + 0.5 * (optim.lr - floor) * (1.0 + math.cos(math.pi * progress))


def schedule_meta(step: int, optim: OptimConfig) -> dict:
    """What a checkpoint records about the schedule at `step`."""
    return {"kind": "warmup_cosine", "step": step, "lr": lr_at(step, optim), "warmup_steps": optim.warmup_steps,
            "max_steps": optim.max_steps, "min_lr_ratio": optim.min_lr_ratio}


def build_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norms, biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), foreach=False)


def apply_config(optimizer: torch.optim.Optimizer, optim: OptimConfig) -> None:
    """After loading a saved optimiser state: the current config's betas and weight decay win."""
    for group, decay in zip(optimizer.param_groups, (optim.weight_decay, 0.0)):
        group.update(betas=tuple(optim.betas), weight_decay=decay)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_and_step(optimizer: torch.optim.Optimizer, params: list, max_norm: float) -> float:
    """Clip the gradient norm (max_norm <= 0: no clipping), step unless it is not finite, zero the gradients.

    Returns the norm before clipping; a non-finite one means the update was skipped."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP2: a DTensor
    if math.isfinite(norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def warmup_for(optim: OptimConfig) -> int:
    """warmup_steps, or with warmup_ratio that fraction of max_steps (rounded up, as transformers does)."""
    if optim.warmup_ratio is None:
        return optim.warmup_steps
    return math.ceil(optim.warmup_ratio * optim.max_steps)


def steps_for_epochs(epochs: float, num_sequences: int, per_step: int) -> int:
    """Optimizer steps for `epochs` passes over `num_sequences` with `per_step` sequences per
    step (batch_size x grad_accum x ranks); an epoch is its full global batches, as the reader
    gives them (a last partial batch is dropped)."""
    per_epoch = num_sequences // per_step
    if per_epoch < 1:
        raise TrainingError(f"optim.epochs: the cache holds {num_sequences} sequences, fewer than one step's "
                         f"{per_step} (batch_size x grad_accum x ranks); lower batch_size or use max_steps")
    return max(1, math.ceil(epochs * per_epoch))
