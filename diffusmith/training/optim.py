"""Optimizer (AdamW, 8-bit AdamW when bitsandbytes is installed) and the learning-rate schedule."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR

from ..errors import DiffusmithError

logger = logging.getLogger(__name__)
LR_SCHEDULES = ("constant", "cosine")


def make_optimizer(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float = 1e-2,
                   use_8bit: bool = False) -> torch.optim.Optimizer:
    params = list(params)
    if not params:
        raise DiffusmithError("nothing to train: no parameter requires a gradient")
    if lr <= 0 or not math.isfinite(lr):
        raise DiffusmithError(f"--learning-rate must be a positive number, got {lr}")
    if use_8bit:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise DiffusmithError("--optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=_can_fuse(params) or None)


def _can_fuse(params: list[torch.nn.Parameter]) -> bool:
    """torch's fused AdamW (one kernel for all parameters instead of ~10 per parameter: a LoRA has hundreds)
    takes plain floating-point tensors on the CPU or a CUDA device; FSDP's sharded parameters keep the default."""
    from .distributed import is_sharded

    return all(not is_sharded(p) and p.device.type in ("cpu", "cuda") and p.is_floating_point()
               for p in params) and len({p.device for p in params}) == 1


def lr_factor(step: int, *, schedule: str, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the base learning rate after ``step`` optimizer steps: linear warm-up, then constant
    or a cosine decay to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_lr_scheduler(optimizer: torch.optim.Optimizer, schedule: str, warmup_steps: int,
                      total_steps: int) -> LambdaLR:
    if schedule not in LR_SCHEDULES:
        raise DiffusmithError(f"unknown --lr-schedule {schedule!r}: use {', '.join(LR_SCHEDULES)}")
    if warmup_steps < 0:
        raise DiffusmithError(f"--warmup-steps must be >= 0, got {warmup_steps}")

    def factor(step: int) -> float:
        return lr_factor(step, schedule=schedule, warmup_steps=warmup_steps, total_steps=total_steps)

    return LambdaLR(optimizer, factor)
